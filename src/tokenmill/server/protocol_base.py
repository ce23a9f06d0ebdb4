"""The base of every request model and the field types they share: JSON integers as ints,
every string checked for valid Unicode, unknown fields ignored, NaN and infinities refused."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

from tokenmill.errors import check_unicode


def integral(v: Any) -> Any:
    """JSON Schema's integers include 2.0: integral floats (in lists too) become ints. Beyond
    64 bits no integer field accepts them anyway, and a float field keeps its float."""
    if isinstance(v, float) and v.is_integer() and abs(v) <= 2**64:
        return int(v)
    if isinstance(v, list):
        return [integral(x) for x in v]
    return v


# Limits filled in per server by openapi.py (see `x-limit` there).
TokenId = Annotated[StrictInt, Field(ge=0, json_schema_extra={"x-limit": "token_id"})]
TokenCount = Annotated[StrictInt, Field(json_schema_extra={"x-limit": "seq_len"})]


class RequestModel(BaseModel):
    # Unknown fields are ignored, as vLLM does (clients send provider-specific extras); NaN and
    # infinities (which Python's JSON parser accepts) are rejected.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _json_integers(cls, v: Any) -> Any:
        return integral(v)

    @field_validator("*")
    @classmethod
    def _check_text(cls, v: Any) -> Any:
        """Every string (dict keys too) must be valid Unicode: JSON can carry a lone surrogate
        ("\\ud800"), which no tokenizer or UTF-8 encoder takes."""
        _check_unicode_tree(v)
        return v


def _check_unicode_tree(v: Any) -> None:
    if isinstance(v, str):
        check_unicode(v)
    elif isinstance(v, dict):
        for key, val in v.items():
            _check_unicode_tree(key)
            _check_unicode_tree(val)
    elif isinstance(v, list) and v and not isinstance(v[0], (int, float)):
        for item in v:  # (validated lists of numbers hold no text)
            _check_unicode_tree(item)


def unsupported(v: Any, name: str) -> Any:
    if v:
        raise ValueError("is not supported")
    return v

"""OpenAI-compatible request models (pydantic, at the HTTP edge only) and their translation to
SamplingParams. Responses are built as plain dicts by the serving modules (their documented
shapes are in responses.py).

The value ranges come from sampling_params.py, so the OpenAPI document states the limits the
server enforces. Limits that depend on the served model (vocabulary, context length, queue) are
marked with `x-limit` here and filled in by openapi.py. Union-typed fields keep a `before`
validator that names the problem plainly; their annotations only shape the schema.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    WithJsonSchema,
    field_validator,
)

from tokenmill.errors import InvalidRequestError, check_unicode
from tokenmill.sampling_params import (
    MAX_LOGIT_BIAS,
    MAX_LOGPROBS,
    MAX_PENALTY,
    MAX_REPETITION_PENALTY,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_TEMPERATURE,
    MAX_TOP_K,
    MIN_REPETITION_PENALTY,
    PRIORITY_MAX,
    PRIORITY_MIN,
    SEED_MAX,
    SEED_MIN,
    SamplingParams,
)

MAX_N = 128  # most samples per prompt


def _integral(v: Any) -> Any:
    """JSON Schema's integers include 2.0: integral floats (in lists too) become ints. Beyond
    64 bits no integer field accepts them anyway, and a float field keeps its float."""
    if isinstance(v, float) and v.is_integer() and abs(v) <= 2**64:
        return int(v)
    if isinstance(v, list):
        return [_integral(x) for x in v]
    return v


# Limits filled in per server by openapi.py (see `x-limit` there).
TokenId = Annotated[StrictInt, Field(ge=0, json_schema_extra={"x-limit": "token_id"})]
TokenCount = Annotated[StrictInt, Field(json_schema_extra={"x-limit": "seq_len"})]
_TOKEN_ID = {"type": "integer", "minimum": 0, "x-limit": "token_id"}
_TEXT = {"type": "string", "minLength": 1}
_PROMPT_SCHEMA = {
    "anyOf": [
        _TEXT,
        {"type": "array", "minItems": 1, "items": _TEXT, "x-limit": "num_prompts"},
        {"type": "array", "minItems": 1, "items": _TOKEN_ID, "x-limit": "prompt_len"},
        {
            "type": "array",
            "minItems": 1,
            "items": {"type": "array", "minItems": 1, "items": _TOKEN_ID, "x-limit": "prompt_len"},
            "x-limit": "num_prompts",
        },
    ]
}
_STOP_STRING = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_STRING_CHARS}
_STOP_SCHEMA = {
    "anyOf": [
        _STOP_STRING,
        {"type": "array", "maxItems": MAX_STOP_STRINGS, "items": _STOP_STRING},
        {"type": "null"},
    ]
}


def _needs(field: str, kind: str, other: str) -> dict[str, Any]:
    """JSON Schema for "when `field` is a `kind` (not null), `other` must be true"."""
    return {
        "if": {"properties": {field: {"type": kind}}, "required": [field]},
        "then": {"properties": {other: {"const": True}}, "required": [other]},
    }


_STREAM_OPTIONS_NEED_STREAM = _needs("stream_options", "object", "stream")
_TOP_LOGPROBS_NEED_LOGPROBS = _needs("top_logprobs", "integer", "logprobs")
_TOKEN_KEY = re.compile(r"[0-9]+")
_LOGIT_BIAS_SCHEMA = {
    "anyOf": [
        {
            "type": "object",
            "propertyNames": {"pattern": "^[0-9]+$", "x-limit": "token_key"},
            "additionalProperties": {
                "type": "number",
                "minimum": -MAX_LOGIT_BIAS,
                "maximum": MAX_LOGIT_BIAS,
            },
            "description": "token id (a decimal string) -> bias added to its logit",
        },
        {"type": "null"},
    ]
}


class _Request(BaseModel):
    # Unknown fields are ignored, as vLLM does (clients send provider-specific extras); NaN and
    # infinities (which Python's JSON parser accepts) are rejected.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _json_integers(cls, v: Any) -> Any:
        return _integral(v)

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


class StreamOptions(_Request):
    include_usage: StrictBool = False


def _unsupported(v: Any, name: str) -> Any:
    if v:
        raise ValueError(f"{name} are not supported" if name == "tools" else "is not supported")
    return v


class _SamplingFields(_Request):
    """Fields shared by completions and chat, with vLLM's extras."""

    model: StrictStr | None = None
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] = 1
    temperature: StrictFloat | None = Field(None, ge=0, le=MAX_TEMPERATURE)
    top_p: StrictFloat | None = Field(None, gt=0, le=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: Annotated[str | list[str] | None, WithJsonSchema(_STOP_SCHEMA)] = None
    seed: Annotated[StrictInt, Field(ge=SEED_MIN, le=SEED_MAX)] | None = None
    presence_penalty: StrictFloat | None = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY)
    frequency_penalty: StrictFloat | None = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY)
    logit_bias: Annotated[dict[str, StrictFloat] | None, WithJsonSchema(_LOGIT_BIAS_SCHEMA)] = None
    user: StrictStr | None = None
    # extras (vLLM names)
    top_k: Annotated[StrictInt, Field(ge=-1, le=MAX_TOP_K)] | None = None
    min_p: StrictFloat | None = Field(None, ge=0, le=1)
    repetition_penalty: StrictFloat | None = Field(
        None, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY
    )
    ignore_eos: StrictBool = False
    min_tokens: Annotated[TokenCount, Field(ge=0, description="at most max_tokens")] = 0
    stop_token_ids: list[TokenId] | None = None
    skip_special_tokens: StrictBool = True
    include_stop_str_in_output: StrictBool = False
    priority: Annotated[StrictInt, Field(ge=PRIORITY_MIN, le=PRIORITY_MAX)] = 0
    cache_salt: StrictStr | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, v: Any) -> Any:
        if v is None or isinstance(v, str):
            return v
        if isinstance(v, list) and all(isinstance(s, str) for s in v):
            return v
        raise ValueError("must be a string or a list of strings")

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _check_logit_bias(cls, v: Any) -> Any:
        if isinstance(v, dict):
            for key in v:
                if not _TOKEN_KEY.fullmatch(key):
                    raise ValueError(f"keys must be token ids (decimal digits), got {key!r}")
        return v

    def sampling_params(self, max_tokens: int | None, logprobs: int | None, **kw: Any):
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError(
                "stream_options is only allowed when stream is true", "stream_options"
            )
        bias = {int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None
        return SamplingParams(
            n=self.n,
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias=bias,
            seed=self.seed,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            **kw,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    model_config = ConfigDict(json_schema_extra={"allOf": [_STREAM_OPTIONS_NEED_STREAM]})

    prompt: Annotated[
        str | list[str] | list[StrictInt] | list[list[StrictInt]], WithJsonSchema(_PROMPT_SCHEMA)
    ]
    max_tokens: Annotated[TokenCount, Field(ge=1)] | None = 16
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: StrictBool = False
    best_of: Annotated[StrictInt, Field(ge=1, le=MAX_N, description="must equal n")] | None = None
    suffix: Annotated[StrictStr, Field(max_length=0)] | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt(cls, v: Any) -> Any:
        def is_ids(x: Any) -> bool:
            return isinstance(x, list) and all(
                isinstance(t, int) and not isinstance(t, bool) for t in x
            )

        v = _integral(v)  # this validator runs before the base class's
        if v == "" or v == [] or (isinstance(v, list) and ("" in v or [] in v)):
            raise ValueError("must not be empty (nor hold an empty prompt)")
        if isinstance(v, str):
            return v
        if isinstance(v, list) and (all(isinstance(p, str) for p in v) or is_ids(v)):
            return v
        if isinstance(v, list) and all(is_ids(p) for p in v):
            return v
        raise ValueError(
            "must be a string, a list of strings, a list of token ids or a list of lists of "
            "token ids"
        )

    @field_validator("suffix", mode="before")
    @classmethod
    def _check_suffix(cls, v: Any) -> Any:
        return _unsupported(v, "suffix")

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class TextPart(_Request):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _check_content(cls, v: Any) -> Any:
        if v is None or isinstance(v, str):
            return v
        if isinstance(v, list):
            for part in v:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"only text content parts are supported, got type {kind!r}")
                check_unicode(part["text"])  # here, not in TextPart: names the field plainly
            return v
        raise ValueError("must be a string or a list of text parts")

    def as_template_dict(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "\n".join(p.text for p in content)
        msg: dict[str, Any] = {"role": self.role, "content": content or ""}
        if self.name is not None:
            msg["name"] = self.name
        return msg


class ChatCompletionRequest(_SamplingFields):
    model_config = ConfigDict(
        json_schema_extra={"allOf": [_STREAM_OPTIONS_NEED_STREAM, _TOP_LOGPROBS_NEED_LOGPROBS]}
    )

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Annotated[TokenCount, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[TokenCount, Field(ge=1)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    tools: Annotated[list[dict[str, Any]], Field(max_length=0)] | None = None
    add_generation_prompt: StrictBool = True

    @field_validator("tools", mode="before")
    @classmethod
    def _check_tools(cls, v: Any) -> Any:
        return _unsupported(v, "tools")

    def num_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError(
                "top_logprobs is only allowed when logprobs is true", "top_logprobs"
            )
        if not self.logprobs:
            return None
        return self.top_logprobs or 0


class TokenizeRequest(_Request):
    """Exactly one of `prompt` (text) or `messages` (a chat, through the template)."""

    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [
                {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
                {"required": ["messages"], "properties": {"messages": {"type": "array"}}},
            ]
        }
    )

    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True


class DetokenizeRequest(_Request):
    model: StrictStr | None = None
    tokens: list[TokenId]

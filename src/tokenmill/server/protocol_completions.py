"""The /v1/completions request: a text or token-id prompt, or a batch of them."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    WithJsonSchema,
    field_validator,
)

from tokenmill.sampling_params import MAX_LOGPROBS
from tokenmill.server.protocol_base import TokenCount, integral, unsupported
from tokenmill.server.protocol_sampling import MAX_N, STREAM_OPTIONS_NEED_STREAM, SamplingFields

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


class CompletionRequest(SamplingFields):
    model_config = ConfigDict(json_schema_extra={"allOf": [STREAM_OPTIONS_NEED_STREAM]})

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

        v = integral(v)  # this validator runs before the base class's
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
        return unsupported(v, "suffix")

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

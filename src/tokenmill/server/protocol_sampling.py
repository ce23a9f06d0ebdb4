"""The sampling fields shared by completions and chat (with vLLM's extras), their schemas, and
their translation to SamplingParams."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import (
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    WithJsonSchema,
    field_validator,
)

from tokenmill.errors import InvalidRequestError
from tokenmill.sampling_params import (
    MAX_LOGIT_BIAS,
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
    StructuredOutputsParams,
)
from tokenmill.server.protocol_base import RequestModel, TokenCount, TokenId
from tokenmill.server.protocol_slo import SloRequest, WorkflowRequest
from tokenmill.server.protocol_structured import StructuredOutputsRequest

MAX_N = 128  # most samples per prompt

_STOP_STRING = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_STRING_CHARS}
_STOP_SCHEMA = {
    "anyOf": [
        _STOP_STRING,
        {"type": "array", "maxItems": MAX_STOP_STRINGS, "items": _STOP_STRING},
        {"type": "null"},
    ]
}


def needs(field: str, kind: str, other: str) -> dict[str, Any]:
    """JSON Schema for "when `field` is a `kind` (not null), `other` must be true"."""
    return {
        "if": {"properties": {field: {"type": kind}}, "required": [field]},
        "then": {"properties": {other: {"const": True}}, "required": [other]},
    }


STREAM_OPTIONS_NEED_STREAM = needs("stream_options", "object", "stream")
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


class StreamOptions(RequestModel):
    include_usage: StrictBool = False


class SamplingFields(RequestModel):
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
    structured_outputs: StructuredOutputsRequest | None = None
    slo: SloRequest | None = None
    workflow: WorkflowRequest | None = None

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

    def sampling_params(
        self, max_tokens: int | None, logprobs: int | None, **kw: Any
    ) -> SamplingParams:
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError(
                "stream_options is only allowed when stream is true", "stream_options"
            )
        bias = {int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None
        kw.setdefault("structured_outputs", self.structured_spec())
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
            slo=None if self.slo is None else self.slo.params(),
            workflow=None if self.workflow is None else self.workflow.params(),
            **kw,
        )

    def structured_spec(self) -> StructuredOutputsParams | None:
        """The output constraint asked for, if any (chat adds response_format)."""
        so = self.structured_outputs
        return None if so is None else so.params()

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

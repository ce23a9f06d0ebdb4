"""OpenAI-compatible request models (pydantic, at the HTTP edge only) and their translation to
SamplingParams. Responses are built as plain dicts by the serving modules."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

from tokenmill.errors import InvalidRequestError, check_unicode
from tokenmill.sampling_params import SamplingParams

MAX_N = 128  # most samples per prompt


class _Request(BaseModel):
    # Unknown fields are ignored, as vLLM does (clients send provider-specific extras); NaN and
    # infinities (which Python's JSON parser accepts) are rejected.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

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


class _SamplingFields(_Request):
    """Fields shared by completions and chat, with vLLM's extras."""

    model: str | None = None
    n: StrictInt = 1
    temperature: float | None = None
    top_p: float | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: StrictInt | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # extras (vLLM names)
    top_k: StrictInt | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: StrictBool = False
    min_tokens: StrictInt = 0
    stop_token_ids: list[StrictInt] | None = None
    skip_special_tokens: StrictBool = True
    include_stop_str_in_output: StrictBool = False
    priority: StrictInt = 0
    cache_salt: str | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, v: Any) -> Any:
        if v is None or isinstance(v, str):
            return v
        if isinstance(v, list) and all(isinstance(s, str) for s in v):
            return v
        raise ValueError("must be a string or a list of strings")

    def sampling_params(self, max_tokens: int | None, logprobs: int | None, **kw: Any):
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError(
                "stream_options is only allowed when stream is true", "stream_options"
            )
        if self.n > MAX_N:
            raise InvalidRequestError(f"n must be <= {MAX_N}, got {self.n}", "n")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise InvalidRequestError("seed must fit in 64 bits", "seed")
        bias = None
        if self.logit_bias:
            bias = {}
            for key, val in self.logit_bias.items():
                try:
                    bias[int(key)] = val
                except ValueError:
                    raise InvalidRequestError(
                        f"logit_bias keys must be token ids, got {key!r}", "logit_bias"
                    ) from None
        return SamplingParams(
            n=self.n,
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
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
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]] = Field(...)
    max_tokens: StrictInt | None = 16
    logprobs: StrictInt | None = None
    echo: StrictBool = False
    best_of: StrictInt | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt(cls, v: Any) -> Any:
        def is_ids(x: Any) -> bool:
            return isinstance(x, list) and all(
                isinstance(t, int) and not isinstance(t, bool) for t in x
            )

        if isinstance(v, str):
            return v
        if isinstance(v, list) and v:
            if all(isinstance(p, str) for p in v) or is_ids(v):
                return v
            if all(is_ids(p) for p in v):
                return v
        if isinstance(v, list) and not v:
            raise ValueError("must not be empty")
        raise ValueError(
            "must be a string, a list of strings, a list of token ids or a list of lists of "
            "token ids"
        )

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

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
    messages: list[ChatMessage]
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None
    tools: list[dict[str, Any]] | None = None
    add_generation_prompt: StrictBool = True

    @field_validator("messages")
    @classmethod
    def _check_messages(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        if not v:
            raise ValueError("must contain at least one message")
        return v

    def num_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError(
                "top_logprobs is only allowed when logprobs is true", "top_logprobs"
            )
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= 20:
            raise InvalidRequestError(
                f"top_logprobs must be an integer in [0, 20], got {self.top_logprobs}",
                "top_logprobs",
            )
        if not self.logprobs:
            return None
        return self.top_logprobs or 0


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[StrictInt]

"""Per-request sampling parameters, with vLLM's field names.

The value ranges below are checked here, so the offline API and the server enforce the same
limits (the server's request schema is built from these constants); checks that need the model
(token ids against the vocabulary, lengths against the context) are the engine's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tokenmill.errors import InvalidRequestError
from tokenmill.slo_params import SloParams, WorkflowParams, to_slo, to_workflow

MAX_TEMPERATURE = 2.0  # OpenAI's range is [0, 2]
MAX_PENALTY = 2.0  # presence and frequency penalties lie in [-2, 2], as in OpenAI's API
# repetition_penalty divides positive logits and multiplies negative ones (1: off); below ~1e-37
# the float32 logits overflow, so the range is bounded on both sides.
MIN_REPETITION_PENALTY = 0.01
MAX_REPETITION_PENALTY = 2.0
MAX_LOGIT_BIAS = 100.0  # logit_bias values lie in [-100, 100], as in OpenAI's API
MAX_LOGPROBS = 20  # top logprobs per position
MAX_TOP_K = 2**31 - 1  # values at or above the vocabulary size mean "off"
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
SEED_MIN, SEED_MAX = INT64_MIN, 2**64 - 1  # any 64-bit seed, signed or not
PRIORITY_MIN, PRIORITY_MAX = INT64_MIN, INT64_MAX


def check_priority(priority: int) -> None:
    """Priorities are 64-bit integers (lower runs first under the priority policy)."""
    if not _is_int(priority) or not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        raise InvalidRequestError(
            f"priority must be an integer in [-2^63, 2^63 - 1], got {priority!r}", "priority"
        )


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _in_range(v: object, lo: float, hi: float) -> bool:
    """lo <= v <= hi for a finite real number (NaN fails every comparison, so it is out)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and lo <= v <= hi


MAX_CHOICES = 1024  # structured_outputs.choice: at most this many alternatives
STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Constrains the output to a language; exactly one kind is set (vLLM's field names).

    json: a JSON Schema (a dict, or its JSON text); regex: a regular expression the whole output
    matches; choice: the output is one of these strings; grammar: an EBNF grammar (GBNF style,
    `root ::= ...`; llama.cpp's GBNF too); json_object: any JSON object; structural_tag: xgrammar's
    structural tag (free text in which a trigger starts a tagged region, e.g. a JSON-Schema
    constrained tool call between begin and end strings), as a dict or its JSON text, either
    `{"structures": [{"begin", "schema", "end"}], "triggers": [...]}` or
    `{"type": "structural_tag", "format": {...}}`. Whether a schema, regex or grammar compiles
    is the engine's check (it needs the tokenizer); the shape of the spec is checked here.
    """

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False
    structural_tag: dict[str, Any] | str | None = None

    def __post_init__(self) -> None:
        param = "structured_outputs"
        kinds = [k for k in STRUCTURED_KINDS if getattr(self, k) not in (None, False)]
        if len(kinds) != 1:
            got = ", ".join(kinds) or "none"
            raise InvalidRequestError(
                f"{param} must set exactly one of {', '.join(STRUCTURED_KINDS)} (got {got})", param
            )
        if self.json is not None:
            if isinstance(self.json, str):
                try:
                    schema = json.loads(self.json)
                except ValueError as e:
                    raise InvalidRequestError(f"{param}.json is not valid JSON: {e}", param) from e
            else:
                schema = self.json
            if not isinstance(schema, (dict, bool)):
                raise InvalidRequestError(f"{param}.json must be a JSON Schema object", param)
            try:
                self.key()
            except (TypeError, ValueError) as e:
                raise InvalidRequestError(f"{param}.json is not JSON: {e}", param) from e
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise InvalidRequestError(f"{param}.{name} must be a non-empty string", param)
        if self.choice is not None:
            c = self.choice
            if not isinstance(c, (list, tuple)) or not c or len(c) > MAX_CHOICES:
                raise InvalidRequestError(
                    f"{param}.choice must be a list of 1 to {MAX_CHOICES} strings", param
                )
            if not all(isinstance(x, str) and x for x in c):
                raise InvalidRequestError(f"{param}.choice must hold non-empty strings", param)
            object.__setattr__(self, "choice", list(c))
        if self.structural_tag is not None:
            tag = self.structural_tag
            if isinstance(tag, str):
                try:
                    tag = json.loads(tag)
                except ValueError as e:
                    raise InvalidRequestError(
                        f"{param}.structural_tag is not valid JSON: {e}", param
                    ) from e
            if not isinstance(tag, dict):
                raise InvalidRequestError(f"{param}.structural_tag must be a JSON object", param)
            try:
                self.key()
            except (TypeError, ValueError) as e:
                raise InvalidRequestError(f"{param}.structural_tag is not JSON: {e}", param) from e
        if not isinstance(self.json_object, bool):
            raise InvalidRequestError(f"{param}.json_object must be a boolean", param)

    @property
    def kind(self) -> str:
        return next(k for k in STRUCTURED_KINDS if getattr(self, k) not in (None, False))

    def key(self) -> tuple[str, str]:
        """A hashable identity: equal keys compile to the same grammar."""
        kind = self.kind
        if kind in ("json", "structural_tag"):
            v = getattr(self, kind)
            obj = json.loads(v) if isinstance(v, str) else v
            return kind, json.dumps(obj, sort_keys=True, separators=(",", ":"))
        if kind == "choice":
            return kind, json.dumps(self.choice)
        if kind == "json_object":
            return kind, ""
        return kind, getattr(self, kind)


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = (
        None  # top-k logprobs per generated token (the sampled one always included)
    )
    prompt_logprobs: int | None = None  # top-k per prompt token
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    detokenize: bool = True
    use_speculation: bool = True  # False: never draft for this request (engine --speculative)
    # Constrained decoding (see structured/); such a request never drafts speculative tokens.
    structured_outputs: StructuredOutputsParams | None = None
    priority_hint: int = field(default=0, repr=False)  # unused; priority is per request
    # Latency targets and workflow membership (see slo_params.py); dicts are accepted. They
    # change only when tokens are computed (scheduling policy slo), never which tokens.
    slo: SloParams | None = None
    workflow: WorkflowParams | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        if self.logit_bias:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        self.slo = to_slo(self.slo)
        self.workflow = to_workflow(self.workflow)
        self.validate()

    def validate(self) -> None:
        def bad(param: str, msg: str) -> InvalidRequestError:
            return InvalidRequestError(f"{param} {msg}", param=param)

        if not _is_int(self.n) or self.n < 1:
            raise bad("n", f"must be an integer >= 1, got {self.n!r}")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise bad("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if not _in_range(self.temperature, 0.0, MAX_TEMPERATURE):
            limit = f">= 0 and <= {MAX_TEMPERATURE:g}"
            raise bad("temperature", f"must be {limit}, got {self.temperature}")
        if not _in_range(self.top_p, 0.0, 1.0) or self.top_p == 0.0:
            raise bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if not _is_int(self.top_k) or not -1 <= self.top_k <= MAX_TOP_K:
            raise bad(
                "top_k",
                f"must be 0 or -1 (disabled) or >= 1 and <= {MAX_TOP_K}, got {self.top_k!r}",
            )
        if not _in_range(self.min_p, 0.0, 1.0):
            raise bad("min_p", f"must be in [0, 1], got {self.min_p}")
        lo, hi = MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY
        if not _in_range(self.repetition_penalty, lo, hi):
            raise bad(
                "repetition_penalty",
                f"must be > 0, in [{lo:g}, {hi:g}] (1: no penalty), got {self.repetition_penalty}",
            )
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _in_range(v, -MAX_PENALTY, MAX_PENALTY):
                raise bad(name, f"must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {v}")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise bad("min_tokens", f"must be >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad(
                "min_tokens", f"must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}"
            )
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or not 0 <= v <= MAX_LOGPROBS):
                raise bad(name, f"must be an integer in [0, {MAX_LOGPROBS}], got {v!r}")
        seed = self.seed
        if seed is not None and (not _is_int(seed) or not SEED_MIN <= seed <= SEED_MAX):
            raise bad("seed", f"must be an integer in [-2^63, 2^64 - 1], got {seed!r}")
        for tok, bias in (self.logit_bias or {}).items():
            if not _in_range(bias, -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS):
                raise bad(
                    "logit_bias",
                    f"values must be in [-{MAX_LOGIT_BIAS:g}, "
                    f"{MAX_LOGIT_BIAS:g}], got {bias} for {tok}",
                )
        if len(self.stop) > MAX_STOP_STRINGS:
            raise bad("stop", f"may hold at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise bad("stop", f"strings must be non-empty, got {s!r}")
            if len(s) > MAX_STOP_STRING_CHARS:
                raise bad(
                    "stop",
                    f"strings must be at most {MAX_STOP_STRING_CHARS} characters, got {len(s)}",
                )
        for tok in self.stop_token_ids:
            if not _is_int(tok) or tok < 0:
                raise bad("stop_token_ids", f"must be token ids >= 0, got {tok!r}")
        so = self.structured_outputs
        if so is not None and not isinstance(so, StructuredOutputsParams):
            raise bad("structured_outputs", f"must be StructuredOutputsParams, got {type(so)}")

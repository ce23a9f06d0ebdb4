"""Forced runs on the default model (batch-invariant fp32, where a row's bits do not depend on
how many rows share a matmul): appending the tokens a grammar allows alone, unsampled, gives
exactly the tokens of token-by-token masked decoding -- greedy and seeded, for JSON
schemas, regex, choice and EBNF, in a mixed batch, with n > 1, short max_tokens, and under
preemption with prefix caching."""

from __future__ import annotations

import json

import jsonschema
import pytest

from tokenmill import SamplingParams, StructuredOutputsParams
from tokenmill.structured.grammar import RequestGrammar

pytestmark = pytest.mark.slow  # the default model, end to end

FP32 = dict(dtype="float32", quantization="none", batch_invariant=True)


def obj(props: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None
            else required}  # fmt: skip


NAME = {"type": "string", "maxLength": 8}
SCHEMAS = [
    obj({"name": NAME, "color": {"enum": ["red", "green", "blue"]}}),  # fixed keys, an enum
    obj({"level": {"const": "high"}, "count": {"type": "integer", "minimum": 1, "maximum": 5}}),
    obj({"user": obj({"first_name": NAME, "role": {"enum": ["administrator", "guest"]}})}),
    obj(
        {
            "ok": {"type": "boolean"},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
        }
    ),
    {"enum": ["yes", "no", 1, None]},
]
OTHER_SPECS = [
    StructuredOutputsParams(regex=r"[A-Z][a-z]{1,6} [0-9]{2}"),
    StructuredOutputsParams(choice=["Washington", "Wellington", "Paris"]),
    StructuredOutputsParams(grammar='root ::= "(" [0-9]+ ("," [0-9]+)* ")"'),
]
PROMPT = "Answer in JSON about a city:"


@pytest.fixture(scope="module")
def forced_llm():
    """The shared fp32 engine's settings with forced runs on."""
    from tokenmill import LLM

    return LLM(kv_cache_memory_gb=0.5, max_forced_tokens=16, **FP32)


@pytest.fixture
def reference_llm(default_llm_fp32):
    """The shared engine has forced runs off: token-by-token masked decoding."""
    assert default_llm_fp32.engine.scheduler.config.max_forced_tokens == 0
    return default_llm_fp32


@pytest.fixture
def forced_count(monkeypatch) -> list[int]:
    """How many tokens the engine's grammars forced during the test."""
    count = [0]
    original = RequestGrammar.forced_tokens

    def counting(self: RequestGrammar, max_n: int) -> list[int]:
        tokens = original(self, max_n)
        count[0] += len(tokens)
        return tokens

    monkeypatch.setattr(RequestGrammar, "forced_tokens", counting)
    return count


def params_set(max_tokens: int = 48) -> list[SamplingParams]:
    specs = [StructuredOutputsParams(json=s) for s in SCHEMAS] + OTHER_SPECS
    out = [SamplingParams(temperature=0.0, max_tokens=max_tokens, structured_outputs=s)
           for s in specs]  # fmt: skip
    out += [
        SamplingParams(temperature=1.0, seed=i, max_tokens=max_tokens, structured_outputs=s)
        for i, s in enumerate(specs[:3])
    ]
    out.append(SamplingParams(temperature=0.0, max_tokens=max_tokens))  # a free one beside them
    return out


def token_ids(outs) -> list[list[list[int]]]:
    return [[c.token_ids for c in o.outputs] for o in outs]


def test_forced_runs_give_token_by_token_outputs_in_a_mixed_batch(
    forced_llm, reference_llm, forced_count
) -> None:
    params = params_set()
    prompts = [PROMPT] * len(params)
    outs = forced_llm.generate(prompts, params, use_tqdm=False)
    num_forced = forced_count[0]
    refs = reference_llm.generate(prompts, params, use_tqdm=False)
    assert num_forced > 0 and forced_count[0] == num_forced  # off in the reference
    assert token_ids(outs) == token_ids(refs)
    for p, out in zip(params[: len(SCHEMAS)], outs, strict=False):
        assert out.outputs[0].finish_reason == "stop"
        jsonschema.validate(json.loads(out.outputs[0].text), p.structured_outputs.json)
    # One at a time too: nothing depends on the batch.
    for prompt, p, out in list(zip(prompts, params, outs, strict=True))[:3]:
        (alone,) = forced_llm.generate([prompt], p, use_tqdm=False)
        assert alone.outputs[0].token_ids == out.outputs[0].token_ids


@pytest.mark.parametrize("max_tokens", [1, 2, 5, 13])
def test_forced_runs_never_pass_max_tokens(forced_llm, reference_llm, max_tokens) -> None:
    params = params_set(max_tokens)
    prompts = [PROMPT] * len(params)
    outs = forced_llm.generate(prompts, params, use_tqdm=False)
    refs = reference_llm.generate(prompts, params, use_tqdm=False)
    assert token_ids(outs) == token_ids(refs)
    for out, ref in zip(outs, refs, strict=True):
        c = out.outputs[0]
        assert len(c.token_ids) <= max_tokens
        assert c.finish_reason == ref.outputs[0].finish_reason


def test_forced_runs_under_preemption_with_prefix_caching_and_n(
    make_llm, reference_llm, forced_count
) -> None:
    tight = make_llm(
        num_kv_blocks=6, enable_prefix_caching=True, max_model_len=80, max_forced_tokens=16, **FP32
    )
    schema = SCHEMAS[2]
    prompts = [
        "The history of the printing press begins in 1440, when Johannes Gutenberg built",
        "Another long prompt about the mountains and rivers of northern Europe in winter",
        "The history of the printing press begins in 1440, when Johannes Gutenberg built",
    ]
    spec = StructuredOutputsParams(json=schema)
    params = [
        SamplingParams(temperature=0.0, max_tokens=40, structured_outputs=spec),
        SamplingParams(temperature=1.0, seed=4, max_tokens=40, structured_outputs=spec, n=2),
        SamplingParams(temperature=1.0, seed=5, max_tokens=40, structured_outputs=spec),
    ]
    outs = tight.generate(prompts, params, use_tqdm=False)
    assert tight.engine.scheduler.num_preemptions > 0 and forced_count[0] > 0
    refs = reference_llm.generate(prompts, params, use_tqdm=False)  # no preemption there
    assert token_ids(outs) == token_ids(refs)
    for out in outs:
        for c in out.outputs:
            jsonschema.validate(json.loads(c.text), schema)

"""Structured output through the offline `LLM` API on the default model: JSON Schema outputs
validate, regex and choice outputs match, constrained and free requests do not disturb each
other, preemption keeps the grammar in step, and a bad spec rejects the call."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from tokenmill import SamplingParams, StructuredOutputsParams
from tokenmill.errors import InvalidRequestError

pytestmark = pytest.mark.slow  # the default model, end to end


def obj(props: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None
            else required}  # fmt: skip


NAME = {"type": "string", "maxLength": 8}
DIGIT = {"type": "integer", "minimum": -9, "maximum": 9}
# Small schemas with bounded strings and arrays: each output takes a few dozen tokens at most,
# so "length" never cuts one short and every output must validate.
SCHEMAS = [
    obj({"name": NAME}),
    obj({"age": {"type": "integer", "minimum": 0, "maximum": 120}}),
    obj({"ok": {"type": "boolean"}}),
    obj({"color": {"enum": ["red", "green", "blue"]}}),
    obj({"score": {"type": "number", "minimum": 0, "maximum": 10}}),
    obj({"tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 3}}),
    obj({"point": obj({"x": DIGIT, "y": DIGIT})}),
    obj({"name": NAME, "nick": NAME}, required=["name"]),
    obj({"id": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 999}, NAME]}}),
    obj({"zip": {"type": "string", "pattern": "^[0-9]{5}$"}}),
    obj({"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{2}$"}}),
    {"type": "array", "items": DIGIT, "minItems": 1, "maxItems": 4},
    obj({"user": obj({"name": NAME, "role": {"enum": ["admin", "guest"]}})}),
    obj({"n": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 100}}),
    obj({"v": {"anyOf": [{"type": "boolean"}, {"type": "null"}]}}),
    obj({"items": {"type": "array", "items": obj({"k": {"enum": ["x", "y"]}}), "maxItems": 2}}),
    obj({"level": {"const": "high"}, "count": {"type": "integer", "minimum": 1, "maximum": 5}}),
    {"enum": ["yes", "no", 1, None]},
    obj({"title": {"type": "string", "minLength": 2, "maxLength": 6}}),
    obj({"temp": {"type": "number", "minimum": -50, "maximum": 50}, "unit": {"enum": ["C", "F"]}}),
    obj({"a": obj({"b": obj({"c": {"type": "boolean"}})})}),
    obj({"opt": {"type": "integer", "minimum": 0, "maximum": 3}}, required=[]),
]
MESSAGES = [{"role": "user", "content": "Answer in JSON."}]


def constrained(spec: StructuredOutputsParams, temperature: float = 0.0, **kw) -> SamplingParams:
    return SamplingParams(temperature=temperature, max_tokens=40, structured_outputs=spec, **kw)


def test_json_schema_outputs_validate_at_temperature_0_and_1(default_llm_fp32) -> None:
    params = [
        constrained(StructuredOutputsParams(json=schema), t, seed=i)
        for t in (0.0, 1.0)
        for i, schema in enumerate(SCHEMAS)
    ]
    outs = default_llm_fp32.chat([MESSAGES] * len(params), params, use_tqdm=False)
    for p, out in zip(params, outs, strict=True):
        c = out.outputs[0]
        assert c.finish_reason == "stop", (c.text, p.structured_outputs.json)
        jsonschema.validate(json.loads(c.text), p.structured_outputs.json)


REGEX = r"[A-Z][a-z]{1,6} [0-9]{2}"
CHOICES = ["Paris", "London", 'a "quoted" city']


def test_regex_choice_and_grammar_outputs_match(default_llm_fp32) -> None:
    specs = [
        StructuredOutputsParams(regex=REGEX),
        StructuredOutputsParams(choice=CHOICES),
        StructuredOutputsParams(grammar='root ::= "(" [0-9]+ ("," [0-9]+)* ")"'),
    ]
    params = [constrained(s, t, seed=7) for t in (0.0, 1.0) for s in specs]
    outs = default_llm_fp32.generate(["The capital of France is"] * 6, params, use_tqdm=False)
    texts = [o.outputs[0].text for o in outs]
    for text in texts[::3]:
        assert re.fullmatch(REGEX, text), text
    for text in texts[1::3]:
        assert text in CHOICES
    for text, out in zip(texts[2::3], outs[2::3], strict=True):  # may run to max_tokens
        full = re.fullmatch(r"\([0-9]+(,[0-9]+)*\)", text)
        assert full or re.fullmatch(r"\([0-9,]*", text) and out.outputs[0].finish_reason == "length"


def test_mixed_batch_gives_each_request_what_it_gives_alone(default_llm_fp32) -> None:
    llm = default_llm_fp32
    prompts = ["The capital of France is", "List three colors:", "My favourite number is"]
    params = [
        constrained(StructuredOutputsParams(json=SCHEMAS[6]), 1.0, seed=1),
        SamplingParams(temperature=1.0, seed=2, max_tokens=12),
        constrained(StructuredOutputsParams(regex=r"[0-9]{1,3}"), 1.0, seed=3),
        SamplingParams(temperature=0.0, max_tokens=12),
    ]
    prompts = [*prompts, prompts[0]]
    together = llm.generate(prompts[:4], params, use_tqdm=False)
    for prompt, p, out in zip(prompts, params, together, strict=True):
        (alone,) = llm.generate([prompt], p, use_tqdm=False)
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids


def test_preempted_constrained_requests_stay_valid(make_llm, default_llm_fp32) -> None:
    """Recompute after preemption does not resample the output, so the grammar, which has
    accepted it, stays in step: the outputs match an unpreempted run token for token."""
    kw = dict(dtype="float32", quantization="none", batch_invariant=True, max_model_len=64)
    schema = obj({"name": NAME, "tags": SCHEMAS[5]["properties"]["tags"]})
    prompts = [
        "The history of the printing press begins in 1440, when Johannes Gutenberg built",
        "Another long prompt about the mountains and rivers of northern Europe in winter",
        "A third prompt, about the sea",
    ]
    params = [constrained(StructuredOutputsParams(json=schema), 1.0, seed=i) for i in range(3)]
    tight = make_llm(num_kv_blocks=5, enable_prefix_caching=False, **kw)
    outs = tight.generate(prompts, params, use_tqdm=False)
    assert tight.engine.scheduler.num_preemptions > 0
    refs = default_llm_fp32.generate(prompts, params, use_tqdm=False)  # no preemption there
    for out, ref in zip(outs, refs, strict=True):
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
        jsonschema.validate(json.loads(out.outputs[0].text), schema)


@pytest.mark.parametrize(
    "spec",
    [
        StructuredOutputsParams(json={"type": "object", "properties": {"a": {"type": "nope"}}}),
        StructuredOutputsParams(regex="(unclosed"),
        StructuredOutputsParams(grammar="root ::= undefined_rule"),
    ],
)
def test_bad_spec_rejects_the_call_and_queues_nothing(default_llm_fp32, spec) -> None:
    llm = default_llm_fp32
    params = [SamplingParams(max_tokens=4), constrained(spec)]
    with pytest.raises(InvalidRequestError, match="structured_outputs.* is invalid: "):
        llm.generate(["Hello", "Hello"], params, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    (out,) = llm.generate(["Hello"], SamplingParams(max_tokens=4), use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 4


def test_speculative_engine_drafts_only_for_free_requests(make_llm, default_llm_fp32) -> None:
    """Constrained requests never draft (the mask holds for one position; verify_drafts asserts
    that no constrained row carries drafts); beside them free requests still do, and every
    output is what the engine without speculation gives."""
    llm = make_llm(dtype="float32", quantization="none", batch_invariant=True,
                   speculative="suffix", kv_cache_memory_gb=0.5)  # fmt: skip
    prompt = "one two three four one two three four one two three four one two"
    params = [
        constrained(StructuredOutputsParams(regex=r"( (one|two|three|four)){1,12}"), 0.0),
        SamplingParams(temperature=0.0, max_tokens=24),
    ]
    outs = llm.generate([prompt, prompt], params, use_tqdm=False)
    refs = default_llm_fp32.generate([prompt, prompt], params, use_tqdm=False)
    for out, ref in zip(outs, refs, strict=True):
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
    assert re.fullmatch(r"( (one|two|three|four)){1,12}", outs[0].outputs[0].text)
    assert llm.engine.scheduler.spec_stats.num_drafted_tokens > 0  # the free one drafted


def test_pending_grammar_waits_without_stalling_and_a_failed_one_aborts(
    default_llm_fp32, monkeypatch
) -> None:
    """Grammars compile off the engine's thread: a request whose grammar is not ready is not
    scheduled while free requests run to completion; once it compiles the request runs, and a
    grammar that fails to compile later aborts its request instead of running it."""
    from concurrent.futures import Future

    engine = default_llm_fp32.engine
    manager = engine.structured
    good, bad = Future(), Future()
    real_compile = manager.compile
    pending = {"good": good, "bad": bad}
    monkeypatch.setattr(
        manager, "compile", lambda spec: pending.get(spec.regex) or real_compile(spec)
    )
    engine.add_request("Hello", constrained(StructuredOutputsParams(regex="good")), "g")
    engine.add_request("Hello", constrained(StructuredOutputsParams(regex="bad")), "b")
    engine.add_request("Hello", SamplingParams(temperature=0, max_tokens=3), "free")
    finished = {}
    while "free" not in finished:
        for out in engine.step():
            finished[out.request_id] = out
    assert set(finished) == {"free"}  # the constrained ones waited
    good.set_result(real_compile(StructuredOutputsParams(regex="[a-z]{2}")).result())
    bad.set_exception(InvalidRequestError("structured_outputs.regex is invalid: x", "x"))
    while engine.has_unfinished_requests():
        for out in engine.step():
            finished[out.request_id] = out
    assert re.fullmatch("[a-z]{2}", finished["g"].outputs[0].text)
    assert finished["b"].outputs[0].finish_reason == "abort"
    assert not finished["b"].outputs[0].token_ids

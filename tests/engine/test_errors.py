"""Bad input gives a ValueError naming the field and its limit, and leaves the engine usable."""

from __future__ import annotations

import re

import pytest

from tokenmill import LLM, SamplingParams
from tokenmill.config import EngineConfig
from tokenmill.errors import ContextLengthError, InvalidRequestError

PROMPT = "The capital of France is"


def assert_idle(llm: LLM) -> None:
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    assert not engine.outputs.states
    assert not engine.outputs.sample_of
    assert engine.scheduler.kv_cache_manager.stats().num_used_blocks == 0


# -- SamplingParams: rejected at construction, naming the field and the limit ------------------


@pytest.mark.parametrize(
    ("kwargs", "param", "limit"),
    [
        (dict(max_tokens=0), "max_tokens", ">= 1"),
        (dict(max_tokens=-3), "max_tokens", ">= 1"),
        (dict(temperature=-1), "temperature", ">= 0"),
        (dict(top_p=0.0), "top_p", "(0, 1]"),
        (dict(top_p=1.5), "top_p", "(0, 1]"),
        (dict(top_k=-2), "top_k", ">= 1"),
        (dict(min_p=1.5), "min_p", "[0, 1]"),
        (dict(n=0), "n", ">= 1"),
        (dict(repetition_penalty=0.0), "repetition_penalty", "> 0"),
        (dict(presence_penalty=3.0), "presence_penalty", "[-2, 2]"),
        (dict(frequency_penalty=-2.5), "frequency_penalty", "[-2, 2]"),
        (dict(logprobs=21), "logprobs", "[0, 20]"),
        (dict(prompt_logprobs=-1), "prompt_logprobs", "[0, 20]"),
        (dict(logit_bias={5: 101.0}), "logit_bias", "[-100, 100]"),
        (dict(stop=["ok", ""]), "stop", "non-empty"),
        (dict(min_tokens=-1), "min_tokens", ">= 0"),
        (dict(min_tokens=5, max_tokens=4), "min_tokens", "<= max_tokens (4)"),
        (dict(temperature=2.5), "temperature", "<= 2"),
        (dict(temperature=float("nan")), "temperature", ">= 0"),
        (dict(top_p=float("nan")), "top_p", "(0, 1]"),
        (dict(top_k=2**40), "top_k", "<= 2147483647"),
        (dict(repetition_penalty=1e30), "repetition_penalty", "[0.01, 2]"),
        (dict(repetition_penalty=1e-40), "repetition_penalty", "[0.01, 2]"),
        (dict(presence_penalty=float("inf")), "presence_penalty", "[-2, 2]"),
        (dict(logit_bias={5: float("nan")}), "logit_bias", "[-100, 100]"),
        (dict(seed=2**64), "seed", "2^64 - 1"),
        (dict(seed=-(2**63) - 1), "seed", "[-2^63"),
        (dict(stop=["x"] * 17), "stop", "at most 16"),
        (dict(stop="x" * 257), "stop", "at most 256 characters"),
        (dict(stop_token_ids=[3, -1]), "stop_token_ids", ">= 0"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_sampling_params(kwargs, param: str, limit: str) -> None:
    with pytest.raises(ValueError) as ei:
        SamplingParams(**kwargs)
    assert isinstance(ei.value, InvalidRequestError)
    assert ei.value.param == param
    msg = str(ei.value)
    assert re.match(rf"{param}\b", msg), msg
    assert limit in msg, msg


@pytest.mark.slow
def test_params_mutated_after_construction_are_checked_again(default_llm_fp32) -> None:
    params = SamplingParams(temperature=0, max_tokens=2)
    params.temperature = -1.0
    with pytest.raises(ValueError, match=r"temperature must be >= 0"):
        default_llm_fp32.generate(PROMPT, params, use_tqdm=False)
    assert_idle(default_llm_fp32)


# -- prompts ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_prompt_longer_than_context(make_llm) -> None:
    llm = make_llm(dtype="float32", max_model_len=64, kv_cache_memory_gb=0.05)
    assert llm.engine.max_model_len == 64
    tok = llm.get_tokenizer()
    long_ids = tok.encode("hello " * 100)[:64]
    assert len(long_ids) == 64
    for prompt in (long_ids, "hello " * 100):
        with pytest.raises(ValueError) as ei:
            llm.generate(prompt, SamplingParams(max_tokens=1), use_tqdm=False)
        msg = str(ei.value)
        assert ei.value.param == "prompt"
        assert "prompt" in msg and "64" in msg, msg
        assert_idle(llm)
    # 63 tokens leave room for exactly one more
    (out,) = llm.generate(
        long_ids[:63], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False
    )
    c = out.outputs[0]
    assert len(c.token_ids) == 1 and c.finish_reason == "length"


@pytest.mark.slow
def test_max_model_len_above_the_model_context(make_llm) -> None:
    with pytest.raises(ValueError, match=r"max_model_len=10000000 exceeds"):
        make_llm(dtype="float32", max_model_len=10_000_000)


@pytest.mark.slow
@pytest.mark.parametrize("prompt", ["", {"prompt_token_ids": []}, {"prompt": ""}])
def test_empty_prompt(default_llm_fp32, prompt) -> None:
    with pytest.raises(ValueError) as ei:
        default_llm_fp32.generate(prompt, SamplingParams(max_tokens=1), use_tqdm=False)
    assert "prompt" in str(ei.value) and "empty" in str(ei.value)
    assert_idle(default_llm_fp32)


@pytest.mark.slow
@pytest.mark.parametrize("bad", [49152, 10**9, -1])
def test_token_id_outside_vocab(default_llm_fp32, bad: int) -> None:
    vocab = default_llm_fp32.engine.model_config.vocab_size
    assert vocab == 49152
    with pytest.raises(ValueError) as ei:
        default_llm_fp32.generate([1, 2, bad], SamplingParams(max_tokens=1), use_tqdm=False)
    msg = str(ei.value)
    assert "prompt" in msg and str(vocab) in msg and str(bad) in msg, msg
    assert_idle(default_llm_fp32)


@pytest.mark.slow
def test_prompt_dict_without_prompt(default_llm_fp32) -> None:
    with pytest.raises(ValueError, match="prompt_token_ids"):
        default_llm_fp32.generate({"text": "hi"}, use_tqdm=False)
    assert_idle(default_llm_fp32)


@pytest.mark.slow
@pytest.mark.parametrize("bad", [49152, -1])
def test_logit_bias_token_out_of_range(default_llm_fp32, bad: int) -> None:
    params = SamplingParams(max_tokens=1, logit_bias={bad: 5.0})
    with pytest.raises(ValueError) as ei:
        default_llm_fp32.generate(PROMPT, params, use_tqdm=False)
    msg = str(ei.value)
    assert ei.value.param == "logit_bias"
    assert "logit_bias" in msg and str(bad) in msg and "49152" in msg, msg
    assert_idle(default_llm_fp32)


@pytest.mark.slow
def test_limits_that_need_the_model(default_llm_fp32) -> None:
    """stop_token_ids against the vocabulary, priority as a 64-bit integer, min_tokens against
    the context: refused before anything runs."""
    llm = default_llm_fp32
    context = llm.engine.max_seq_len
    cases = [
        (SamplingParams(max_tokens=1, stop_token_ids=[2, 49152]), 0, "stop_token_ids", "49152"),
        (SamplingParams(max_tokens=1), 2**70, "priority", "2^63 - 1"),
        (SamplingParams(max_tokens=None, min_tokens=context), 0, "min_tokens", str(context)),
    ]
    for params, priority, param, limit in cases:
        with pytest.raises(ValueError) as ei:
            llm.generate(PROMPT, params, use_tqdm=False, priority=[priority])
        assert ei.value.param == param and limit in str(ei.value), str(ei.value)
        assert_idle(llm)
    # the bounds themselves are fine
    params = SamplingParams(max_tokens=1, stop_token_ids=[49151], min_tokens=1)
    (out,) = llm.generate(PROMPT, params, use_tqdm=False, priority=[-(2**63)])
    assert len(out.outputs[0].token_ids) == 1
    assert_idle(llm)


@pytest.mark.slow
def test_mismatched_params_and_priorities(default_llm_fp32) -> None:
    llm = default_llm_fp32
    with pytest.raises(ValueError, match="2 sampling_params for 3 prompts"):
        llm.generate(["a", "b", "c"], [SamplingParams(), SamplingParams()], use_tqdm=False)
    with pytest.raises(ValueError, match="1 priorities for 2 prompts"):
        llm.generate(["a", "b"], SamplingParams(), use_tqdm=False, priority=[0])
    assert_idle(llm)


# -- a bad request does not break the engine -------------------------------------------------------


@pytest.mark.slow
def test_bad_request_in_batch_rejects_the_call_and_engine_recovers(default_llm_fp32) -> None:
    llm = default_llm_fp32
    params = SamplingParams(temperature=0, max_tokens=3)
    (ref,) = llm.generate(PROMPT, params, use_tqdm=False)
    for bad in ("", [1, 49152]):
        with pytest.raises(ValueError):
            llm.generate([PROMPT, "Once upon a time", bad], params, use_tqdm=False)
        assert_idle(llm)  # the good prompts before the bad one were withdrawn
    outs = llm.generate([PROMPT, "Once upon a time"], params, use_tqdm=False)
    assert outs[0].outputs[0].token_ids == ref.outputs[0].token_ids
    assert len(outs[1].outputs[0].token_ids) == 3
    assert_idle(llm)


@pytest.mark.slow
def test_duplicate_request_id_at_engine_level(default_llm_fp32) -> None:
    engine = default_llm_fp32.engine
    params = SamplingParams(temperature=0, max_tokens=2)
    engine.add_request(PROMPT, params, request_id="dup")
    try:
        with pytest.raises(ValueError, match="request_id 'dup'"):
            engine.add_request(PROMPT, params, request_id="dup")
    finally:
        engine.abort_request("dup")
    assert_idle(default_llm_fp32)


@pytest.mark.slow
def test_request_id_clashing_with_a_sample_id(default_llm_fp32) -> None:
    """The n samples of request "g" run as "g#0" ... "g#(n-1)": no other request may take one
    of those ids, whichever comes first; the refused one leaves nothing behind."""
    engine = default_llm_fp32.engine
    params = SamplingParams(temperature=0, max_tokens=2)
    engine.add_request(PROMPT, SamplingParams(temperature=0, max_tokens=2, n=2), "g")
    engine.add_request(PROMPT, params, request_id="h#1")
    try:
        with pytest.raises(ValueError, match="request_id 'g#1' is already in use") as ei:
            engine.add_request(PROMPT, params, request_id="g#1")
        assert ei.value.param == "request_id"
        with pytest.raises(ValueError, match="request_id 'h#1' is already in use"):
            engine.add_request(PROMPT, SamplingParams(max_tokens=2, n=2), request_id="h")
        assert set(engine.outputs.states) == {"g", "h#1"}
        assert set(engine.outputs.sample_of) == {"g#0", "g#1", "h#1"}
    finally:
        engine.abort_request("g")
        engine.abort_request("h#1")
    assert_idle(default_llm_fp32)


@pytest.mark.slow
def test_check_request_is_what_add_request_checks(default_llm_fp32) -> None:
    engine = default_llm_fp32.engine
    info = engine.model_info
    assert (info.name, info.max_seq_len, info.vocab_size) == (
        engine.model_name,
        engine.max_seq_len,
        49152,
    )
    limit = info.max_seq_len
    params = SamplingParams(max_tokens=limit)
    engine.check_request([1, 2], params)  # add_request cuts such a max_tokens to fit
    with pytest.raises(ContextLengthError) as ei:
        engine.check_request([1, 2], params, max_tokens_must_fit=True)
    assert ei.value.param == "max_tokens" and str(limit + 2) in str(ei.value)
    with pytest.raises(InvalidRequestError, match="prompt must not be empty"):
        engine.check_request([], SamplingParams(max_tokens=1))
    with pytest.raises(InvalidRequestError, match="priority"):
        engine.check_request([1], SamplingParams(max_tokens=1), 2**70)
    assert_idle(default_llm_fp32)


@pytest.mark.slow
def test_abort_mid_generation_frees_blocks(default_llm_fp32) -> None:
    engine = default_llm_fp32.engine
    rid = engine.add_request(PROMPT, SamplingParams(temperature=0, max_tokens=50, n=2))
    engine.step()
    engine.step()
    out = engine.abort_request(rid)
    assert out is not None
    assert [c.finish_reason for c in out.outputs] == ["abort", "abort"]
    assert engine.abort_request(rid) is None  # a second abort is a no-op
    assert_idle(default_llm_fp32)


# -- engine construction ---------------------------------------------------------------------------


def test_unknown_llm_keyword() -> None:
    with pytest.raises(TypeError, match="unknown_kw"):
        LLM(unknown_kw=1)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(kv_cache_memory_gb=0), "kv_cache_memory_gb"),
        (dict(block_size=0), "block_size"),
        (dict(max_num_batched_tokens=0), "max_num_batched_tokens"),
        (dict(max_num_seqs=0), "max_num_seqs"),
        (dict(scheduling_policy="lifo"), "scheduling_policy"),
        (dict(dtype="int3"), "dtype"),
    ],
)
def test_bad_engine_config(kwargs, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        EngineConfig(**kwargs)


@pytest.mark.slow
def test_kv_budget_too_small_for_max_model_len() -> None:
    with pytest.raises(ValueError) as ei:
        LLM(kv_cache_memory_gb=0.0001, dtype="float32")
    msg = str(ei.value)
    assert "max_model_len" in msg and "kv_cache_memory_gb" in msg, msg
    assert "needs" in msg

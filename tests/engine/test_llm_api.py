"""The offline `LLM` API on the default model: prompt forms, output fields, n, logprobs, stops,
seeds, penalties, chat and priorities."""

from __future__ import annotations

import math

import pytest

from tokenmill import LLM, SamplingParams
from tokenmill.outputs import CompletionOutput, RequestOutput

pytestmark = pytest.mark.slow  # the default model, end to end

PROMPT = "The capital of France is"
# Greedy fp32 continuation of PROMPT (checked below): ' Paris.\n\nThe answer is: 2018-01-22 ...'
# ending in EOS after 30 tokens.
EOS_AFTER = 64  # max_tokens for the run that ends on EOS

_GREEDY: dict[tuple[int, str, int], RequestOutput] = {}


def greedy(llm: LLM, prompt: str = PROMPT, max_tokens: int = EOS_AFTER) -> RequestOutput:
    """Greedy output of `prompt`, memoized per engine (these runs cost seconds)."""
    key = (id(llm), prompt, max_tokens)
    if key not in _GREEDY:
        params = SamplingParams(temperature=0, max_tokens=max_tokens)
        _GREEDY[key] = llm.generate(prompt, params, use_tqdm=False)[0]
    return _GREEDY[key]


def gen(llm: LLM, prompts, **kw) -> list[RequestOutput]:
    return llm.generate(prompts, SamplingParams(**kw), use_tqdm=False)


def one(llm: LLM, prompt, **kw) -> CompletionOutput:
    (out,) = gen(llm, prompt, **kw)
    assert out.finished
    assert len(out.outputs) == 1
    return out.outputs[0]


def num_repeats(ids: list[int]) -> int:
    return len(ids) - len(set(ids))


# -- prompt forms and output fields --------------------------------------------------------------


def test_greedy_reference_ends_on_eos(default_llm_fp32) -> None:
    llm = default_llm_fp32
    tok = llm.get_tokenizer()
    out = greedy(llm)
    c = out.outputs[0]
    assert out.prompt == PROMPT
    assert out.prompt_token_ids == tok.encode(PROMPT)
    assert c.text.startswith(" Paris")
    assert c.finish_reason == "stop"
    assert c.stop_reason is None  # EOS, not a stop string or stop token id
    assert c.token_ids[-1] in tok.eos_token_ids
    assert len(c.token_ids) < EOS_AFTER
    assert c.text == tok.decode(c.token_ids)


def test_prompt_forms_agree(default_llm_fp32) -> None:
    llm = default_llm_fp32
    tok = llm.get_tokenizer()
    ids = tok.encode(PROMPT)
    other = "def fibonacci(n):"
    kw = dict(temperature=0, max_tokens=6)
    ref = greedy(llm).outputs[0].token_ids[:6]

    (by_str,) = gen(llm, PROMPT, **kw)
    (by_ids,) = gen(llm, ids, **kw)
    (by_dict,) = gen(llm, {"prompt": PROMPT}, **kw)
    (by_dict_ids,) = gen(llm, {"prompt_token_ids": ids}, **kw)
    batch = gen(llm, [PROMPT, other, ids, {"prompt_token_ids": ids, "prompt": "named"}], **kw)
    assert len(batch) == 4

    for out in (by_str, by_ids, by_dict, by_dict_ids, batch[0], batch[2], batch[3]):
        assert out.prompt_token_ids == ids
        assert out.outputs[0].token_ids == ref
        assert out.outputs[0].finish_reason == "length"
        assert len(out.outputs[0].token_ids) == 6
    assert by_str.prompt == PROMPT and by_dict.prompt == PROMPT
    assert by_ids.prompt is None and by_dict_ids.prompt is None
    assert batch[3].prompt == "named"
    assert batch[1].prompt == other
    assert batch[1].prompt_token_ids == tok.encode(other)
    assert batch[1].outputs[0].token_ids != ref
    assert len({o.request_id for o in batch}) == 4


def test_list_of_token_id_lists(default_llm_fp32) -> None:
    llm = default_llm_fp32
    tok = llm.get_tokenizer()
    a, b = tok.encode(PROMPT), tok.encode("The quick brown fox")
    outs = gen(llm, [a, b], temperature=0, max_tokens=3)
    assert [o.prompt_token_ids for o in outs] == [a, b]
    assert outs[0].outputs[0].token_ids == greedy(llm).outputs[0].token_ids[:3]


def test_output_fields(default_llm_fp32) -> None:
    llm = default_llm_fp32
    tok = llm.get_tokenizer()
    (out,) = gen(llm, "Once upon a time", temperature=0, max_tokens=5)
    assert isinstance(out, RequestOutput)
    assert out.finished
    assert out.prompt == "Once upon a time"
    assert out.prompt_token_ids == tok.encode("Once upon a time")
    assert out.prompt_logprobs is None
    (c,) = out.outputs
    assert c.index == 0
    assert len(c.token_ids) == 5
    assert c.finish_reason == "length"
    assert c.stop_reason is None
    assert c.logprobs is None and c.cumulative_logprob is None
    assert c.text and c.text == tok.decode(c.token_ids)


def test_max_tokens_caps_output(default_llm_fp32) -> None:
    llm = default_llm_fp32
    ref = greedy(llm).outputs[0].token_ids
    for m in (1, 2, 7):
        c = one(llm, PROMPT, temperature=0, max_tokens=m)
        assert c.token_ids == ref[:m]
        assert c.finish_reason == "length"


def test_ignore_eos_runs_past_eos(default_llm_fp32) -> None:
    llm = default_llm_fp32
    tok = llm.get_tokenizer()
    ref = greedy(llm).outputs[0].token_ids
    n = len(ref) + 2
    c = one(llm, PROMPT, temperature=0, max_tokens=n, ignore_eos=True)
    assert len(c.token_ids) == n
    assert c.token_ids[: len(ref)] == ref  # the EOS is emitted, then generation goes on
    assert c.finish_reason == "length"
    assert c.text == tok.decode(c.token_ids)


# -- stops ---------------------------------------------------------------------------------------


def test_stop_string_from_the_middle(default_llm_fp32) -> None:
    llm = default_llm_fp32
    full = greedy(llm).outputs[0].text
    mid = len(full) // 2
    stop = full[mid : mid + 4]
    assert stop.strip(), f"pick another stop in {full!r}"
    expected = full[: full.index(stop)]
    c = one(llm, PROMPT, temperature=0, max_tokens=EOS_AFTER, stop=stop)
    assert c.text == expected
    assert c.finish_reason == "stop"
    assert c.stop_reason == stop
    assert len(c.token_ids) < len(greedy(llm).outputs[0].token_ids)

    # include_stop_str_in_output keeps the stop string, and the text still ends there
    c2 = one(
        llm,
        PROMPT,
        temperature=0,
        max_tokens=EOS_AFTER,
        stop=[stop],
        include_stop_str_in_output=True,
    )
    assert c2.text == expected + stop
    assert c2.finish_reason == "stop" and c2.stop_reason == stop


def test_stop_string_spanning_tokens(default_llm_fp32) -> None:
    llm = default_llm_fp32
    full = greedy(llm).outputs[0].text
    stop = "answer is"  # ' answer' + ' is': two tokens
    assert stop in full
    c = one(llm, PROMPT, temperature=0, max_tokens=EOS_AFTER, stop=["no-such-stop", stop])
    assert c.text == full[: full.index(stop)]
    assert c.stop_reason == stop


def test_stop_token_ids(default_llm_fp32) -> None:
    llm = default_llm_fp32
    ref = greedy(llm).outputs[0].token_ids
    # the first token from the 4th on that did not occur before it
    i = next(i for i in range(3, len(ref) - 1) if ref[i] not in ref[:i])
    stop_id = ref[i]
    c = one(llm, PROMPT, temperature=0, max_tokens=EOS_AFTER, stop_token_ids=[stop_id])
    assert c.token_ids == ref[: i + 1]  # the stop token is part of the output ids
    assert c.finish_reason == "stop"
    assert c.stop_reason == stop_id


# -- n, seeds, logprobs --------------------------------------------------------------------------


def test_n_samples_seeded_distinct_reproducible_and_share_prefix(default_llm_fp32) -> None:
    llm = default_llm_fp32
    tok = llm.get_tokenizer()
    prompt = (
        "Here is a long story about a brave little robot who lived on a quiet farm and dreamed "
        "of seeing the ocean one day. Every evening it watched the sun go down behind the hills. "
        "One morning, the robot"
    )
    num_prompt = len(tok.encode(prompt))
    block = llm.engine.config.block_size
    assert num_prompt > 2 * block  # the siblings can share at least two full blocks
    kv = llm.engine.scheduler.kv_cache_manager
    params = SamplingParams(n=3, seed=7, temperature=1.0, max_tokens=6, ignore_eos=True)

    hits0 = kv.prefix_hits
    (first,) = llm.generate(prompt, params, use_tqdm=False)
    sibling_hits = kv.prefix_hits - hits0
    (second,) = llm.generate(prompt, params, use_tqdm=False)

    assert first.finished and len(first.outputs) == 3
    assert [c.index for c in first.outputs] == [0, 1, 2]
    samples = [tuple(c.token_ids) for c in first.outputs]
    assert all(len(s) == 6 for s in samples)
    assert len(set(samples)) == 3, f"samples are not distinct: {samples}"
    assert [tuple(c.token_ids) for c in second.outputs] == samples
    assert [c.text for c in second.outputs] == [c.text for c in first.outputs]
    # samples 1 and 2 reuse sample 0's prompt KV: every full block but the one holding the
    # last prompt token (which must be recomputed to get logits)
    shared = (num_prompt - 1) // block * block
    assert sibling_hits >= 2 * shared
    assert second.num_cached_tokens >= shared  # the second call hits the cache from the start


def test_seed_reproducible_and_different_seeds_differ(default_llm_fp32) -> None:
    llm = default_llm_fp32
    kw = dict(temperature=1.0, max_tokens=8, ignore_eos=True)
    prompts = ["Once upon a time", "My favourite food is"]
    a = gen(llm, prompts, seed=123, **kw)
    b = gen(llm, prompts[::-1], seed=123, **kw)  # another batch order: same tokens
    c = gen(llm, prompts, seed=124, **kw)
    for x, y in zip(a, b[::-1], strict=True):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
    assert [o.outputs[0].token_ids for o in a] != [o.outputs[0].token_ids for o in c]
    assert a[0].outputs[0].token_ids != c[0].outputs[0].token_ids


def test_logprobs_greedy(default_llm_fp32) -> None:
    llm = default_llm_fp32
    ref = greedy(llm).outputs[0].token_ids
    c = one(llm, PROMPT, temperature=0, max_tokens=5, logprobs=3)
    assert c.token_ids == ref[:5]
    assert c.logprobs is not None and len(c.logprobs) == 5
    total = 0.0
    for tok_id, entry in zip(c.token_ids, c.logprobs, strict=True):
        assert tok_id in entry
        assert entry[tok_id].rank == 1  # greedy picks the most likely token
        ranks = sorted(lp.rank for lp in entry.values())
        assert ranks == [1, 2, 3]  # the sampled token is one of the top 3
        values = sorted(entry.values(), key=lambda lp: lp.rank)
        assert all(lp.logprob <= 0 for lp in values)
        assert all(a.logprob >= b.logprob for a, b in zip(values, values[1:], strict=False))
        assert entry[tok_id].decoded_token == llm.get_tokenizer().decode(
            [tok_id], skip_special_tokens=False
        )
        total += entry[tok_id].logprob
    assert c.cumulative_logprob == pytest.approx(total, abs=1e-4)


def test_logprobs_sampled_token_always_included(default_llm_fp32) -> None:
    llm = default_llm_fp32
    c = one(
        llm, "Once upon a time", temperature=1.5, max_tokens=8, logprobs=1, seed=5, ignore_eos=True
    )
    assert c.logprobs is not None and len(c.logprobs) == 8
    for tok_id, entry in zip(c.token_ids, c.logprobs, strict=True):
        assert tok_id in entry
        top = [t for t, lp in entry.items() if lp.rank == 1]
        assert len(top) == 1
        assert len(entry) == (1 if tok_id == top[0] else 2)
        if tok_id != top[0]:
            assert entry[tok_id].rank > 1
            assert entry[tok_id].logprob <= entry[top[0]].logprob
        assert math.isfinite(entry[tok_id].logprob)


def test_prompt_logprobs(default_llm_fp32) -> None:
    llm = default_llm_fp32
    (out,) = gen(llm, PROMPT, temperature=0, max_tokens=1, prompt_logprobs=2)
    ids = out.prompt_token_ids
    plp = out.prompt_logprobs
    assert plp is not None and len(plp) == len(ids)
    assert plp[0] is None
    for tok_id, entry in zip(ids[1:], plp[1:], strict=True):
        assert entry is not None
        assert tok_id in entry  # the actual prompt token, whatever its rank
        ranks = sorted(lp.rank for lp in entry.values())
        assert ranks[:2] == [1, 2]
        assert len(entry) in (2, 3)
        assert all(lp.logprob <= 0 for lp in entry.values())
    # " of" after "The capital" is the model's first choice
    assert plp[2][ids[2]].rank == 1


def _plp_values(out: RequestOutput) -> list[float | None]:
    return [
        None if e is None else e[t].logprob
        for t, e in zip(out.prompt_token_ids, out.prompt_logprobs, strict=True)
    ]


def test_prompt_logprobs_complete_after_prefix_cache_hit(default_llm_fp32) -> None:
    """A prompt whose prefix is already cached still gets a logprob for every prompt token."""
    llm = default_llm_fp32
    prompt = (
        "The history of the printing press begins in 1440, when Johannes Gutenberg built a "
        "machine in Mainz that could print pages quickly."
    )
    n = len(llm.get_tokenizer().encode(prompt))
    assert n > llm.engine.config.block_size
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    (first,) = llm.generate(prompt, params, use_tqdm=False)
    (second,) = llm.generate(prompt, params, use_tqdm=False)  # the prefix is now cached
    assert len(first.prompt_logprobs) == n
    assert len(second.prompt_logprobs) == n
    assert _plp_values(second) == pytest.approx(_plp_values(first), abs=1e-4)


def test_prompt_logprobs_with_n_samples(default_llm_fp32) -> None:
    """n samples share one prompt: its logprobs are reported once, not once per sample."""
    llm = default_llm_fp32
    prompt = (
        "A fresh prompt about violins, cellos and the orchestra that played in the old opera "
        "house every Sunday night."
    )
    n = len(llm.get_tokenizer().encode(prompt))
    (out,) = llm.generate(
        prompt,
        SamplingParams(n=2, temperature=0, max_tokens=1, prompt_logprobs=1),
        use_tqdm=False,
    )
    assert len(out.outputs) == 2
    assert len(out.prompt_logprobs) == n


def test_prompt_logprobs_survive_preemption(make_llm) -> None:
    """A request preempted (recompute) after its prompt does not report prompt logprobs twice."""
    llm = make_llm(
        dtype="float32",
        quantization="none",
        max_model_len=48,
        num_kv_blocks=4,
        enable_prefix_caching=False,
    )
    prompts = [
        "The history of the printing press begins in 1440, when Johannes Gutenberg built a machine",
        "Another long prompt about the mountains and rivers of northern Europe in the winter",
    ]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, prompt_logprobs=1)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0  # 3 + 2 blocks needed, 4 available
    for out in outs:
        assert len(out.outputs[0].token_ids) == 20
        assert len(out.prompt_logprobs) == len(out.prompt_token_ids)


def test_prompt_logprobs_after_preemption_mid_prefill(make_llm) -> None:
    """Preempted halfway through its (chunked) prompt, a request recomputes it from the start:
    its prompt logprobs must still line up with the prompt tokens, none twice or shifted."""
    llm = make_llm(
        dtype="float32",
        quantization="none",
        max_model_len=64,
        num_kv_blocks=5,
        max_num_batched_tokens=2,
    )
    engine = llm.engine
    a = "The history of the printing press begins in 1440, when Johannes Gutenberg built a machine"
    b = (
        "Another long prompt about the mountains and rivers of northern Europe in the winter, "
        "when the lakes freeze over and the days are short, cold and dark for"
    )
    pa = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    pb = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, prompt_logprobs=1)
    engine.add_request(a, pa, request_id="A")
    engine.add_request(b, pb, request_id="B")
    req_b = engine.outputs.states["B"].samples[0].req
    results: dict[str, RequestOutput] = {}
    computed_before_preemption = None
    while engine.has_unfinished_requests():
        num_preemptions = engine.scheduler.num_preemptions
        computed = req_b.num_computed_tokens
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out
        if (
            engine.scheduler.num_preemptions > num_preemptions
            and computed_before_preemption is None
        ):
            computed_before_preemption = computed
    # A's decode tokens and B's 2-token prompt chunks share the budget; A's growth evicts B
    assert computed_before_preemption is not None, "B was never preempted"
    assert 0 < computed_before_preemption < req_b.num_prompt_tokens, "not mid-prefill"

    got = results["B"]
    (ref,) = llm.generate(b, pb, use_tqdm=False)  # alone: no preemption
    assert got.prompt_token_ids == ref.prompt_token_ids
    assert len(got.prompt_logprobs) == len(got.prompt_token_ids)
    for tok_id, entry in zip(got.prompt_token_ids[1:], got.prompt_logprobs[1:], strict=True):
        assert tok_id in entry
    assert _plp_values(got) == pytest.approx(_plp_values(ref), abs=1e-3)
    assert got.outputs[0].token_ids == ref.outputs[0].token_ids


# -- logit bias and penalties --------------------------------------------------------------------


def test_logit_bias_forces_and_bans_tokens(default_llm_fp32) -> None:
    llm = default_llm_fp32
    tok = llm.get_tokenizer()
    forced = tok.encode(" banana")[0]
    for temperature in (0.0, 1.0):
        c = one(
            llm, PROMPT, temperature=temperature, max_tokens=4, seed=1, logit_bias={forced: 100}
        )
        assert c.token_ids == [forced] * 4
    ref = greedy(llm).outputs[0].token_ids
    c = one(llm, PROMPT, temperature=0, max_tokens=3, logit_bias={ref[0]: -100})
    assert ref[0] not in c.token_ids


@pytest.mark.parametrize(
    "penalty",
    [dict(repetition_penalty=1.5), dict(frequency_penalty=2.0), dict(presence_penalty=2.0)],
    ids=lambda d: next(iter(d)),
)
def test_penalties_change_output_and_reduce_repeats(default_llm_fp32, penalty) -> None:
    llm = default_llm_fp32
    ref = greedy(llm).outputs[0].token_ids[:16]
    assert num_repeats(ref) > 0
    c = one(llm, PROMPT, temperature=0, max_tokens=16, **penalty)
    assert c.token_ids != ref
    assert num_repeats(c.token_ids) < num_repeats(ref)


# -- chat and priority ---------------------------------------------------------------------------


def test_chat_uses_template_and_replies(default_llm_fp32) -> None:
    llm = default_llm_fp32
    tok = llm.get_tokenizer()
    im_start = tok.token_to_id("<|im_start|>")
    assert im_start is not None
    conv = [{"role": "user", "content": "What is the capital of France?"}]
    (out,) = llm.chat(conv, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    assert out.prompt_token_ids[0] == im_start
    rendered = tok.apply_chat_template(conv, add_generation_prompt=True)
    assert out.prompt_token_ids == tok.encode(rendered, add_special_tokens=False)
    assert tok.decode(out.prompt_token_ids, skip_special_tokens=False).endswith(
        "<|im_start|>assistant\n"
    )
    c = out.outputs[0]
    assert c.text.strip()
    assert "Paris" in c.text
    assert "<|im_end|>" not in c.text

    # a batch of conversations
    convs = [conv, [{"role": "user", "content": "Say hello."}]]
    outs = llm.chat(convs, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert len(outs) == 2
    assert outs[0].outputs[0].token_ids == c.token_ids[:4]
    assert all(o.prompt_token_ids[0] == im_start for o in outs)


def test_priority_accepted(default_llm_fp32) -> None:
    llm = default_llm_fp32
    prompts = [PROMPT, "The quick brown fox"]
    params = SamplingParams(temperature=0, max_tokens=3)
    outs = llm.generate(prompts, params, use_tqdm=False, priority=[5, -1])
    assert [o.prompt for o in outs] == prompts  # results in input order
    assert outs[0].outputs[0].token_ids == greedy(llm).outputs[0].token_ids[:3]
    with pytest.raises(ValueError, match="priorit"):
        llm.generate(prompts, params, use_tqdm=False, priority=[1])


def test_priority_policy_engine(make_llm) -> None:
    llm = make_llm(
        dtype="float32", quantization="none", scheduling_policy="priority", max_model_len=512
    )
    params = [
        SamplingParams(temperature=0, max_tokens=2),
        SamplingParams(temperature=0, max_tokens=3),
    ]
    outs = llm.generate([PROMPT, PROMPT], params, use_tqdm=False, priority=[1, 0])
    assert [len(o.outputs[0].token_ids) for o in outs] == [2, 3]
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids[:2]

"""Prefix caching end to end on a tiny random-weight model (fp32, batch-invariant): outputs are
token-identical with the cache on and off (greedy and seeded) for a multi-turn conversation,
for concurrent requests sharing a prefix and under preemption; a repeated prompt computes only
its uncached tail."""

from __future__ import annotations

import random

import pytest

from tokenmill import SamplingParams
from tokenmill.engine.llm import LLM
from utils_tiny import make_tiny_hf_folder

BLOCK = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.9, top_p=0.95, seed=17, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory):
    return make_tiny_hf_folder(tmp_path_factory.mktemp("tiny-prefix"))


def tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(100, 49000) for _ in range(n)]


def engines(make_llm, folder, **kw) -> tuple[LLM, LLM]:
    """(cache on, cache off), alike otherwise; a small token budget makes prompts chunked."""
    # a small cache: allocating the default 1 GiB of blocks would take longer than the test
    common = dict(
        model=str(folder),
        dtype="float32",
        batch_invariant=True,
        max_num_batched_tokens=48,
        num_kv_blocks=128,
    )
    common.update(kw)
    return make_llm(**common), make_llm(enable_prefix_caching=False, **common)


def record_scheduled(llm: LLM) -> list[tuple[str, int, int]]:
    """(request id, start position, tokens) of every chunk the runner executes from now on."""
    log: list[tuple[str, int, int]] = []
    real = llm.engine.runner.execute

    def execute(sched):
        log.extend((s.req.request_id, s.start_pos, s.num_tokens) for s in sched.seqs)
        return real(sched)

    llm.engine.runner.execute = execute  # type: ignore[method-assign]
    return log


def ids(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_multi_turn_conversation_identical_and_cached(make_llm, tiny_folder, params) -> None:
    on, off = engines(make_llm, tiny_folder)
    rng = random.Random(1)
    prompt = tokens(rng, 90)  # a long "system prompt + document"
    num_prev_computed = 0
    for turn in range(4):
        (got,) = on.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)
        (ref,) = off.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)
        answer = got.outputs[0].token_ids
        assert answer == ref.outputs[0].token_ids, f"turn {turn}"
        assert ref.num_cached_tokens == 0
        if turn:
            # everything computed in the previous turn hits: its prompt and all but its last
            # generated token, in full blocks
            assert got.num_cached_tokens == (num_prev_computed // BLOCK) * BLOCK
        num_prev_computed = len(prompt) + len(answer) - 1
        prompt = prompt + answer + tokens(rng, rng.randrange(5, 20))  # the next user message
    kv = on.engine.scheduler.kv_cache_manager
    assert kv.prefix_hit_rate > 0.5


def test_concurrent_requests_sharing_a_prefix(make_llm, tiny_folder) -> None:
    on, off = engines(make_llm, tiny_folder)
    rng = random.Random(2)
    shared = tokens(rng, 5 * BLOCK)
    prompts = [{"prompt_token_ids": shared + tokens(rng, 3 + 2 * i)} for i in range(6)]
    params = [GREEDY if i % 2 else SEEDED for i in range(6)]
    log = record_scheduled(on)
    got = on.generate(prompts, params, use_tqdm=False)
    assert ids(got) == ids(off.generate(prompts, params, use_tqdm=False))
    # the first one computes the shared prefix; the others wait for it, then hit all of it
    assert got[0].num_cached_tokens == 0
    assert [o.num_cached_tokens for o in got[1:]] == [len(shared)] * 5
    first_chunks = {}
    for rid, start, _ in log:
        first_chunks.setdefault(rid, start)
    assert sorted(first_chunks.values()) == [0] + [len(shared)] * 5


def test_preemption_identical_with_cache(make_llm, tiny_folder) -> None:
    rng = random.Random(3)
    shared = tokens(rng, 2 * BLOCK)
    prompts = [{"prompt_token_ids": shared + tokens(rng, 10 + 7 * i)} for i in range(6)]
    params = [
        SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
        if i % 2
        else SamplingParams(temperature=0.8, seed=100 + i, max_tokens=40, ignore_eos=True)
        for i in range(6)
    ]
    # 14 blocks for 6 requests of 4-6 blocks each: requests are preempted and recomputed
    tiny_cache, _ = engines(make_llm, tiny_folder, num_kv_blocks=14, max_model_len=224)
    ref_engine = make_llm(
        model=str(tiny_folder),
        dtype="float32",
        batch_invariant=True,
        num_kv_blocks=128,
        enable_prefix_caching=False,
    )
    got = ids(tiny_cache.generate(prompts, params, use_tqdm=False))
    sched = tiny_cache.engine.scheduler
    assert sched.num_preemptions > 0
    assert sched.kv_cache_manager.prefix_hits > 0
    assert got == ids(ref_engine.generate(prompts, params, use_tqdm=False))


def test_repeated_prompt_computes_only_uncached_tail(make_llm, tiny_folder) -> None:
    on, _ = engines(make_llm, tiny_folder)
    prompt = {"prompt_token_ids": tokens(random.Random(4), 4 * BLOCK + 5)}  # 69 tokens
    log = record_scheduled(on)
    (first,) = on.generate(prompt, GREEDY, use_tqdm=False)
    num_first = sum(n for rid, start, n in log if start < 69)
    log.clear()
    (second,) = on.generate(prompt, GREEDY, use_tqdm=False)
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    assert num_first == 69 and first.num_cached_tokens == 0
    assert second.num_cached_tokens == 64
    prompt_chunks = [(start, n) for _, start, n in log if start < 69]
    assert prompt_chunks == [(64, 5)]  # only the tail after the 4 cached blocks

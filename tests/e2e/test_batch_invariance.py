"""Requests of mixed lengths give identical tokens one at a time, all together, under a tiny
token budget (chunked prefill), under a tiny KV cache (preemption), with the prefix cache on and
off and with speculative decoding on and off, greedy and seeded.

Two weight paths: the default engine on the default model (its GGUF blocks as stored, bf16 where
the CPU has it: the configuration the server runs, with no option set) with 32 requests, and
weights dequantized to fp32 (dense matmuls: the row-independent kernel, or fixed row tiles where
this CPU lacks it) with 20 requests of fewer tokens: still more decode rows than one tile, since
a batch-1 step on tiles computes a whole tile and is the slowest thing in the suite."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from tokenmill import SamplingParams


@dataclass(frozen=True)
class Case:
    options: dict  # engine options besides the default ones
    num_requests: int
    max_tokens: int


CASES = {
    "default": Case(options={}, num_requests=32, max_tokens=20),
    "dense-fp32": Case(
        options=dict(dtype="float32", quantization="none"), num_requests=20, max_tokens=12
    ),
}
# Every third prompt opens with this text, so the prefix cache has whole blocks to reuse.
PREAMBLE = (
    "You are a careful storyteller. Each story uses only the words it is given, in the order "
    "given, and never adds a moral at the end. "
)


def _workload(case: Case) -> tuple[list[list[int]], list[SamplingParams]]:
    from tokenmill.engine.tokenizer import Tokenizer
    from tokenmill.loader.model_source import default_model_path

    rng = random.Random(0)
    tok = Tokenizer.from_gguf(default_model_path())
    words = "cat river light stone quick seven apple green music code think learn".split()
    prompts, params = [], []
    for i in range(case.num_requests):
        n = rng.choice([3, 9, 17, 33, 60, 90])
        text = f"Story {i}: " + " ".join(rng.choice(words) for _ in range(n))
        if i % 3 == 0:
            text = PREAMBLE + text
        prompts.append(tok.encode(text, add_special_tokens=False))
        if i % 2 == 0:
            sp = SamplingParams(max_tokens=case.max_tokens, temperature=0.0, ignore_eos=True)
        else:
            sp = SamplingParams(
                max_tokens=case.max_tokens,
                temperature=0.9,
                top_p=0.95,
                top_k=50,
                seed=1000 + i,
                ignore_eos=True,
            )
        params.append(sp)
    return prompts, params


def _run(llm, prompts, params, one_at_a_time=False):
    if one_at_a_time:
        outs = [
            llm.generate([p], [sp], use_tqdm=False)[0]
            for p, sp in zip(prompts, params, strict=True)
        ]
    else:
        outs = llm.generate(prompts, params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_batch_invariance(request, make_llm, name: str) -> None:
    case = CASES[name]
    prompts, params = _workload(case)
    common = dict(case.options)
    # dense-fp32: the shared engine of that configuration
    shared = request.getfixturevalue("default_llm_fp32") if name == "dense-fp32" else None
    llm = shared or make_llm(kv_cache_memory_gb=0.5, **common)
    alone = _run(llm, prompts, params, one_at_a_time=True)
    assert _run(llm, prompts, params) == alone

    tiny_budget = make_llm(max_num_batched_tokens=24, kv_cache_memory_gb=0.5, **common)
    assert _run(tiny_budget, prompts, params) == alone

    # 24 blocks of 16 tokens hold a few requests' worth of work: requests must be preempted.
    tiny_cache = make_llm(
        num_kv_blocks=24, max_model_len=256, enable_prefix_caching=False, **common
    )
    got = _run(tiny_cache, prompts, params)
    assert tiny_cache.engine.scheduler.num_preemptions > 0
    assert got == alone
    if name != "default":
        return

    # The prefix cache on (the engine above, whose one-at-a-time run left the preamble's blocks
    # cached) against off: prompts computed partly from cached blocks give the same tokens.
    cached = llm.generate(prompts, params, use_tqdm=False)
    assert sum(o.num_cached_tokens for o in cached) > 0
    assert [o.outputs[0].token_ids for o in cached] == alone
    no_cache = make_llm(kv_cache_memory_gb=0.5, enable_prefix_caching=False, **common)
    assert _run(no_cache, prompts, params) == alone

    # Speculative decoding: drafts verified as extra rows of a request's step (a draft cost of 0
    # drafts whatever the batch size, where the cost model would draft little at batch 32).
    spec = make_llm(
        kv_cache_memory_gb=0.5, speculative="ngram", speculative_draft_cost=0.0, **common
    )
    assert _run(spec, prompts, params) == alone
    assert spec.engine.scheduler.spec_stats.num_accepted_tokens > 0

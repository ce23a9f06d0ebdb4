"""32 requests of mixed lengths give identical tokens one at a time, all together, under a tiny
token budget (chunked prefill) and under a tiny KV cache (preemption), greedy and seeded."""

from __future__ import annotations

import random

import pytest

from tokenmill import SamplingParams

NUM_REQUESTS = 32
MAX_TOKENS = 20


@pytest.fixture(scope="module")
def workload():
    rng = random.Random(0)
    from tokenmill.engine.tokenizer import Tokenizer
    from tokenmill.loader.model_source import default_model_path

    tok = Tokenizer.from_gguf(default_model_path())
    words = "cat river light stone quick seven apple green music code think learn".split()
    prompts = []
    for i in range(NUM_REQUESTS):
        n = rng.choice([3, 9, 17, 33, 60, 90])
        text = f"Story {i}: " + " ".join(rng.choice(words) for _ in range(n))
        prompts.append(tok.encode(text, add_special_tokens=False))
    params = []
    for i in range(NUM_REQUESTS):
        if i % 2 == 0:
            params.append(SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))
        else:
            params.append(
                SamplingParams(
                    max_tokens=MAX_TOKENS,
                    temperature=0.9,
                    top_p=0.95,
                    top_k=50,
                    seed=1000 + i,
                    ignore_eos=True,
                )
            )
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
def test_batch_invariance(make_llm, default_llm_fp32, workload) -> None:
    prompts, params = workload
    alone = _run(default_llm_fp32, prompts, params, one_at_a_time=True)
    together = _run(default_llm_fp32, prompts, params)
    assert together == alone

    tiny_budget = make_llm(
        dtype="float32",
        quantization="none",
        batch_invariant=True,
        max_num_batched_tokens=24,
        kv_cache_memory_gb=0.5,
    )
    assert _run(tiny_budget, prompts, params) == alone

    # 8 blocks of 16 tokens per 3 requests' worth of work: requests must be preempted.
    tiny_cache = make_llm(
        dtype="float32",
        quantization="none",
        batch_invariant=True,
        num_kv_blocks=24,
        max_model_len=256,
        enable_prefix_caching=False,
    )
    got = _run(tiny_cache, prompts, params)
    assert tiny_cache.engine.scheduler.num_preemptions > 0
    assert got == alone

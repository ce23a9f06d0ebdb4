"""A sliding-window model through the whole engine: a conversation four windows long keeps only
about a window of KV blocks per request (asserted on the KV cache manager at every step), and
its greedy tokens are transformers' tokens."""

from __future__ import annotations

import pytest
import torch
import transformers

from tokenmill import LLM
from tokenmill.testing.parity import greedy_tokens, hf_greedy
from utils_tiny import make_tiny_hf_folder

WINDOW, BLOCK, BUDGET = 8, 4, 8


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_kv_stays_bounded_by_the_window(tmp_path, prefix_caching: bool) -> None:
    folder = make_tiny_hf_folder(tmp_path, "MistralForCausalLM", sliding_window=WINDOW)
    llm = LLM(
        model=str(folder), dtype="float32", block_size=BLOCK, max_num_batched_tokens=BUDGET,
        enable_prefix_caching=prefix_caching, kv_cache_memory_gb=0.01,
    )  # fmt: skip
    engine = llm.engine
    assert engine.runner.sliding_window == WINDOW
    sched, kv = engine.scheduler, engine.scheduler.kv_cache_manager
    # a request never needs more than its window, the chunk being computed and one partial block
    bound = -(-(WINDOW + BUDGET) // BLOCK) + 1
    held: list[int] = []
    update = sched.update_from_output

    def recording_update(sched_out, runner_out):  # noqa: ANN001, ANN202
        outputs = update(sched_out, runner_out)
        held.extend(kv.num_held_blocks(req) for req in sched.running)
        return outputs

    sched.update_from_output = recording_update
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 49152, (4 * WINDOW,), generator=g).tolist() for _ in range(2)]
    ours = greedy_tokens(llm, prompts, max_tokens=2 * WINDOW)
    assert max(held) <= bound and max(held) >= WINDOW // BLOCK
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    for prompt, tokens in zip(prompts, ours, strict=True):
        assert tokens == hf_greedy(hf.eval(), prompt, 2 * WINDOW)
    assert kv.block_pool.num_free_blocks == kv.num_blocks  # all given back

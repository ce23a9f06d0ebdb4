"""Sliding-window models through the whole engine: a conversation four windows long keeps only
about a window of KV blocks per request in each windowed KV group (asserted on the KV cache
manager at every step), a hybrid model's global group keeps them all, and the greedy tokens are
transformers' tokens."""

from __future__ import annotations

import pytest
import torch
import transformers

from tokenmill import LLM
from tokenmill.core.kv_group import KVGroupSpec
from tokenmill.testing.parity import greedy_tokens, hf_greedy
from utils_tiny import make_tiny_hf_folder

WINDOW, BLOCK, BUDGET, MAX_SEQS = 8, 4, 8, 4

# arch -> (config overrides, each KV group's window in the runner's order)
MODELS = {
    "MistralForCausalLM": ({}, [WINDOW]),
    "Gemma2ForCausalLM": (
        dict(head_dim=16, query_pre_attn_scalar=16, attn_logit_softcapping=5.0),
        [None, WINDOW],
    ),
    "Gemma3ForCausalLM": (
        dict(head_dim=16, query_pre_attn_scalar=16, num_hidden_layers=3, sliding_window_pattern=3),
        [None, WINDOW],
    ),
}


@pytest.mark.parametrize("prefix_caching", [True, False])
@pytest.mark.parametrize("arch", list(MODELS))
def test_kv_stays_bounded_by_the_window(tmp_path, arch: str, prefix_caching: bool) -> None:
    overrides, windows = MODELS[arch]
    folder = make_tiny_hf_folder(tmp_path, arch, sliding_window=WINDOW, **overrides)
    llm = LLM(
        model=str(folder), dtype="float32", block_size=BLOCK, max_num_batched_tokens=BUDGET,
        max_num_seqs=MAX_SEQS, enable_prefix_caching=prefix_caching, kv_cache_memory_gb=0.01,
    )  # fmt: skip
    engine = llm.engine
    runner = engine.runner
    assert [g.sliding_window for g in runner.kv_groups] == windows
    budget = runner.num_blocks  # blocks of every layer the memory holds
    if len(windows) == 2:
        # the windowed group gets what its requests can hold at once, the global one the rest
        windowed_need = MAX_SEQS * (WINDOW // BLOCK + 2) + BUDGET // BLOCK
        local_layers = len(runner.kv_layout[1].layers)
        global_layers = len(runner.kv_layout[0].layers)
        extra = (budget - windowed_need) * local_layers // global_layers
        assert runner.kv_groups == (KVGroupSpec(budget + extra), KVGroupSpec(windowed_need, WINDOW))
        assert [runner.kv_caches[g].shape[2] for g in (0, 1)] == [budget + extra + 1, 19]
    else:
        assert runner.kv_groups == (KVGroupSpec(budget, WINDOW),)
    sched, kv = engine.scheduler, engine.scheduler.kv_cache_manager
    # a request never needs more than its window, the chunk being computed and one partial block
    bound = -(-(WINDOW + BUDGET) // BLOCK) + 1
    held: list[tuple[int, ...]] = []
    tables: list[int] = []
    update = sched.update_from_output

    def recording_update(sched_out, runner_out):  # noqa: ANN001, ANN202
        outputs = update(sched_out, runner_out)
        for req in sched.running:
            held.append(kv.num_held_blocks(req))
            tables.append(len(kv.get_block_ids(req)[0]))
        return outputs

    sched.update_from_output = recording_update
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 49152, (4 * WINDOW,), generator=g).tolist() for _ in range(2)]
    ours = greedy_tokens(llm, prompts, max_tokens=2 * WINDOW)
    for i, window in enumerate(windows):
        most = max(h[i] for h in held)
        if window is None:  # the global group holds the whole conversation
            assert [h[i] for h in held] == tables and most >= 6 * WINDOW // BLOCK - 1
        else:
            assert WINDOW // BLOCK <= most <= bound
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    for prompt, tokens in zip(prompts, ours, strict=True):
        assert tokens == hf_greedy(hf, prompt, 2 * WINDOW)
    assert kv.num_free_blocks == kv.num_blocks  # all given back

"""Expert parallelism under tensor parallelism: each rank keeps its share of whole experts,
the ranks' partial MoE outputs sum to the whole layer's, TP=2 with experts shared out gives
TP=1's logits and greedy tokens on tiny MoE models, and unsupported combinations fail clearly
at start."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from tp_utils import assert_matches_tp1

from tokenmill import LLM
from tokenmill.config import EngineConfig
from tokenmill.layers.expert_parallel import shard_experts
from tokenmill.layers.linear import Linear
from tokenmill.layers.moe import SparseMoeBlock
from tokenmill.layers.tensor_parallel import TensorParallelError, TPGroup
from tokenmill.quant.packing import quantize_rtn
from utils_tiny import make_tiny_hf_folder


def _loaded_block(quant: str | None, shared: bool) -> SparseMoeBlock:
    """A random MoE block as the loader leaves it: weights in, not yet packed."""
    torch.manual_seed(0)
    block = SparseMoeBlock(
        64, 8, 2, 32, True, torch.float32, quant, shared_intermediate_size=64 if shared else None
    )
    for name, p in block.named_parameters():
        p.data.copy_(torch.randn(p.shape) * (0.5 if "gate.weight" in name else 0.1))
    if quant == "blocks":
        for m in block.experts.modules():
            if isinstance(m, Linear):
                m.load_quantized(quantize_rtn(m.weight.float(), 4))
    return block


def _packed(block: SparseMoeBlock) -> SparseMoeBlock:
    for m in block.modules():
        if isinstance(m, Linear):
            m.quant_method.process_after_loading(m)
            m.batch_invariant = True
    return block


@pytest.mark.parametrize("quant", [None, "blocks"])
def test_ranks_keep_their_experts_and_partials_sum_exactly(quant: str | None) -> None:
    """Rank r keeps experts [4 r, 4 r + 4) whole (the router and the shared expert on both);
    the two ranks' partial outputs sum to the whole layer's bit for bit (top-2 over 2 ranks:
    each partial is 0, one expert's output or both outputs' sum)."""
    loaded = _loaded_block(quant, shared=True)
    whole = _packed(copy.deepcopy(loaded))
    x = torch.randn(29, 64)
    partials = []
    with torch.inference_mode():
        weights, ids = whole.routing(x)
        expected = whole.experts(x, weights, ids)
        for rank in range(2):
            block = copy.deepcopy(loaded)
            shard = shard_experts(block, TPGroup(rank, 2))
            _packed(block)
            assert (shard.start, shard.end) == (4 * rank, 4 * rank + 4)
            assert len(block.experts) == 4
            assert block.gate.weight.shape == (8, 64)  # the router: every expert's row
            assert block.shared_expert is not None  # replicated
            if quant is None:  # the dense stacks hold this rank's experts only
                assert block.experts.gate_up_proj.shape[0] == 4
                storages = {
                    t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for t in [*block.experts.parameters(), *block.experts.buffers()]
                }
                assert sum(storages.values()) == 4 * (2 * 32 * 64 + 64 * 32) * 4  # fp32 bytes
                own = block.experts[1].gate_up_proj.weight
                assert own.data_ptr() == block.experts.gate_up_proj[1].data_ptr()
                assert torch.equal(own, whole.experts[4 * rank + 1].gate_up_proj.weight)
                torch.testing.assert_close(
                    block.experts.reference(x, weights, shard.local_ids(ids)),
                    block.experts(x, weights, shard.local_ids(ids)),
                    atol=1e-5,
                    rtol=1e-5,
                )
            partials.append(block.experts(x, weights, shard.local_ids(ids)))
        assert ids.min() < 4 <= ids.max()  # tokens routed to both ranks' experts
    assert torch.equal(partials[0] + partials[1], expected)
    with torch.inference_mode():  # a step with no token for rank 1's experts: zeros
        ids = torch.tensor([[0, 3]] * 5)
        assert not block.experts(x[:5], weights[:5], shard.local_ids(ids)).any()


def test_top4_partials_sum_closely() -> None:
    """Top-4 routing: a token's outputs can sit on both ranks two by two, so the ranks' sum
    associates differently from TP=1's ascending sum; it stays within the last bits."""
    loaded = _loaded_block(None, shared=False)
    loaded.top_k = 4
    whole = _packed(copy.deepcopy(loaded))
    x = torch.randn(29, 64)
    with torch.inference_mode():
        weights, ids = whole.routing(x)
        total = torch.zeros_like(x)
        for rank in range(2):
            block = copy.deepcopy(loaded)
            shard = shard_experts(block, TPGroup(rank, 2))
            total += _packed(block).experts(x, weights, shard.local_ids(ids))
        torch.testing.assert_close(total, whole.experts(x, weights, ids), atol=1e-6, rtol=1e-6)


@pytest.fixture(scope="module")
def moe_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_moe_tp")
    return {
        arch: make_tiny_hf_folder(root, arch)
        for arch in (
            "MixtralForCausalLM",
            "Qwen2MoeForCausalLM",
            "Qwen3MoeForCausalLM",
            "OlmoeForCausalLM",
        )
    }


@pytest.mark.parametrize(
    ("arch", "quantization"),
    [
        ("MixtralForCausalLM", None),
        ("MixtralForCausalLM", "int4"),
        ("Qwen2MoeForCausalLM", None),
        ("Qwen3MoeForCausalLM", None),
    ],
)
def test_tp2_expert_parallel_matches_tp1(
    moe_folders: dict[str, Path], arch: str, quantization: str | None
) -> None:
    """Attention split by KV head, experts shared out: dense fp32 logits within 1e-4 of TP=1
    (the attention's row-parallel sums add in another order), int4 blocks (o_proj gathers,
    experts whole, top-2 partials summed exactly) bit for bit; the same greedy tokens.
    Qwen2-MoE adds a replicated shared expert, q/k/v biases and a dense (split) MLP layer;
    Qwen3-MoE per-head q/k norms."""
    kw = dict(dtype="float32", quantization=quantization)
    one = LLM(str(moe_folders[arch]), **kw)
    two = LLM(str(moe_folders[arch]), tensor_parallel_size=2, enable_expert_parallel=True, **kw)
    try:
        blocks = [m for m in two.engine.runner.model.modules() if isinstance(m, SparseMoeBlock)]
        assert blocks and all(len(b.experts) == 4 for b in blocks)  # rank 0: experts 0..3
        if quantization is not None:  # whole experts, still in their blocks
            down = blocks[0].experts[3].down_proj
            assert down.quant_method.describe(down) == "int4"
        steps = assert_matches_tp1(one, two, exact=quantization is not None)
        assert steps == 8
    finally:
        two.engine.shutdown()


def test_unsupported_combinations_fail_at_start(
    moe_folders: dict[str, Path], tmp_path: Path
) -> None:
    mixtral = str(moe_folders["MixtralForCausalLM"])
    with pytest.raises(TensorParallelError, match="--enable-expert-parallel"):
        LLM(mixtral, dtype="float32", tensor_parallel_size=2)
    with pytest.raises(TensorParallelError, match="exceeds the 8 experts"):
        LLM(mixtral, dtype="float32", tensor_parallel_size=16, enable_expert_parallel=True)
    with pytest.raises(TensorParallelError, match="not OlmoeForCausalLM"):
        LLM(
            str(moe_folders["OlmoeForCausalLM"]),
            dtype="float32",
            tensor_parallel_size=2,
            enable_expert_parallel=True,
        )
    dense = make_tiny_hf_folder(tmp_path)
    with pytest.raises(TensorParallelError, match="has no experts"):
        LLM(str(dense), dtype="float32", tensor_parallel_size=2, enable_expert_parallel=True)
    with pytest.raises(ValueError, match="needs tensor_parallel_size >= 2"):
        EngineConfig(enable_expert_parallel=True)
    with pytest.raises(ValueError, match="expert_memory_gb"):
        EngineConfig(tensor_parallel_size=2, enable_expert_parallel=True, expert_memory_gb=1.0)


@pytest.mark.slow
def test_tp4_expert_parallel_matches_tp1(moe_folders: dict[str, Path]) -> None:
    """4 ranks: 2 experts each, each KV head on two ranks; top-2 partials still sum exactly,
    the attention's row-parallel sums within 1e-4."""
    folder = str(moe_folders["MixtralForCausalLM"])
    one = LLM(folder, dtype="float32")
    four = LLM(folder, dtype="float32", tensor_parallel_size=4, enable_expert_parallel=True)
    try:
        blocks = [m for m in four.engine.runner.model.modules() if isinstance(m, SparseMoeBlock)]
        assert all(len(b.experts) == 2 for b in blocks)
        assert_matches_tp1(one, four)
    finally:
        four.engine.shutdown()

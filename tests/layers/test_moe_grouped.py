"""The grouped quantized kernel of a MoE layer (all active experts in one call per projection)
against the loop over experts that calls each expert's own quantized linear layers: the same
bits, and a token's output independent of the batch."""

from __future__ import annotations

import pytest
import torch

from tokenmill.kernels.cpu_quant import grouped_quant_linear, load_cpu_quant, quant_linear
from tokenmill.layers.linear import Linear
from tokenmill.layers.moe import SparseMoeBlock
from tokenmill.layers.moe_grouped import grouped_experts
from tokenmill.quant import block as quant_block
from tokenmill.quant.packing import pack_tiles, quantize_rtn

pytestmark = pytest.mark.skipif(load_cpu_quant() is None, reason="no quantized CPU kernel here")


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_equals_per_group_calls(bits: int, dtype: torch.dtype) -> None:
    """Groups of 0 to 19 rows (every pass width, empty groups), n = 40 (a partial tile): each
    group's rows are bit-identical to quant_linear on those rows with that group's weight."""
    torch.manual_seed(0)
    k, n = 96, 40
    counts = [3, 0, 1, 19, 8, 0, 9, 2]
    packed = [pack_tiles(quantize_rtn(torch.randn(n, k) * 0.1, bits)) for _ in counts]
    x = torch.randn(sum(counts), k).to(dtype)
    got = grouped_quant_linear(x, packed, counts, n, bits)
    assert got.dtype == dtype and got.shape == (sum(counts), n)
    start = 0
    for w, c in zip(packed, counts, strict=True):
        want = quant_linear(x[start : start + c], w, n, bits)
        assert torch.equal(got[start : start + c], want)
        start += c
    with pytest.raises(RuntimeError, match="add up"):
        grouped_quant_linear(x[1:], packed, counts, n, bits)
    with pytest.raises(RuntimeError, match="packed"):
        grouped_quant_linear(x, packed, counts, n + 16, bits)


def quantized_block(dtype: torch.dtype, bits: int = 4) -> SparseMoeBlock:
    """16 experts, top 4, hidden 64, expert width 96 (two row tiles of down, six of gate_up),
    experts in `bits`-bit blocks, the router dense."""
    torch.manual_seed(0)
    block = SparseMoeBlock(64, 16, 4, 96, True, dtype, "blocks")
    for name, p in block.named_parameters():
        p.data.copy_(torch.randn(p.shape) * (0.5 if "gate.weight" in name else 0.1))
    for m in block.modules():
        if isinstance(m, Linear):
            if m is not block.gate:
                m.load_quantized(quantize_rtn(m.weight.float(), bits))
            m.quant_method.process_after_loading(m)
    return block


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_experts_equal_the_loop(dtype: torch.dtype, bits: int) -> None:
    """The block's output through the grouped kernel is the loop's, bit for bit, at decode
    (1 token) and for batches (up to 40 tokens, some experts with 9+ rows)."""
    block = quantized_block(dtype, bits)
    calls: list[int] = []
    for expert in block.experts:
        expert.register_forward_hook(lambda m, a, y: calls.append(a[0].shape[0]))
    for t in (1, 3, 16, 40):
        x = torch.randn(t, 64).to(dtype)
        with torch.inference_mode():
            block.experts.grouped = True
            grouped = block(x)
            assert not calls  # no expert module ran: the grouped kernel did it all
            block.experts.grouped = False
            loop = block(x)
            assert calls  # and the loop really ran the experts one by one
            calls.clear()
        assert torch.equal(grouped, loop)


def test_grouped_leaves_large_bf16_batches_to_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past DENSE_ABOVE_ROWS rows for one expert a bfloat16 layer multiplies densely where
    oneDNN has AMX (forced here; outside batch-invariant mode): the grouped kernel declines
    and the loop runs, as before."""
    monkeypatch.setattr(quant_block, "onednn_uses_amx", lambda: True)
    block = quantized_block(torch.bfloat16)
    x = torch.randn(600, 64).bfloat16()
    with torch.inference_mode():
        weights, ids = block.routing(x)
        tokens = ids.flatten().sort(stable=True).indices // 4
        counts = torch.bincount(ids.flatten(), minlength=16).tolist()
        assert max(counts) > 96
        assert grouped_experts(block.experts, x[tokens], counts) is None
        for m in block.modules():
            if isinstance(m, Linear):
                m.batch_invariant = True
        assert grouped_experts(block.experts, x[tokens], counts) is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_experts_row_invariant(dtype: torch.dtype) -> None:
    """A token's output is the same alone, inside batches of several sizes and at several
    positions, on one and two threads (the grouped kernel splits (expert, tile) pairs), in
    batch-invariant mode (which the dense router needs)."""
    block = quantized_block(dtype)
    for m in block.modules():
        if isinstance(m, Linear):
            m.batch_invariant = True
    for expert in block.experts:  # every call below goes through the grouped kernel
        expert.register_forward_hook(lambda *_: pytest.fail("an expert ran on its own"))
    pool = torch.randn(33, 64).to(dtype)
    before = torch.get_num_threads()
    try:
        with torch.inference_mode():
            torch.set_num_threads(1)
            alone = torch.cat([block(pool[i : i + 1]) for i in range(33)])
            for threads in (1, 2):
                torch.set_num_threads(threads)
                for size, start in ((2, 0), (9, 5), (17, 20), (33, 0)):
                    idx = (torch.arange(size) + start) % 33
                    assert torch.equal(block(pool[idx]), alone[idx])
    finally:
        torch.set_num_threads(before)

"""Every attention backend behind the one interface: the same step (decode rows, a speculative
verify seq, prompt chunks with and without a cached prefix) described once as an
`AttentionBatch`, run through each backend's `build_metadata` and `forward`, against a float64
gather + softmax."""

from __future__ import annotations

import math

import pytest
import torch

from tokenmill.kernels.cpu_attention import load_cpu_attention
from tokenmill.layers.attn_backends import resolve_backend_name, select_backend
from tokenmill.layers.attn_backends.base import AttentionBatch, ChunkSeq, DecodeSeq
from tokenmill.layers.attn_backends.cpu import CpuKernelBackend
from tokenmill.layers.attn_backends.sdpa import SdpaBackend
from tokenmill.layers.attn_backends.unified import UnifiedRefBackend

BLOCK = 4
H, H_KV, D = 6, 2, 32


def make_step(g: torch.Generator) -> tuple[AttentionBatch, list[tuple[int, list[int]]]]:
    """A step of 3 decode rows (one plain decode, one verify seq of 2 rows), then two chunks:
    a whole 5-token prompt and 3 tokens after a 6-token cached prefix. Returns the batch and,
    per query row, (its number of keys, its block ids)."""
    ids = torch.randperm(40, generator=g).tolist()
    tables = [ids[0:4], ids[4:8], ids[8:10], ids[10:13]]
    decodes = [DecodeSeq(num_keys=9, num_rows=1, block_ids=tables[0]),
               DecodeSeq(num_keys=13, num_rows=2, block_ids=tables[1])]  # fmt: skip
    chunks = [ChunkSeq(token_start=3, num_query=5, start_pos=0, block_ids=tables[2]),
              ChunkSeq(token_start=8, num_query=3, start_pos=6, block_ids=tables[3])]  # fmt: skip
    rows = [(9, tables[0]), (13, tables[1]), (14, tables[1])]
    rows += [(i + 1, tables[2]) for i in range(5)]
    rows += [(6 + i + 1, tables[3]) for i in range(3)]
    return AttentionBatch(decodes, chunks, block_size=BLOCK, device="cpu"), rows


def step_inputs(seed: int) -> tuple[AttentionBatch, list, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`make_step`'s batch and rows, random k and v caches, and random queries for its rows."""
    g = torch.Generator().manual_seed(seed)
    batch, rows = make_step(g)
    k_cache = torch.randn(41, BLOCK, H_KV, D, generator=g)
    v_cache = torch.randn(41, BLOCK, H_KV, D, generator=g)
    q = torch.randn(len(rows), H, D, generator=g)
    return batch, rows, q, k_cache, v_cache


def reference(q, k_cache, v_cache, rows, scale, window=None, softcap=None) -> torch.Tensor:
    """Row i (at position num_keys - 1) over its keys, in float64; a window keeps the last
    `window` keys, a cap squashes the scores with tanh."""
    out = []
    for i, (num_keys, table) in enumerate(rows):
        first = 0 if window is None else max(0, num_keys - window)
        t = torch.arange(first, num_keys)
        blocks = torch.tensor(table)[t // BLOCK]
        keys = k_cache[blocks, t % BLOCK].double().repeat_interleave(H // H_KV, dim=1)
        values = v_cache[blocks, t % BLOCK].double().repeat_interleave(H // H_KV, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[i].double(), keys) * scale
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        out.append(torch.einsum("hn,nhd->hd", scores.softmax(-1), values))
    return torch.stack(out)


needs_cpu_kernel = pytest.mark.skipif(load_cpu_attention() is None, reason="no C++ attention")
BACKENDS = [
    pytest.param(SdpaBackend, id="sdpa"),
    pytest.param(lambda: CpuKernelBackend(False), id="cpu", marks=needs_cpu_kernel),
    pytest.param(lambda: CpuKernelBackend(True), id="cpu-invariant", marks=needs_cpu_kernel),
    pytest.param(UnifiedRefBackend, id="unified-ref"),
]


@pytest.mark.parametrize("make_backend", BACKENDS)
def test_backend_matches_the_reference(make_backend) -> None:
    batch, rows, q, k_cache, v_cache = step_inputs(0)
    backend = make_backend()
    meta = backend.build_metadata(batch)
    scale = 1 / math.sqrt(D)
    out = backend.forward(q, k_cache, v_cache, meta, scale)
    assert out.shape == q.shape
    torch.testing.assert_close(out.double(), reference(q, k_cache, v_cache, rows, scale),
                               atol=1e-5, rtol=1e-5)  # fmt: skip


@pytest.mark.parametrize("make_backend", BACKENDS)
@pytest.mark.parametrize(
    ("window", "softcap"),
    [(3, None), (1, None), (6, None), (None, 2.0), (5, 1.5)],
    ids=["window3", "window1", "window6", "cap", "window5-cap"],
)
def test_window_and_softcap_match_the_reference(make_backend, window, softcap) -> None:
    """The same step with a sliding window shorter than most rows (1: each query sees itself
    only) and with soft-capped scores; a large scale so that the cap changes the result."""
    batch, rows, q, k_cache, v_cache = step_inputs(3)
    backend = make_backend()
    meta = backend.build_metadata(batch)
    scale = 0.5
    out = backend.forward(q, k_cache, v_cache, meta, scale, window=window, softcap=softcap)
    expected = reference(q, k_cache, v_cache, rows, scale, window, softcap)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    # the window and the cap do change the result (the test would catch them being ignored)
    plain = reference(q, k_cache, v_cache, rows, scale)
    assert (expected - plain).abs().max() > 1e-2


def test_write_kv_puts_each_token_in_its_slot() -> None:
    k_cache, v_cache = torch.zeros(3, BLOCK, H_KV, D), torch.zeros(3, BLOCK, H_KV, D)
    k, v = torch.randn(2, H_KV, D), torch.randn(2, H_KV, D)
    SdpaBackend().write_kv(k, v, k_cache, v_cache, torch.tensor([5, 8]))  # block 1 slot 1, 2/0
    assert torch.equal(k_cache[1, 1], k[0]) and torch.equal(v_cache[2, 0], v[1])
    assert int((k_cache != 0).any(-1).any(-1).sum()) == 2


def test_only_the_cpu_kernel_hands_its_decode_arguments_to_a_fused_layer() -> None:
    g = torch.Generator().manual_seed(1)
    batch, _ = make_step(g)
    decode_only = AttentionBatch(batch.decodes, [], BLOCK, "cpu")
    cpu = CpuKernelBackend()
    assert cpu.decode_kernel_args(cpu.build_metadata(batch)) is None  # chunks in the step
    tables, lens = cpu.decode_kernel_args(cpu.build_metadata(decode_only))
    assert lens.tolist() == [9, 13, 14] and tables.shape[0] == 3
    sdpa = SdpaBackend()
    assert sdpa.decode_kernel_args(sdpa.build_metadata(decode_only)) is None


def test_graph_buffers_only_where_a_backend_has_a_static_layout() -> None:
    assert SdpaBackend().graph_buffers(4, 8, 0, "cpu") is None
    buffers = UnifiedRefBackend().graph_buffers(4, 8, null_block=7, device="cpu")
    g = torch.Generator().manual_seed(2)
    batch, _ = make_step(g)
    decode_only = AttentionBatch(batch.decodes, [], BLOCK, "cpu")
    meta = UnifiedRefBackend().build_metadata(decode_only)
    assert buffers.can_hold(meta, 3)
    assert not buffers.can_hold(UnifiedRefBackend().build_metadata(batch), 11)  # chunks
    buffers.copy_in(meta, 3, 4)
    padded = buffers.metadata(4)
    assert padded.seq_lens.tolist() == [9, 13, 14, 1] and int(padded.block_tables[3, 0]) == 7
    assert not (UnifiedRefBackend.cuda_graphs or SdpaBackend.cuda_graphs)


def test_selection_resolves_auto_and_checks_the_device() -> None:
    expected = "cpu" if load_cpu_attention() is not None else "sdpa"
    assert resolve_backend_name("auto", "cpu") == expected
    with pytest.raises(ValueError, match="CPU only"):
        resolve_backend_name("cpu", "cuda")
    with pytest.raises(ValueError, match="unknown"):
        resolve_backend_name("flash", "cpu")
    # a head size the C++ kernel does not take falls back to the reference
    odd = select_backend("auto", "cpu", head_dim=40, dtype=torch.float32)
    assert isinstance(odd, SdpaBackend) and not isinstance(odd, CpuKernelBackend)

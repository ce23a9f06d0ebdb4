"""The C++ CPU decode attention (csrc/paged_attention.cpp) against a plain gather + softmax.

Skipped when the extension cannot be built here. Tolerances: fp32 atol 1e-5; bf16 and fp16
outputs are rounded to their dtype, so they may be off by about one unit in the last place of
the output (rtol 2**-8 for bf16, 2**-10 for fp16) plus a small atol for the fp32 accumulation.
"""

from __future__ import annotations

import pytest
import torch
from cpu_kernel_utils import make_case

from tokenmill.kernels.cpu_attention import (
    load_cpu_attention,
    paged_decode_attention,
    paged_prefill_attention,
    supports,
)

if load_cpu_attention() is None:
    pytest.skip("the C++ CPU attention extension cannot be built here", allow_module_level=True)

TOLERANCES = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.bfloat16: {"atol": 2e-3, "rtol": 2**-8},
    torch.float16: {"atol": 1e-3, "rtol": 2**-10},
}


def reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Gathers each row's keys token by token, then softmax(q k^T * scale) v in float64."""
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // num_kv_heads
    out = []
    for b in range(q.shape[0]):
        t = torch.arange(int(lens[b]))
        blocks, offsets = tables[b, t // block_size], t % block_size
        keys = k_cache[blocks, offsets].double().repeat_interleave(group, dim=1)  # [n, H, D]
        values = v_cache[blocks, offsets].double().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b].double(), keys) * scale
        out.append(torch.einsum("hn,nhd->hd", scores.softmax(-1), values))
    return torch.stack(out)


def check(q, k_cache, v_cache, tables, lens, scale: float | None = None) -> None:
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = paged_decode_attention(q, k_cache, v_cache, tables, lens, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    ref = reference(q, k_cache, v_cache, tables, lens, scale)
    torch.testing.assert_close(out.double(), ref, **TOLERANCES[q.dtype])


# (H, H_kv): GQA groups 1, 3, 4, 5 and 8 (the kernel handles heads in register groups of up to 4).
HEADS = [(4, 4), (9, 3), (8, 2), (10, 2), (8, 1)]
# Lengths: 1, odd, exact multiples of 16 and 5, and past the 512-key partition (split + merge).
LENS = [1, 7, 16, 33, 80, 161, 512, 513, 1100]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_matches_reference(dtype, heads, head_dim) -> None:
    check(*make_case(LENS, *heads, head_dim, 16, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads", [(4, 4), (9, 3), (8, 1)])
@pytest.mark.parametrize("block_size", [1, 5])
def test_small_blocks(dtype, heads, block_size) -> None:
    # Tiles of 32 keys span several blocks; 5 leaves blocks cut across tiles and partitions.
    check(*make_case([1, 5, 7, 10, 33, 161, 530], *heads, 64, block_size, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [32, 96, 256])
def test_other_head_dims(dtype, head_dim) -> None:
    # 64 and 128 are compiled for their size; the others take the generic head_dim loop.
    check(*make_case([1, 15, 40, 600], 6, 2, head_dim, 16, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_layouts(dtype) -> None:
    # A cache stored as [num_blocks, H_kv, block_size, D] and viewed as [.., block_size, H_kv, ..]:
    # only the last dim is contiguous.
    q, k, v, tables, lens = make_case([3, 17, 50, 530], 9, 3, 64, 16, dtype)
    k2 = k.transpose(1, 2).contiguous().transpose(1, 2)
    v2 = v.transpose(1, 2).contiguous().transpose(1, 2)
    assert not k2.is_contiguous() and k2.stride(-1) == 1
    check(q, k2, v, tables, lens)
    check(q, k, v2, tables, lens)
    # The engine's per-layer views kv[layer, 0] of a [L, 2, ...] cache start mid-storage.
    assert k.storage_offset() > 0 and v.storage_offset() > 0
    check(q, k, v, tables, lens, scale=0.3)
    # A [num_blocks, L, 2, block_size, H_kv, D] cache: each layer's blocks are strided apart.
    kv = torch.stack([k, v], dim=0).unsqueeze(0).expand(3, -1, -1, -1, -1, -1)
    kv = kv.permute(2, 0, 1, 3, 4, 5).contiguous()
    k3, v3 = kv[:, 1, 0], kv[:, 1, 1]
    assert not k3.is_contiguous() and torch.equal(k3, k)
    check(q, k3, v3, tables, lens)


def test_large_scores_stay_finite() -> None:
    # Scores far apart (and far from 0) exercise the running-max rescale.
    q, k, v, tables, lens = make_case([5, 40, 700], 9, 3, 64, 16, torch.float32)
    check(q * 30, k, v, tables, lens)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ctx_len", [1, 37, 192, 1100])
def test_batch_invariance(dtype, ctx_len) -> None:
    """A row's output is bit-identical alone and at another position in a batch of 37 rows."""
    rng = torch.Generator().manual_seed(1)
    lens = torch.randint(1, 1300, (37,), generator=rng).tolist()
    pos = 23
    lens[pos] = ctx_len
    q, k, v, tables, lens_t = make_case(lens, 9, 3, 64, 16, dtype, seed=2)
    batch_out = paged_decode_attention(q, k, v, tables, lens_t, 0.125)
    row = slice(pos, pos + 1)
    alone = paged_decode_attention(
        q[row].clone(), k, v, tables[row, : -(-ctx_len // 16)].clone(), lens_t[row], 0.125
    )
    assert torch.equal(alone, batch_out[row])
    # The same row in a different batch at a different position, and with one thread.
    order = torch.randperm(37, generator=rng)
    new_pos = int((order == pos).nonzero())
    shuffled = paged_decode_attention(q[order], k, v, tables[order], lens_t[order], 0.125)
    assert torch.equal(shuffled[new_pos], batch_out[pos])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = paged_decode_attention(q, k, v, tables, lens_t, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, batch_out)


def test_rejects_bad_inputs() -> None:
    q, k, v, tables, lens = make_case([5, 20], 9, 3, 64, 16, torch.float32)
    with pytest.raises(RuntimeError, match="ctx_lens"):
        paged_decode_attention(q, k, v, tables, torch.tensor([0, 20]), 0.125)
    with pytest.raises(RuntimeError, match="ctx_lens"):
        paged_decode_attention(q, k, v, tables, torch.tensor([5, 16 * tables.shape[1] + 1]), 0.1)
    bad = tables.clone()
    bad[1, 1] = k.shape[0]
    with pytest.raises(RuntimeError, match="block_tables"):
        paged_decode_attention(q, k, v, bad, lens, 0.125)
    with pytest.raises(RuntimeError, match="dtype"):
        paged_decode_attention(q.bfloat16(), k, v, tables, lens, 0.125)
    with pytest.raises(RuntimeError, match="multiple of num_kv_heads"):
        paged_decode_attention(q[:, :8].contiguous(), k, v, tables, lens, 0.125)
    with pytest.raises(RuntimeError, match="contiguous"):
        q_strided = torch.stack([q, q], dim=-1)[..., 0]  # last-dim stride 2
        paged_decode_attention(q_strided, k, v, tables, lens, 0.125)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_q(dtype) -> None:
    # q as the model makes it: a [T, H, D] view of the fused qkv projection output.
    q, k, v, tables, lens = make_case([3, 17, 50, 530], 9, 3, 64, 16, dtype)
    qkv = torch.cat([q, torch.randn(4, 6, 64).to(dtype)], dim=1)  # [B, H + 2 * H_kv, D]
    q_view = qkv[:, :9]
    assert not q_view.is_contiguous()
    out = paged_decode_attention(q_view, k, v, tables, lens, 0.125)
    assert out.is_contiguous()
    assert torch.equal(out, paged_decode_attention(q, k, v, tables, lens, 0.125))
    # Head-major q ([H, B, D] storage): out is still a contiguous [B, H, D].
    q_t = q.transpose(0, 1).contiguous().transpose(0, 1)
    out_t = paged_decode_attention(q_t, k, v, tables, lens, 0.125)
    assert out_t.is_contiguous() and torch.equal(out_t, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("start_pos", "num_query"), [(0, 1), (0, 7), (30, 5), (509, 9)])
def test_prefill_chunk(dtype, start_pos, num_query) -> None:
    end = start_pos + num_query
    _, k, v, tables, _ = make_case([end], 9, 3, 64, 16, dtype)
    table = tables[0]
    q = torch.randn(num_query, 9, 64).to(dtype)
    out = paged_prefill_attention(q, k, v, table, start_pos, 0.125)
    # Causal with offset: query i sees keys [0, start_pos + i].
    t = torch.arange(end)
    keys = k[table[t // 16], t % 16].double().repeat_interleave(3, dim=1)  # [end, H, D]
    values = v[table[t // 16], t % 16].double().repeat_interleave(3, dim=1)
    scores = torch.einsum("ihd,jhd->hij", q.double(), keys) * 0.125
    causal = t.unsqueeze(0) <= torch.arange(start_pos, end).unsqueeze(1)  # [n, end]
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    ref = torch.einsum("hij,jhd->ihd", probs, values)
    torch.testing.assert_close(out.double(), ref, **TOLERANCES[dtype])
    # Each query is bit-identical to a decode row of the same length.
    last = paged_decode_attention(q[-1:], k, v, tables[:1], torch.tensor([end]), 0.125)
    assert torch.equal(out[-1:], last)


def test_supports() -> None:
    assert supports(64, torch.bfloat16) and supports(128, torch.float16)
    assert supports(256, torch.float32) and not supports(80, torch.bfloat16)
    assert not supports(512, torch.float32) and not supports(64, torch.float64)


def test_empty_batch() -> None:
    q, k, v, tables, lens = make_case([5], 9, 3, 64, 16, torch.bfloat16)
    out = paged_decode_attention(q[:0], k, v, tables[:0], lens[:0], 0.125)
    assert out.shape == (0, 9, 64)


def test_env_var_disables(monkeypatch) -> None:
    monkeypatch.setenv("TOKENMILL_NO_EXT", "1")
    assert load_cpu_attention.__wrapped__() is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [1, 8, 100, 600])
def test_sliding_window(dtype, window: int) -> None:
    """Each row attends to its last `window` keys (all of them when shorter), split into
    partitions from its first visible key; table entries behind the window are never read,
    not even checked (a released block's entry may point anywhere)."""
    lens = [1, 7, 33, 161, 513, 1100]
    q, k_cache, v_cache, tables, ctx = make_case(lens, 8, 2, 64, 16, dtype)
    scale = 64**-0.5
    out = paged_decode_attention(q, k_cache, v_cache, tables, ctx, scale, window)
    starts = [max(0, n - window) for n in lens]
    ref = torch.stack([
        reference_window(q[b : b + 1], k_cache, v_cache, tables[b : b + 1], n, start, scale)[0]
        for b, (n, start) in enumerate(zip(lens, starts, strict=True))
    ])  # fmt: skip
    torch.testing.assert_close(out.double(), ref, **TOLERANCES[dtype])
    stale = tables.clone()
    for b, start in enumerate(starts):
        stale[b, : start // 16] = 10**9  # behind the window: never read
    again = paged_decode_attention(q, k_cache, v_cache, stale, ctx, scale, window)
    assert torch.equal(again, out)


def reference_window(q, k_cache, v_cache, tables, n: int, start: int, scale: float):
    """`reference` over keys [start, n) of one row."""
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // num_kv_heads
    t = torch.arange(start, n)
    blocks, offsets = tables[0, t // block_size], t % block_size
    keys = k_cache[blocks, offsets].double().repeat_interleave(group, dim=1)
    values = v_cache[blocks, offsets].double().repeat_interleave(group, dim=1)
    scores = torch.einsum("hd,nhd->hn", q[0].double(), keys) * scale
    return torch.einsum("hn,nhd->hd", scores.softmax(-1), values).unsqueeze(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 20])
def test_soft_capping(dtype, window: int | None) -> None:
    """Gemma 2's logit soft-cap: scores -> cap * tanh(score / cap) before the softmax, a cap
    small enough to bite (the scores reach several times it)."""
    lens = [1, 7, 33, 600]
    q, k_cache, v_cache, tables, ctx = make_case(lens, 8, 2, 64, 16, dtype)
    q = q * 4  # larger scores, so the cap changes them a lot
    scale, cap = 64**-0.5, 2.0
    out = paged_decode_attention(q, k_cache, v_cache, tables, ctx, scale, window, cap)
    ref = []
    for b, n in enumerate(lens):
        start = max(0, n - window) if window else 0
        t = torch.arange(start, n)
        blocks, offsets = tables[b, t // 16], t % 16
        keys = k_cache[blocks, offsets].double().repeat_interleave(4, dim=1)
        values = v_cache[blocks, offsets].double().repeat_interleave(4, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b].double(), keys) * scale
        scores = cap * torch.tanh(scores / cap)
        ref.append(torch.einsum("hn,nhd->hd", scores.softmax(-1), values))
    torch.testing.assert_close(out.double(), torch.stack(ref), **TOLERANCES[dtype])
    uncapped = paged_decode_attention(q, k_cache, v_cache, tables, ctx, scale, window)
    assert (uncapped.double() - out.double()).abs().max() > 0.05
    # a row alone gives the very values it gives in the batch
    alone = paged_decode_attention(q[3:], k_cache, v_cache, tables[3:], ctx[3:], scale, window, cap)
    assert torch.equal(alone[0], out[3])

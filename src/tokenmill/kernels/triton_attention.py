"""Triton attention over the paged KV cache, for the GPU path.

`paged_attention` runs one ragged batch: decode rows and prompt chunks (with or without a cached
prefix) mixed, all read straight from the blocks. `reference_paged_attention` is the same in
plain PyTorch (the test oracle); `supports` tells which head_dim and dtype the kernels take.

Both kernels put the GQA group (the H // H_kv query heads that share a KV head) into the M
dimension of tl.dot: one program handles one KV head for a block of queries, row r being query
r // GROUP, head r % GROUP, and reads each K/V tile once for the whole group. Keys go a tile of
BLOCK_N at a time, each key's block looked up in the block table (BLOCK_N need not match the
cache's block_size). Softmax is online (flash-attention style) in fp32, in base 2.

Everything launched here is CUDA-graph safe: no device->host reads, grids and buffers sized from
shapes and host ints only; programs with no work exit at once.

Import this module only where triton is wanted. On CPU tensors the kernels run under Triton's
interpreter if TRITON_INTERPRET=1 was set before the import (kernels are defined at import).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from tokenmill.kernels.attention_ref import reference_paged_attention

__all__ = ["paged_attention", "reference_paged_attention", "supports", "interpreted"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_LOG2E = 1.4426950408889634
_MAX_SPLITS = 64
_MIN_SPLIT_KEYS = 128  # fewer keys per split program is mostly launch and reduce overhead
_NO_WINDOW = 1 << 30  # the window of a global layer: past any length, far from int32 overflow


def supports(head_dim: int, dtype: torch.dtype) -> bool:
    """Whether the kernels take this head_dim and dtype (head_dim need not be a power of two:
    it is padded to one with masks)."""
    return 16 <= head_dim <= 256 and dtype in _DTYPES


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _add_combine(a, b):
    return a + b


# The kernels call only builtins of triton.language: tl.max, tl.sum, tl.zeros, tl.cdiv are
# @triton.jit functions, which an interpreted kernel cannot call if triton was imported before
# TRITON_INTERPRET was set. Reductions use tl.reduce with triton's own combiners, which the
# interpreter recognises and runs in numpy (ours would run element by element, ~10x slower).
_MAX = getattr(tl.standard, "_elementwise_max", _max_combine)
_ADD = getattr(tl.standard, "_sum_combine", _add_combine)


@triton.jit
def _find_seq(query_start_loc_ptr, block_idx, num_seqs, BLOCK_Q: tl.constexpr):
    # Sequence i owns query blocks [qsl[i] // BLOCK_Q + i, qsl[i + 1] // BLOCK_Q + i + 1): these
    # ranges are disjoint, increasing, hold its cdiv(query_len_i, BLOCK_Q) blocks (the rest idle)
    # and total T // BLOCK_Q + S. Binary search for the last i whose range starts <= block_idx.
    left = 0
    right = num_seqs
    while left < right:
        mid = (left + right) // 2
        if tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid <= block_idx:
            left = mid + 1
        else:
            right = mid
    return left - 1


# Sizes that vary from step to step are runtime ints, not specialised (on == 1), to keep the
# number of compiled variants small: each is compiled on first use, which must not happen
# inside CUDA graph capture (warm every captured shape up first).
@triton.jit(do_not_specialize=["num_seqs", "split_size", "num_splits", "window"])
def _attn_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr,  # out: [T, H, D], unused when SPLIT
    part_acc_ptr, part_ml_ptr,  # [S, H, num_splits, D], [S, H, num_splits, 2] fp32 when SPLIT
    block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    qk_scale, softcap, num_seqs, split_size, num_splits, window,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, SOFTCAP: tl.constexpr,
):  # fmt: skip
    # window: a query at p sees keys (p - window, p] (no window: a bound past any length).
    # SOFTCAP: scores -> softcap * tanh(scores / softcap), qk_scale then being the plain scale.
    kv_head = tl.program_id(1)
    if SPLIT:
        # Decode only (every query_len <= 1): grid (S, H_kv, num_splits), split s takes keys
        # [s * split_size, (s + 1) * split_size).
        seq = tl.program_id(0)
        q_block = 0
    else:
        # grid (T // BLOCK_Q + S, H_kv), see _find_seq.
        seq = _find_seq(query_start_loc_ptr, tl.program_id(0), num_seqs, BLOCK_Q)
        q_block = tl.program_id(0) - (tl.load(query_start_loc_ptr + seq) // BLOCK_Q + seq)
    q_start = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - query_len  # keys before this step's first query
    if SPLIT:
        # the row's query sits at seq_len - 1: keys before seq_len - window are out of its window
        k_lo = tl.maximum(tl.program_id(2) * split_size, seq_len - window)
        k_hi = tl.minimum(seq_len, tl.program_id(2) * split_size + split_size)
    else:
        # The block's last query sits at context_len + min(query_len, (q_block+1)*BLOCK_Q) - 1,
        # its first at context_len + q_block * BLOCK_Q, which sees keys from there - window + 1.
        k_lo = tl.maximum(0, context_len + q_block * BLOCK_Q - window + 1)
        k_hi = tl.minimum(seq_len, context_len + (q_block + 1) * BLOCK_Q)
    if q_block * BLOCK_Q >= query_len or k_lo >= k_hi:
        return

    offs_m = tl.arange(0, BLOCK_M)
    q_idx = q_block * BLOCK_Q + offs_m // GROUP  # [BLOCK_M] query index within the sequence
    head = kv_head * GROUP + offs_m % GROUP  # [BLOCK_M] query head
    row_ok = (offs_m < BLOCK_Q * GROUP) & (q_idx < query_len)
    q_pos = context_len + q_idx  # absolute position: it sees keys [0, q_pos]
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_rows = (q_start + q_idx).to(tl.int64)
    q = tl.load(
        q_ptr + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # [BLOCK_M, BLOCK_D]
    if UPCAST:
        q = q.to(tl.float32)

    # m_i starts finite so a row whose tile is all masked gets p = 0, alpha = 1 (no inf - inf);
    # a real row always has key q_pos in its window, so its m_i is a real score once the tile
    # holding q_pos is read (a row of the block whose window starts later sees only -inf before:
    # p = 0 there, and alpha = 0 wipes nothing real); in split mode k_lo < k_hi <= q_pos + 1.
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for start in range(k_lo, k_hi, BLOCK_N):
        k_pos = start + offs_n  # [BLOCK_N]
        k_ok = k_pos < k_hi
        blk = tl.load(table + k_pos // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
        k_off = blk * stride_kb + (k_pos % BLOCK_SIZE) * stride_ks + kv_head * stride_kh
        v_off = blk * stride_vb + (k_pos % BLOCK_SIZE) * stride_vs + kv_head * stride_vh
        k_mask = k_ok[None, :] & d_ok[:, None]
        k = tl.load(k_ptr + k_off[None, :] + offs_d[:, None], mask=k_mask, other=0.0)  # [D, N]
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        if SOFTCAP:
            # tanh(x) = 1 - 2 / (exp(2x) + 1): exact at both ends (exp -> inf or 0), then the
            # base-2 factor the plain path folds into qk_scale.
            s = (softcap - 2.0 * softcap / (tl.exp(2.0 * s / softcap) + 1.0)) * 1.4426950408889634
        visible = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] > q_pos[:, None] - window)
        s = tl.where(k_ok[None, :] & visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.reduce(p, 1, _ADD)
        v_mask = k_ok[:, None] & d_ok[None, :]
        v = tl.load(v_ptr + v_off[:, None] + offs_d[None, :], mask=v_mask, other=0.0)  # [N, D]
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    if SPLIT:
        # Unnormalised partials; _reduce_kernel reads only splits that hold keys.
        part = (seq.to(tl.int64) * NUM_HEADS + head) * num_splits + tl.program_id(2)
        tl.store(part_ml_ptr + part * 2, m_i, mask=row_ok)
        tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=row_ok)
        part_off = part[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(part_acc_ptr + part_off, acc, mask=row_ok[:, None] & d_ok[None, :])
    else:
        # l_i >= 1 on real rows (the max score contributes 1); rows past the block's queries
        # may see no key at all under a window (l_i = 0), and are not stored
        out = acc / tl.where(row_ok, l_i, 1.0)[:, None]
        out_off = q_rows[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
        out_mask = row_ok[:, None] & d_ok[None, :]
        tl.store(out_ptr + out_off, out.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit(do_not_specialize=["split_size", "num_splits", "window"])
def _reduce_kernel(
    out_ptr, part_acc_ptr, part_ml_ptr, seq_lens_ptr, query_start_loc_ptr,
    split_size, num_splits, window, stride_ot, stride_oh,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    SPLITS_P2: tl.constexpr,
):  # fmt: skip
    # grid (S, H): merges one decode row's split partials.
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_start = tl.load(query_start_loc_ptr + seq)
    seq_len = tl.load(seq_lens_ptr + seq)
    num_valid = (seq_len + split_size - 1) // split_size
    # splits wholly before the window hold no keys (the attention kernel skipped them)
    first_valid = tl.maximum(seq_len - window, 0) // split_size
    if tl.load(query_start_loc_ptr + seq + 1) == q_start or num_valid == 0:
        return  # padding: no query, or no key (the attention kernel skipped it too)
    offs_s = tl.arange(0, SPLITS_P2)
    s_ok = (offs_s >= first_valid) & (offs_s < num_valid) & (offs_s < num_splits)
    part = (seq.to(tl.int64) * NUM_HEADS + head) * num_splits + offs_s  # [SPLITS_P2]
    m = tl.load(part_ml_ptr + part * 2, mask=s_ok, other=float("-inf"))
    l_s = tl.load(part_ml_ptr + part * 2 + 1, mask=s_ok, other=0.0)
    w = tl.exp2(m - tl.reduce(m, 0, _MAX))  # [SPLITS_P2], 0 on unused splits
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    acc = tl.load(
        part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :],
        mask=s_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # [SPLITS_P2, BLOCK_D]
    out = tl.reduce(acc * w[:, None], 0, _ADD) / tl.reduce(l_s * w, 0, _ADD)
    out_off = q_start.to(tl.int64) * stride_ot + head * stride_oh + offs_d
    tl.store(out_ptr + out_off, out.to(out_ptr.dtype.element_ty), mask=d_ok)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: few, so that small test batches take the split path
    return torch.cuda.get_device_properties(device).multi_processor_count


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    scale: float,
    out: torch.Tensor | None = None,
    *,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Causal attention for a packed ragged batch whose KV (prefix and new tokens) is in the cache.

    q: [T, H, D] float32/bfloat16/float16, last dim contiguous (a view of the fused qkv output
    is fine); k_cache, v_cache: [num_blocks, block_size, H_kv, D] of q's dtype, last dim
    contiguous (per-layer views of the full cache are fine); block_tables: [S, max_blocks]
    int32 (unused trailing entries may hold any valid block id); seq_lens: [S] int32, keys of
    sequence i; query_start_loc: [S + 1] int32, its queries are rows query_start_loc[i] ..
    query_start_loc[i+1] - 1. Query j of sequence i sits at position seq_lens[i] - query_len_i
    + j and sees keys [0, that position]. max_query_len: a host-side upper bound on every
    query_len; 1 picks the split-K decode path. H must be a multiple of H_kv (query head h reads
    kv head h // (H // H_kv)); see `supports`. Returns out (allocated like q if None), [T, H, D]
    in q's dtype. Padding is allowed and its out rows are left untouched: sequences with
    query_len 0 or seq_len 0, and rows of q past query_start_loc[S].

    Decode path: each row's keys are split into num_splits ranges of split_size keys, each range
    one program, then merged. max_seq_len (host-side upper bound on seq_lens, default
    max_blocks * block_size) sizes the ranges: keys past num_splits * split_size would be
    dropped, so under a CUDA graph it must bound every replay. num_splits defaults to enough
    programs to fill the GPU; results differ in the last bits between split counts.

    window: a query at position p sees only keys (p - window, p]; softcap: scores become
    softcap * tanh(scores / softcap) before the softmax (both None: plain causal attention).
    """
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = block_tables.shape[0]
    _, block_size, num_kv_heads, _ = k_cache.shape
    if not supports(head_dim, q.dtype):
        raise ValueError(f"unsupported head_dim {head_dim} or dtype {q.dtype} (see supports)")
    if num_heads % num_kv_heads or k_cache.dtype != q.dtype or v_cache.shape != k_cache.shape:
        raise ValueError("q, k_cache, v_cache disagree on heads, dtype or shape")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q, k_cache and v_cache need a contiguous last dim")
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError("out must be like q, with a contiguous last dim")
    if num_tokens == 0 or num_seqs == 0:
        return out
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    window_arg = _NO_WINDOW if window is None else min(window, _NO_WINDOW)
    group = num_heads // num_kv_heads
    block_d = triton.next_power_of_2(head_dim)
    # Tiles chosen so that no (dtype, head_dim) spills registers on sm_90 (ptxas -v); fp32's
    # IEEE dot runs on the FMA units and holds whole tiles in registers, so it gets smaller ones.
    fp32 = q.dtype == torch.float32
    block_n = (32 if block_d <= 128 else 16) if fp32 else (64 if block_d <= 128 else 32)
    max_m = 32 if fp32 or block_d > 128 else 64
    num_warps = 4 if block_d <= 64 and not fp32 else 8
    # M rows = BLOCK_Q queries x GROUP heads; 16 is tl.dot's minimum.
    group_p2 = triton.next_power_of_2(group)
    block_m = min(max(16, group_p2, triton.next_power_of_2(max_query_len * group)), max_m)
    block_m = max(block_m, group_p2)
    block_q = block_m // group

    max_seq_len = max(1, block_tables.shape[1] * block_size if max_seq_len is None else max_seq_len)
    if num_splits is None:  # about two programs per SM, each with >= _MIN_SPLIT_KEYS keys
        want = triton.cdiv(2 * _num_sms(q.device), num_seqs * num_kv_heads)
        num_splits = min(want, triton.cdiv(max_seq_len, _MIN_SPLIT_KEYS))
    num_splits = max(1, min(num_splits, _MAX_SPLITS)) if max_query_len <= 1 else 1
    split_size = triton.cdiv(triton.cdiv(max_seq_len, num_splits), block_n) * block_n
    num_splits = triton.cdiv(max_seq_len, split_size)  # rounding up split_size may need fewer
    if num_splits == 1:
        grid: tuple[int, ...] = (num_tokens // block_q + num_seqs, num_kv_heads)
        part_acc = part_ml = out  # unused
    else:
        grid = (num_seqs, num_kv_heads, num_splits)
        part_acc = torch.empty(num_seqs, num_heads, num_splits, head_dim, device=q.device)
        part_ml = torch.empty(num_seqs, num_heads, num_splits, 2, device=q.device)

    # Triton's interpreter multiplies bf16 as raw uint16 bits in tl.dot (3.9): upcast there.
    upcast = q.device.type != "cuda" and q.dtype == torch.bfloat16
    _attn_kernel[grid](
        q, k_cache, v_cache, out, part_acc, part_ml, block_tables, seq_lens, query_start_loc,
        scale if softcap else scale * _LOG2E, softcap or 0.0, num_seqs, split_size, num_splits,
        window_arg,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3], block_tables.stride(0),
        NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_D=block_d, GROUP=group, BLOCK_M=block_m,
        BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_SIZE=block_size, SPLIT=num_splits > 1,
        # fp32 inputs keep fp32 products (the default would round them to tf32)
        DOT_PRECISION="ieee" if fp32 or upcast else None, UPCAST=upcast,
        SOFTCAP=bool(softcap), num_warps=num_warps,
    )  # fmt: skip
    if num_splits > 1:
        _reduce_kernel[(num_seqs, num_heads)](
            out, part_acc, part_ml, seq_lens, query_start_loc, split_size, num_splits, window_arg,
            out.stride(0), out.stride(1), NUM_HEADS=num_heads, HEAD_DIM=head_dim,
            BLOCK_D=block_d, SPLITS_P2=triton.next_power_of_2(num_splits), num_warps=4,
        )  # fmt: skip
    return out


def interpreted() -> bool:
    """Whether the kernels run under Triton's interpreter (TRITON_INTERPRET=1 at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_attn_kernel, InterpretedFunction)

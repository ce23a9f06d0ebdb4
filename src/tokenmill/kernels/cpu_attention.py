"""C++ CPU decode attention over the paged KV cache (csrc/paged_attention.cpp).

`load_cpu_attention()` JIT-builds the extension on first use (see kernels.cpp_build),
at most once per process; None (with one warning) where it cannot be built.

`paged_decode_attention` runs the decode kernel (one query token per row);
`paged_chunk_attention` runs the tiled kernel for prompt chunks of several sequences at once, each
row bit-identical to a decode row with the same keys; `paged_prefill_attention` runs the decode
kernel once per query token of one chunk; `supports` tells which head_dim and dtype they take.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from tokenmill.kernels.cpp_build import load_extension

EXT_NAME = "tokenmill_cpu_attn"
_SOURCE = "paged_attention.cpp"


@functools.cache
def load_cpu_attention() -> Any | None:
    """The op namespace `torch.ops.tokenmill_cpu_attn`, building it if needed; None if unavailable.

    Built at most once per process; TOKENMILL_NO_EXT=1 disables it.
    """
    return load_extension(EXT_NAME, _SOURCE, "paged_decode_attention", "C++ CPU attention")


_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def supports(head_dim: int, dtype: torch.dtype) -> bool:
    """Whether the kernel takes this head_dim and dtype (the extension may still be unavailable)."""
    return head_dim % 32 == 0 and head_dim <= 256 and dtype in _DTYPES


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    ctx_lens: torch.Tensor,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Decode attention, one query token per row, read straight from the paged cache.

    q: [B, H, D] float32/bfloat16/float16, last dim contiguous (a view of the fused qkv output
    is fine); k_cache, v_cache: [num_blocks, block_size, H_kv, D] of q's dtype, last dim
    contiguous (per-layer views of the full cache are fine); block_tables: [B, max_blocks]
    int64; ctx_lens: [B] int64, each in [1, max_blocks * block_size]; all on CPU. H must be a
    multiple of H_kv (query head h reads kv head h // (H // H_kv)); D a multiple of 32, at most
    256 (see `supports`). Returns a contiguous [B, H, D] in q's dtype. A row's result does not
    depend on the other rows nor on the thread count. `window`: each row attends to its last
    `window` keys only (a sliding window; the table's entries before them are never read).
    `softcap`: scaled scores become softcap * tanh(score / softcap) before the softmax.
    Raises RuntimeError on bad input, or if the extension is unavailable (check
    `load_cpu_attention()` first).
    """
    ops = load_cpu_attention()
    if ops is None:
        raise RuntimeError(f"{EXT_NAME} is unavailable; use the reference attention")
    return ops.paged_decode_attention.default(
        q,
        k_cache,
        v_cache,
        block_tables,
        ctx_lens,
        float(scale),
        window or 0,
        float(softcap or 0.0),
    )


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    start_pos: int,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Causal attention for a chunk of n query tokens at positions start_pos .. start_pos + n - 1
    whose keys (cached prefix and the chunk itself) are already in the cache.

    q: [n, H, D]; block_table: [>= ceil((start_pos + n) / block_size)] int64. Query i is
    computed exactly like a decode row with start_pos + i + 1 keys, so a token's output is
    bit-identical whether it was decoded or part of a chunk. Each query reads its keys on its
    own (no sharing across the chunk): faster than gather + SDPA only for short chunks (a few
    tokens; see benchmarks/attention_cpu.py --prefill).
    """
    n = q.shape[0]
    lens = torch.arange(start_pos + 1, start_pos + n + 1, dtype=torch.int64)
    tables = block_table.expand(n, -1)
    return paged_decode_attention(q, k_cache, v_cache, tables, lens, scale, window, softcap)


def paged_chunk_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Causal attention for the query rows of S sequences packed in q [T, H, D], keys read from
    the paged cache (each chunk's own KV already written).

    Sequence s owns rows query_start_loc[s] .. query_start_loc[s + 1] - 1 (at least one) and
    seq_lens[s] keys, so its i-th row sits at position seq_lens[s] - n_s + i. block_tables:
    [S, max_blocks] int64; seq_lens: [S] int64; query_start_loc: [S + 1] int64 from 0 to T.
    Other arguments as for `paged_decode_attention`. Every row's output is bit-identical to the
    decode kernel's for a row with the same query and keys: independent of the chunking, of a
    prefix-cache hit, of the other sequences in the call and of the thread count. Keys are
    shared across a block of rows through tiles of 32, so long chunks cost about as much as
    SDPA (see benchmarks/invariant_attention.py); with a sliding window each row is computed on
    its own (decode speed per row).
    """
    ops = load_cpu_attention()
    if ops is None:
        raise RuntimeError(f"{EXT_NAME} is unavailable; use the reference attention")
    return ops.paged_chunk_attention.default(
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        float(scale),
        window or 0,
        float(softcap or 0.0),
    )

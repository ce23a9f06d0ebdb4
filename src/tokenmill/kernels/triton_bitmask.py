"""Grammar token masks on the GPU: one Triton launch sets to -inf every logit whose bit is 0.

`bitmask` is xgrammar's layout: int32 words, bit i of word w allows token 32 w + i. Row j of
`bitmask` masks logits row `rows[j]` (a constrained request's row; free rows are not touched).
Each program handles one masked row and BLOCK consecutive vocabulary ids, so it loads BLOCK // 32
words, expands them to bits in registers and stores only where a token is banned. The launch
reads shapes only on the host (no sync), so it can run inside a captured step.

Import this module only where triton is wanted; on CPU tensors it runs under Triton's interpreter
when TRITON_INTERPRET=1 was set before the import (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # vocabulary ids per program (a multiple of 32)


@triton.jit
def _apply_bitmask_kernel(
    logits_ptr,
    bitmask_ptr,
    rows_ptr,
    vocab_size,
    logits_stride,
    bitmask_stride,
    BLOCK: tl.constexpr,
):
    j = tl.program_id(0)
    start = tl.program_id(1) * BLOCK
    row = tl.load(rows_ptr + j).to(tl.int64)
    words_at = start // 32 + tl.arange(0, BLOCK // 32)
    words = tl.load(
        bitmask_ptr + j * bitmask_stride + words_at, mask=words_at < bitmask_stride, other=0
    )
    bits = (words[:, None] >> tl.arange(0, 32)[None, :]) & 1  # [BLOCK // 32, 32]
    banned = tl.reshape(bits == 0, (BLOCK,))
    ids = start + tl.arange(0, BLOCK)
    tl.store(
        logits_ptr + row * logits_stride + ids, float("-inf"), mask=banned & (ids < vocab_size)
    )


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """In place: logits[rows[j], t] = -inf where bit t of bitmask[j] is 0, for t < vocab.
    logits [num_rows, vocab] (rows contiguous), bitmask int32 [len(rows), ceil(vocab / 32)],
    rows int32; all on one device."""
    assert bitmask.dtype == torch.int32 and rows.dtype == torch.int32
    assert logits.stride(-1) == 1 and bitmask.is_contiguous()
    assert bitmask.shape[0] == rows.shape[0] and bitmask.shape[1] * 32 >= logits.shape[1]
    if rows.numel() == 0:
        return
    vocab = logits.shape[1]
    grid = (rows.numel(), triton.cdiv(vocab, BLOCK))
    _apply_bitmask_kernel[grid](
        logits, bitmask, rows, vocab, logits.stride(0), bitmask.shape[1], BLOCK=BLOCK
    )


def interpreted() -> bool:
    """Whether the kernel runs under Triton's interpreter (TRITON_INTERPRET=1 at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_apply_bitmask_kernel, InterpretedFunction)

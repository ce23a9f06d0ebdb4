"""Row-wise tensor primitives of the sampler. A vocabulary is split into blocks of `BLOCK`
tokens: argmax and top-k first pick blocks from per-block maxima and then look inside them, so
no op sorts or scans the whole vocabulary more than once. Every op is row-local."""

from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCK = 64  # tokens per vocab block


def row_index(idx: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(idx, dtype=torch.long, device=device)


def take_rows(t: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """Rows `idx` of `t`: `t` itself when they are all of them, else a copy. index_select, not
    advanced indexing: on CPU the latter's index kernel is several times slower per row."""
    return t if len(idx) == t.shape[0] else t.index_select(0, row_index(idx, t.device))


def pad_blocks(t: torch.Tensor, fill: float) -> torch.Tensor:
    """`t` [m, v] widened to a whole number of blocks with `fill`."""
    extra = -t.shape[1] % BLOCK
    return F.pad(t, (0, extra), value=fill) if extra else t


def block_argmax(x: torch.Tensor) -> torch.Tensor:
    """Row argmax of `x` [m, v] (first maximum), exactly; much faster than torch.argmax on CPU."""
    m, v = x.shape
    if v < 4 * BLOCK:
        return x.argmax(dim=-1)
    blocks = pad_blocks(x, float("-inf")).view(m, -1, BLOCK)  # [m, nb, B]
    b = blocks.amax(dim=-1).argmax(dim=-1)  # [m] the first block holding the row's max
    inner = blocks.gather(1, b.view(m, 1, 1).expand(m, 1, BLOCK)).squeeze(1)  # [m, B]
    return b * BLOCK + inner.argmax(dim=-1)


def block_topk(t: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k values and ids per row of `t` [m, vp], vp a multiple of BLOCK.

    The top k values all lie in the k blocks with the largest maxima, so only those are ranked.
    """
    m, vp = t.shape
    nb = vp // BLOCK
    if 4 * k > nb:
        return t.topk(k, dim=-1)
    blocks = t.view(m, nb, BLOCK)
    top_blocks = blocks.amax(dim=-1).topk(k, dim=-1).indices  # [m, k]
    offsets = torch.arange(BLOCK, device=t.device)
    ids = (top_blocks.unsqueeze(-1) * BLOCK + offsets).view(m, k * BLOCK)
    vals, pos = t.gather(1, ids).topk(k, dim=-1)  # [m, k]
    return vals, ids.gather(1, pos)

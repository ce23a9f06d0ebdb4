"""Applying the grammars' token masks to a step's logits: one bitmask for the constrained rows,
filled by xgrammar (in parallel, without the GIL, for several rows), then applied in one op.

CPU logits: xgrammar's C++ kernel, straight from the host bitmask. CUDA logits: the bitmask's
constrained rows are copied once and one Triton launch (`kernels/triton_bitmask.py`) bans the
tokens; without triton, a torch expansion of the bits does the same in a few ops.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
import xgrammar as xgr

from tokenmill.structured.grammar import MaskRow, RequestGrammar

_BATCH_FILL_MIN_ROWS = 4  # below this, threads cost more than they save
_BATCH: list[xgr.BatchGrammarMatcher] = []
# Host bitmasks by vocabulary size, grown as needed; per thread, as each engine samples on its
# own thread (two engines in one process never share one).
_BUFFERS = threading.local()
_BIT = torch.arange(32, dtype=torch.int32)
_BITS32 = np.arange(32)
# masked_argmax gathers the allowed ids of a mask with at most this many nonzero words (a JSON
# position past a key or a value: a few dozen ids); a denser one takes a masked copy of the row.
_SPARSE_WORDS = 64


def _batch_matcher() -> xgr.BatchGrammarMatcher:
    if not _BATCH:  # one per process, made on first use (engine thread only)
        _BATCH.append(xgr.BatchGrammarMatcher(max_threads="auto"))
    return _BATCH[0]


def _host_bitmask(num_rows: int, vocab: int) -> torch.Tensor:
    """A reused host bitmask with at least `num_rows` rows. Reuse is safe: every row used is
    filled whole before it is read, and a device copy of it completes before the next fill
    (the step's sampled tokens reach the host in between)."""
    buffers: dict[int, torch.Tensor] = _BUFFERS.__dict__.setdefault("by_vocab", {})
    buf = buffers.get(vocab)
    if buf is None or buf.shape[0] < num_rows:
        # A normal tensor even when first needed under inference_mode (the engine samples there),
        # so that later fills outside it may write it too.
        with torch.inference_mode(False):
            buf = xgr.allocate_token_bitmask(max(num_rows, 8), vocab)
        buffers[vocab] = buf
    return buf


def fill_bitmask(
    grammars: list[RequestGrammar | MaskRow], bitmask: torch.Tensor, rows: list[int]
) -> None:
    """bitmask[rows[j]] gets what grammars[j] allows next (a MaskRow: its precomputed mask)."""
    matchers, at = [], []
    for g, i in zip(grammars, rows, strict=True):
        kept = g.row if isinstance(g, MaskRow) else g.kept_mask()
        if kept is not None:  # computed ahead: a draft position's, or forced_tokens' last fill
            bitmask[i].copy_(kept)
        else:
            matchers.append(g.matcher)
            at.append(i)
    if len(matchers) < _BATCH_FILL_MIN_ROWS:
        for m, i in zip(matchers, at, strict=True):
            m.fill_next_token_bitmask(bitmask, i)
    else:  # xgrammar's threads fill the rows in parallel, without the GIL
        _batch_matcher().batch_fill_next_token_bitmask(matchers, bitmask, at)


def apply_grammar_masks(
    logits: torch.Tensor, grammars: list[RequestGrammar | MaskRow | None]
) -> None:
    """Sets to -inf, in place, every logit the row's grammar does not allow next; rows without
    a grammar are untouched. `logits` [len(grammars), vocab] float32."""
    rows = [i for i, g in enumerate(grammars) if g is not None]
    if not rows:
        return
    live: list[RequestGrammar | MaskRow] = [grammars[i] for i in rows]  # type: ignore[misc]
    vocab = logits.shape[1]
    if logits.device.type == "cpu":  # xgrammar's kernel indexes logits and bitmask alike
        bitmask = _host_bitmask(logits.shape[0], vocab)
        fill_bitmask(live, bitmask, rows)
        xgr.apply_token_bitmask_inplace(logits, bitmask[: logits.shape[0]], indices=rows)
        return
    bitmask = _host_bitmask(len(rows), vocab)  # compact: row j masks logits row rows[j]
    fill_bitmask(live, bitmask, list(range(len(rows))))
    dev = logits.device
    device_mask = bitmask[: len(rows)].to(dev)
    device_rows = torch.tensor(rows, dtype=torch.int32).to(dev)
    apply_bitmask_on_device(logits, device_mask, device_rows)


def masked_argmax(
    logits: torch.Tensor, rows: list[int], grammars: list[RequestGrammar | MaskRow]
) -> list[int]:
    """For each j, the argmax (first maximum) of `logits[rows[j]]` over the ids grammars[j]
    allows: what apply_grammar_masks then an argmax give. `logits` [n, vocab] float32 is not
    modified. On a CPU, numpy: xgrammar's kernel costs ~5 ns per banned logit, ~250 us for a
    row that allows a handful of 49k tokens, the case a rejected greedy argmax mostly meets."""
    if logits.device.type != "cpu":
        sub = logits.index_select(0, torch.tensor(rows, device=logits.device))
        apply_grammar_masks(sub, grammars)  # type: ignore[arg-type]
        return sub.argmax(dim=-1).tolist()
    vocab = logits.shape[1]
    bitmask = _host_bitmask(len(rows), vocab)
    fill_bitmask(grammars, bitmask, list(range(len(rows))))
    out = []
    for j, r in enumerate(rows):
        words = bitmask[j].numpy()
        row = logits[r].numpy()
        nz = np.flatnonzero(words)  # the words that allow some id
        if len(nz) <= _SPARSE_WORDS:  # gather the allowed ids: a few cache lines of the row
            bits = np.unpackbits(words[nz].view(np.uint8), bitorder="little").view(np.bool_)
            ids = (nz[:, None] * 32 + _BITS32).reshape(-1)[bits]  # ascending
            ids = ids[ids < vocab]
            if len(ids):
                out.append(int(ids[row[ids].argmax()]))  # first maximum: the smallest id
                continue
        out.append(_dense_masked_argmax(words, row, vocab))
    return out


def _dense_masked_argmax(words: np.ndarray, row: np.ndarray, vocab: int) -> int:
    """The masked argmax by a masked copy of the whole row (into a reused buffer: a fresh
    ~200 KB array per row costs more than the work)."""
    buffers: dict[int, np.ndarray] = _BUFFERS.__dict__.setdefault("masked_logits", {})
    masked = buffers.get(vocab)
    if masked is None:
        masked = buffers[vocab] = np.empty(vocab, dtype=np.float32)
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")  # token order
    masked.fill(-np.inf)
    np.copyto(masked, row, where=bits[:vocab].view(np.bool_))
    return int(masked.argmax())


def apply_bitmask_on_device(
    logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor
) -> None:
    """logits[rows[j], t] = -inf where bit t of bitmask[j] is 0: Triton where it is installed,
    else torch ops (any device)."""
    try:
        from tokenmill.kernels.triton_bitmask import apply_bitmask
    except ImportError:
        apply_bitmask_torch(logits, bitmask, rows)
    else:
        apply_bitmask(logits, bitmask, rows)


def apply_bitmask_torch(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """The same as the Triton kernel in torch ops: expand the bits, one masked fill per row set."""
    vocab = logits.shape[1]
    bits = (bitmask.unsqueeze(-1) >> _BIT.to(bitmask.device)) & 1  # [n, words, 32]
    banned = bits.flatten(1)[:, :vocab] == 0
    idx = rows.long()
    logits[idx] = logits[idx].masked_fill(banned, float("-inf"))

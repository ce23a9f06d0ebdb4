"""The draw for rows with temperature > 0: temperature, then top-k, top-p and min-p as one
probability threshold per row, then an inverse-CDF draw in token-id order.

The whole randomness of a draw is one uniform hashed from (seed, len(output_token_ids)), and
every tensor op is row-local, which is what makes seeded sampling batch-independent (see
sampler). Top-p first looks for its nucleus among a few candidates, and the inverse CDF picks a
block from per-block sums before a token inside it (see block_ops).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from tokenmill.sampling.block_ops import BLOCK, block_topk, pad_blocks, row_index, take_rows

if TYPE_CHECKING:
    from tokenmill.sampling.sampler import SamplingRow

_MIN_CANDIDATES = 32  # top-p first looks for its nucleus among this many tokens,
_WIDE_CANDIDATES = 4096  # then among this many, then in the whole vocabulary
_FEW_TOP_K = 127  # top-k up to this draws among candidates instead of the whole vocabulary
_MASK64 = (1 << 64) - 1


def sample(x: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """One token per row of processed logits `x` [m, vocab], for rows with temperature > 0.

    Filters keep the tokens with probability >= a per-row threshold. A row that keeps fewer
    tokens than its `cap` draws among its top candidates, the others over the whole vocabulary;
    both are the same inverse CDF in token-id order, and which one a row takes depends on that
    row alone.
    """
    m, vocab = x.shape
    dev = x.device
    temps = [r.params.temperature for r in rows]
    if any(t != 1.0 for t in temps):
        x = x / torch.tensor(temps, device=dev).unsqueeze(1)
    probs = torch.softmax(pad_blocks(x, float("-inf")), dim=-1)  # [m, vp]
    u = torch.tensor(
        [_uniform(r.seed, len(r.output_token_ids)) for r in rows], dtype=torch.float64, device=dev
    )
    top_k = [r.params.top_k if 0 < r.params.top_k < vocab else 0 for r in rows]
    top_p = [r.params.top_p for r in rows]
    min_p = [r.params.min_p for r in rows]
    trunc = [i for i in range(m) if top_k[i] or top_p[i] < 1.0]
    if not trunc and not any(min_p):
        return _inverse_cdf(probs, u)

    thr = torch.zeros(m, device=dev)
    if trunc:
        k = torch.tensor([top_k[i] for i in trunc], device=dev)
        p = torch.tensor([top_p[i] for i in trunc], device=dev)
        trunc_thr, cand_vals, cand_ids, cap = _truncation(take_rows(probs, trunc), k, p)
        thr[row_index(trunc, dev)] = trunc_thr
    if any(min_p):
        thr = torch.maximum(thr, torch.tensor(min_p, device=dev) * probs.amax(dim=-1))
    out = torch.empty(m, dtype=torch.long, device=dev)
    rest = list(range(m))
    if trunc:
        # the cap-th largest is dropped, so every kept token is a candidate
        dropped = (
            cand_vals.gather(1, (cap - 1).unsqueeze(1)).squeeze(1) < thr[row_index(trunc, dev)]
        )
        few = dropped.nonzero().squeeze(1)  # [s]
        if len(few):
            at = row_index([trunc[i] for i in few.tolist()], dev)
            out[at] = _draw_among(cand_vals[few], cand_ids[few], thr[at], u[at])
            rest = sorted(set(rest) - set(at.tolist()))
    if rest:
        at = row_index(rest, dev)
        probs, rest_thr = take_rows(probs, rest), thr[at].unsqueeze(1)  # [r, vp], [r, 1]
        if bool((rest_thr > 0).any()):
            # sign() of the exact difference: 1 where probs >= thr, else 0 (bool ops are slow)
            probs.mul_((probs - rest_thr).sign_().add_(1.0).clamp_max_(1.0))
        out[at] = _inverse_cdf(probs, u[at])
    return out


def _truncation(
    probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Threshold of top-k then top-p per row of `probs` [f, vp] (top_k 0 and top_p 1 mean off).

    Also returns the candidates, the K largest probabilities and their ids [f, K], and per row
    how many of them (`cap` [f], a function of the row's params alone) `sample` may draw among.
    """
    vp = probs.shape[1]
    cap = torch.where(top_k > 0, top_k.clamp(max=_FEW_TOP_K) + 1, 0)
    cap = cap.clamp(min=_MIN_CANDIDATES, max=vp)
    vals, ids = block_topk(probs, int(cap.max()))
    thr, done = _nucleus(vals, top_k, top_p, vp)
    for wider in (_WIDE_CANDIDATES, vp):
        if bool(done.all()) or wider <= vals.shape[1]:
            continue
        redo = (~done).nonzero().squeeze(1)
        more = _top_sorted(probs[redo], min(wider, vp))  # [len(redo), wider]
        thr[redo], done[redo] = _nucleus(more, top_k[redo], top_p[redo], vp)
    return thr, vals, ids, cap


def _nucleus(
    vals: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, vp: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Thresholds from each row's largest probabilities `vals` [f, K], in descending order.

    Also says per row whether K values sufficed (the nucleus may extend past them if not).
    Every quantity is a prefix sum over positions < K, so it does not depend on K itself.
    """
    big_k = vals.shape[1]
    lim = torch.where(top_k > 0, top_k.clamp(max=big_k), big_k)  # [f] positions top-k keeps
    cum = vals.cumsum(dim=-1)  # [f, K]
    # top-p renormalizes over what top-k kept
    norm = torch.where(top_k > 0, cum.gather(1, (lim - 1).unsqueeze(1)).squeeze(1), 1.0)
    short = (cum < (top_p * norm).unsqueeze(1)).sum(dim=-1)  # [f] index of the first reaching p
    last = torch.where(top_p < 1.0, torch.minimum(short, lim - 1), lim - 1)
    done = torch.where(top_k > 0, top_k <= big_k, short < big_k) | (big_k >= vp)
    thr = vals.gather(1, last.clamp(max=big_k - 1).unsqueeze(1)).squeeze(1)
    return thr, done


def _draw_among(
    vals: torch.Tensor, ids: torch.Tensor, thr: torch.Tensor, u: torch.Tensor
) -> torch.Tensor:
    """Inverse-CDF draw over the candidates [s, C] with vals >= thr [s], in token-id order.

    Every kept token is a candidate here, so this is the full-vocabulary draw restricted to the
    only tokens with mass; ordering by id makes it independent of how ties were ranked.
    """
    keep = vals >= thr.unsqueeze(1)  # [s, C]
    key, order = torch.where(keep, ids, torch.iinfo(torch.long).max).sort(dim=-1)
    cdf = torch.where(keep, vals, 0.0).gather(1, order).double().cumsum(dim=-1)  # [s, C]
    total = cdf[:, -1:]
    target = torch.minimum(u.unsqueeze(1) * total, torch.nextafter(total, torch.zeros_like(total)))
    j = torch.searchsorted(cdf, target, right=True).clamp_(max=vals.shape[1] - 1)
    return key.gather(1, j).squeeze(1)


def _top_sorted(t: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest values per row of `t` [m, vp], descending."""
    if t.device.type != "cpu":
        return t.topk(k, dim=-1).values
    # numpy's partition and sort are 10-20x faster than torch.topk/sort on CPU
    a = t.numpy()
    if k < a.shape[1]:
        a = np.partition(a, a.shape[1] - k, axis=-1)[:, -k:]
    return torch.from_numpy(np.ascontiguousarray(np.sort(a, axis=-1)[:, ::-1]))


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Token per row of (unnormalized) `probs` [m, vp] whose CDF interval holds `u` [m] * total.

    Two levels: pick a block from the block sums, then a token inside it. A token with zero
    probability has an empty interval, so it is never chosen.
    """
    m, vp = probs.shape
    nb = vp // BLOCK
    blocks = probs.view(m, nb, BLOCK)
    block_mass = blocks.sum(dim=-1).double()  # [m, nb]
    block_cdf = block_mass.cumsum(dim=-1)  # [m, nb]
    target = (u * block_cdf[:, -1]).unsqueeze(1)  # [m, 1]
    b = torch.searchsorted(block_cdf, target, right=True).clamp_(max=nb - 1)  # [m, 1]
    before = torch.where(b > 0, block_cdf.gather(1, (b - 1).clamp(min=0)), 0.0)
    inner_cdf = blocks[torch.arange(m, device=probs.device), b.squeeze(1)].double().cumsum(-1)
    inner_total = inner_cdf[:, -1:]  # [m, 1]
    # rescale from the block's sum to its exact cumsum total, and stay strictly below it
    r = (target - before) / block_mass.gather(1, b) * inner_total
    r = torch.minimum(r, torch.nextafter(inner_total, torch.zeros_like(inner_total)))
    j = torch.searchsorted(inner_cdf, r, right=True).clamp_(max=BLOCK - 1)
    return (b * BLOCK + j).squeeze(1)


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _uniform(seed: int, step: int) -> float:
    """A uniform in [0, 1) that depends only on (seed, step): all of a draw's randomness."""
    return (_splitmix64(_splitmix64(seed & _MASK64) ^ step) >> 11) * 2.0**-53

"""Batched next-token sampling with vLLM's semantics and batch-independent seeded draws.

Order per row: logit_bias, min_tokens (stop ids and EOS masked), repetition penalty (prompt and
output), frequency and presence penalties (output), then greedy argmax when temperature is 0,
else temperature, top-k, top-p, min-p and one draw. Logprobs are of the raw model distribution.

Reproducibility invariant: a row's token depends only on its own logits, its params and
(seed, len(output_token_ids)) -- never on which other rows share the batch or where the row sits
in it. The whole randomness of a draw is one uniform hashed from (seed, step) in Python, turned
into a token by inverse-CDF sampling over the vocabulary in token-id order; every tensor op on
the way is row-local (softmax, per-block sums, sequential cumsums, exact top-k values), so the
same seed gives the same tokens alone or in any batch, and a preempted request that is
recomputed continues its sequence exactly.

Speed: a vocabulary is split into blocks of `_BLOCK` tokens. Argmax, top-k values and the
inverse CDF first pick a block from per-block maxima or sums and then look inside that block,
so no op sorts or scans the whole vocabulary more than once. Work only runs for rows that ask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tokenmill.core.sched_types import TopLogprobs
from tokenmill.sampling_params import SamplingParams

_BLOCK = 64  # tokens per vocab block
_MIN_CANDIDATES = 32  # top-p first looks for its nucleus among this many tokens,
_WIDE_CANDIDATES = 4096  # then among this many, then in the whole vocabulary
_FEW_TOP_K = 127  # top-k up to this draws among candidates instead of the whole vocabulary
_SAMPLING_EPS = 1e-5  # temperatures below this are greedy, as in vLLM
_PROMPT_CHUNK = 256  # prompt positions whose log-softmax is materialized at once
_MASK64 = (1 << 64) - 1


@dataclass
class SamplingRow:
    """One request's row in the batch."""

    params: SamplingParams
    seed: int  # per request (and per sample when n > 1); always set by the engine
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # generated so far, before this step's token
    eos_token_ids: frozenset[int] = frozenset()


class Sampler:
    """Turns `logits` [num_rows, vocab] into one token per row, plus logprobs where asked."""

    @torch.inference_mode()
    def __call__(
        self, logits: torch.Tensor, rows: list[SamplingRow]
    ) -> tuple[list[int], list[TopLogprobs | None]]:
        n = logits.shape[0]
        if n != len(rows):
            raise ValueError(f"{n} rows of logits for {len(rows)} sampling rows")
        if n == 0:
            return [], []
        x = _process_logits(logits, rows)  # [n, vocab] float32
        greedy = [i for i, r in enumerate(rows) if r.params.temperature < _SAMPLING_EPS]
        if len(greedy) == n:
            tokens = _argmax(x).tolist()
        else:
            drawn = [i for i, r in enumerate(rows) if r.params.temperature >= _SAMPLING_EPS]
            out = torch.empty(n, dtype=torch.long, device=x.device)
            if greedy:
                out[_index(greedy, x.device)] = _argmax(_take(x, greedy))
            out[_index(drawn, x.device)] = _sample(_take(x, drawn), [rows[i] for i in drawn])
            tokens = out.tolist()

        logprobs: list[TopLogprobs | None] = [None] * n
        want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        if want:
            lp = torch.log_softmax(_take(logits, want).float(), dim=-1)  # [len(want), vocab]
            ks = [rows[i].params.logprobs or 0 for i in want]
            for i, top in zip(want, _top_logprobs(lp, [tokens[i] for i in want], ks), strict=True):
                logprobs[i] = top
        return tokens, logprobs


@torch.inference_mode()
def prompt_logprobs(logits: torch.Tensor, target_ids: list[int], k: int) -> list[TopLogprobs]:
    """Logprobs of `target_ids[i]` (the actual next token) under `logits[i]` [n, vocab], top-k."""
    if logits.shape[0] != len(target_ids):
        raise ValueError(f"{logits.shape[0]} rows of logits for {len(target_ids)} targets")
    out: list[TopLogprobs] = []
    for start in range(0, len(target_ids), _PROMPT_CHUNK):
        targets = target_ids[start : start + _PROMPT_CHUNK]
        lp = torch.log_softmax(logits[start : start + len(targets)].float(), dim=-1)
        out.extend(_top_logprobs(lp, targets, [k] * len(targets)))
    return out


def _index(idx: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(idx, dtype=torch.long, device=device)


def _take(t: torch.Tensor, idx: list[int]) -> torch.Tensor:
    return t if len(idx) == t.shape[0] else t[_index(idx, t.device)]


def _pad(t: torch.Tensor, fill: float) -> torch.Tensor:
    """`t` [m, v] widened to a whole number of blocks with `fill`."""
    extra = -t.shape[1] % _BLOCK
    return F.pad(t, (0, extra), value=fill) if extra else t


def _process_logits(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """float32 logits after bias, min_tokens and penalties; may alias `logits` if none apply."""
    vocab = logits.shape[1]
    bias_at: list[int] = []  # flat indices into the [n, vocab] logits
    bias: list[float] = []
    banned: list[int] = []
    rep_rows: list[int] = []
    pen_rows: list[int] = []
    for i, r in enumerate(rows):
        p, base = r.params, i * vocab
        if p.logit_bias:
            for tok, b in p.logit_bias.items():
                if 0 <= tok < vocab:
                    bias_at.append(base + tok)
                    bias.append(b)
        if len(r.output_token_ids) < p.min_tokens:
            stops = set(p.stop_token_ids or ())
            if not p.ignore_eos:
                stops |= r.eos_token_ids
            banned.extend(base + t for t in stops if 0 <= t < vocab)
        if p.repetition_penalty != 1.0:
            rep_rows.append(i)
        if p.frequency_penalty or p.presence_penalty:
            pen_rows.append(i)
    if not (bias_at or banned or rep_rows or pen_rows):
        return logits.float()

    x = logits.to(torch.float32, copy=True).contiguous()
    flat, dev = x.view(-1), x.device
    if bias_at:
        flat.index_add_(0, _index(bias_at, dev), torch.tensor(bias, device=dev))
    if banned:
        flat.index_fill_(0, _index(banned, dev), float("-inf"))
    if rep_rows:
        at, owner = _flat_ids(
            [r.prompt_token_ids for r in rows], [r.output_token_ids for r in rows], rep_rows, vocab
        )
        at, owner = at.to(dev), owner.to(dev)
        penalty = torch.tensor([r.params.repetition_penalty for r in rows], device=dev)[owner]
        seen = flat[at]  # duplicates read and write the same value, so each token is hit once
        flat[at] = torch.where(seen > 0, seen / penalty, seen * penalty)
    if pen_rows:
        at, _ = _flat_ids(None, [r.output_token_ids for r in rows], pen_rows, vocab)
        at, count = torch.unique(at.to(dev), return_counts=True)
        owner = at // vocab
        freq = torch.tensor([r.params.frequency_penalty for r in rows], device=dev)[owner]
        pres = torch.tensor([r.params.presence_penalty for r in rows], device=dev)[owner]
        flat[at] = flat[at] - freq * count - pres
    return x


def _flat_ids(
    prompts: list[list[int]] | None, outputs: list[list[int]], rows: list[int], vocab: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices `row * vocab + token` of the given rows' tokens, and each one's row."""
    parts = []
    for i in rows:
        ids = np.asarray(outputs[i], dtype=np.int64)
        if prompts is not None:
            ids = np.concatenate([np.asarray(prompts[i], dtype=np.int64), ids])
        parts.append(ids[(ids >= 0) & (ids < vocab)] + i * vocab)
    at = torch.from_numpy(np.concatenate(parts))
    return at, at // vocab


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """Row argmax of `x` [m, v] (first maximum), exactly; much faster than torch.argmax on CPU."""
    m, v = x.shape
    if v < 4 * _BLOCK:
        return x.argmax(dim=-1)
    blocks = _pad(x, float("-inf")).view(m, -1, _BLOCK)  # [m, nb, B]
    b = blocks.amax(dim=-1).argmax(dim=-1)  # [m] the first block holding the row's max
    inner = blocks[torch.arange(m, device=x.device), b]  # [m, B]
    return b * _BLOCK + inner.argmax(dim=-1)


def _sample(x: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
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
    probs = torch.softmax(_pad(x, float("-inf")), dim=-1)  # [m, vp]
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
        trunc_thr, cand_vals, cand_ids, cap = _truncation(_take(probs, trunc), k, p)
        thr[_index(trunc, dev)] = trunc_thr
    if any(min_p):
        thr = torch.maximum(thr, torch.tensor(min_p, device=dev) * probs.amax(dim=-1))
    out = torch.empty(m, dtype=torch.long, device=dev)
    rest = list(range(m))
    if trunc:
        # the cap-th largest is dropped, so every kept token is a candidate
        dropped = cand_vals.gather(1, (cap - 1).unsqueeze(1)).squeeze(1) < thr[_index(trunc, dev)]
        few = dropped.nonzero().squeeze(1)  # [s]
        if len(few):
            at = _index([trunc[i] for i in few.tolist()], dev)
            out[at] = _draw_among(cand_vals[few], cand_ids[few], thr[at], u[at])
            rest = sorted(set(rest) - set(at.tolist()))
    if rest:
        at = _index(rest, dev)
        probs, rest_thr = _take(probs, rest), thr[at].unsqueeze(1)  # [r, vp], [r, 1]
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
    how many of them (`cap` [f], a function of the row's params alone) `_sample` may draw among.
    """
    vp = probs.shape[1]
    cap = torch.where(top_k > 0, top_k.clamp(max=_FEW_TOP_K) + 1, 0)
    cap = cap.clamp(min=_MIN_CANDIDATES, max=vp)
    vals, ids = _topk(probs, int(cap.max()))
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


def _topk(t: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k values and ids per row of `t` [m, vp], vp a multiple of _BLOCK.

    The top k values all lie in the k blocks with the largest maxima, so only those are ranked.
    """
    m, vp = t.shape
    nb = vp // _BLOCK
    if 4 * k > nb:
        return t.topk(k, dim=-1)
    blocks = t.view(m, nb, _BLOCK)
    top_blocks = blocks.amax(dim=-1).topk(k, dim=-1).indices  # [m, k]
    offsets = torch.arange(_BLOCK, device=t.device)
    ids = (top_blocks.unsqueeze(-1) * _BLOCK + offsets).view(m, k * _BLOCK)
    vals, pos = t.gather(1, ids).topk(k, dim=-1)  # [m, k]
    return vals, ids.gather(1, pos)


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
    nb = vp // _BLOCK
    blocks = probs.view(m, nb, _BLOCK)
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
    j = torch.searchsorted(inner_cdf, r, right=True).clamp_(max=_BLOCK - 1)
    return (b * _BLOCK + j).squeeze(1)


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _uniform(seed: int, step: int) -> float:
    """A uniform in [0, 1) that depends only on (seed, step): all of a draw's randomness."""
    return (_splitmix64(_splitmix64(seed & _MASK64) ^ step) >> 11) * 2.0**-53


def _top_logprobs(lp: torch.Tensor, token_ids: list[int], ks: list[int]) -> list[TopLogprobs]:
    """Per row of log-probs `lp` [r, vocab]: the given token's logprob and rank, and the top-k."""
    r, vocab = lp.shape
    tok = torch.tensor(token_ids, dtype=torch.long, device=lp.device).unsqueeze(1)  # [r, 1]
    tok_lp = lp.gather(1, tok)  # [r, 1]
    # rank = 1 + count strictly above; sign() of the exact difference beats a bool sum on CPU
    above = (lp - tok_lp).sign_().clamp_min_(0.0).sum(dim=-1)  # [r]
    k_max = min(max(ks), vocab)
    top_vals: list[list[float]] = [[] for _ in range(r)]
    top_ids: list[list[int]] = [[] for _ in range(r)]
    if k_max > 0:
        vals, ids = _topk(_pad(lp, float("-inf")), k_max)  # [r, k_max]
        top_vals, top_ids = vals.tolist(), ids.tolist()
    tok_lps, ranks = tok_lp.squeeze(1).tolist(), above.tolist()
    return [
        TopLogprobs(t, tok_lps[i], int(ranks[i]) + 1, top_ids[i][:k], top_vals[i][:k])
        for i, (t, k) in enumerate(zip(token_ids, ks, strict=True))
    ]

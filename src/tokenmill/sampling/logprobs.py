"""Logprobs of the raw model distribution: a token's logprob and rank, and the top-k."""

from __future__ import annotations

import torch

from tokenmill.core.sched_types import TopLogprobs
from tokenmill.sampling.block_ops import block_topk, pad_blocks

_PROMPT_CHUNK = 256  # prompt positions whose log-softmax is materialized at once


@torch.inference_mode()
def prompt_logprobs(logits: torch.Tensor, target_ids: list[int], k: int) -> list[TopLogprobs]:
    """Logprobs of `target_ids[i]` (the actual next token) under `logits[i]` [n, vocab], top-k."""
    if logits.shape[0] != len(target_ids):
        raise ValueError(f"{logits.shape[0]} rows of logits for {len(target_ids)} targets")
    out: list[TopLogprobs] = []
    for start in range(0, len(target_ids), _PROMPT_CHUNK):
        targets = target_ids[start : start + _PROMPT_CHUNK]
        lp = torch.log_softmax(logits[start : start + len(targets)].float(), dim=-1)
        out.extend(top_logprobs(lp, targets, [k] * len(targets)))
    return out


def top_logprobs(lp: torch.Tensor, token_ids: list[int], ks: list[int]) -> list[TopLogprobs]:
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
        vals, ids = block_topk(pad_blocks(lp, float("-inf")), k_max)  # [r, k_max]
        top_vals, top_ids = vals.tolist(), ids.tolist()
    tok_lps, ranks = tok_lp.squeeze(1).tolist(), above.tolist()
    return [
        TopLogprobs(t, tok_lps[i], int(ranks[i]) + 1, top_ids[i][:k], top_vals[i][:k])
        for i, (t, k) in enumerate(zip(token_ids, ks, strict=True))
    ]

"""Lossless verification of draft tokens.

Deterministic proposers (n-gram, suffix): the draft distribution q is one-hot at the draft token
x, so the rejection rule "accept x with probability min(1, p(x)/q(x)), else sample from
norm(max(0, p - q))" becomes "accept x with probability p(x), else sample from p with x removed".
`verify_drafts` implements exactly that rule by sample-and-match: at draft position j it draws
y_j ~ p_j with the very draw the plain sampler would make at that output position (uniform from
(seed, position), processed logits as if drafts 0..j-1 were accepted), accepts while y_j equals
the draft and emits the first y_j that does not. P(accept x) = p(x) and a rejection yields y ~ p
conditioned on y != x, so the output is distributed as p; more than that, a seeded request's
tokens are identical with speculation on or off, and greedy is the special case y_j = argmax.

Draft distributions that are not one-hot (a draft model) go through `rejection_sample`, the
general rule of Leviathan et al. / Chen et al.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from tokenmill.core.sched_types import TopLogprobs
from tokenmill.sampling.sampler import Sampler, SamplingRow


def expand_rows(rows: list[SamplingRow], drafts: list[list[int]]) -> list[SamplingRow]:
    """One sampling row per verified position: row j of a request sees drafts[:j] as output.

    Penalties, min_tokens, the seeded draw and a grammar's mask then depend on the position
    exactly as in plain decoding, where those drafts would already be output tokens: a
    constrained row gets the mask after each draft prefix, computed here by walking its matcher
    over the draft and back (the drafts are ones the grammar accepts; see Speculator.propose).
    """
    out: list[SamplingRow] = []
    for row, draft in zip(rows, drafts, strict=True):
        if row.grammar is not None and draft:
            masks = row.grammar.draft_masks(draft)
            out.extend(
                replace(row, output_token_ids=row.output_token_ids + draft[:j], grammar=m)
                for j, m in enumerate(masks)
            )
            continue
        out.append(row)
        for j in range(1, len(draft) + 1):
            out.append(replace(row, output_token_ids=row.output_token_ids + draft[:j]))
    return out


def verify_drafts(
    sampler: Sampler, logits: torch.Tensor, rows: list[SamplingRow], drafts: list[list[int]]
) -> tuple[list[list[int]], list[list[TopLogprobs] | None]]:
    """Tokens for each request from `logits` [sum(len(d) + 1 for d in drafts), vocab].

    Request i owns len(drafts[i]) + 1 consecutive logit rows (the positions of its last token
    and of each draft). Returns per request the accepted drafts followed by one more token, and
    their logprobs where asked.
    """
    tokens, logprobs = sampler(logits, expand_rows(rows, drafts))
    out_tokens: list[list[int]] = []
    out_logprobs: list[list[TopLogprobs] | None] = []
    at = 0
    for draft in drafts:
        n = 0  # accepted drafts
        while n < len(draft) and tokens[at + n] == draft[n]:
            n += 1
        out_tokens.append(tokens[at : at + n + 1])
        lps = logprobs[at : at + n + 1]
        out_logprobs.append(None if lps[0] is None else lps)  # type: ignore[arg-type]
        at += len(draft) + 1
    return out_tokens, out_logprobs


def rejection_sample(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor,
    draft_ids: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact speculative sampling for drafts drawn from non-degenerate distributions.

    target_probs: [B, k + 1, V] processed target distributions p at each draft position plus
    the bonus position; draft_probs: [B, k, V] the distributions q the drafts were drawn from;
    draft_ids: [B, k]. Draft i is accepted when u * q(x) < p(x) (no division, so q(x) = 0 is
    safe); at the first rejection a token is drawn from norm(max(0, p - q)); when all k are
    accepted the bonus token is drawn from p_{k+1}. Returns (tokens [B, k + 1], num_emitted [B]):
    row b's output is tokens[b, :num_emitted[b]]; positions after it are -1.
    """
    b, k, _ = draft_probs.shape
    dev = target_probs.device
    p = target_probs[:, :k].gather(2, draft_ids.unsqueeze(2)).squeeze(2)  # [B, k]
    q = draft_probs.gather(2, draft_ids.unsqueeze(2)).squeeze(2)  # [B, k]
    u = torch.rand(b, k, generator=generator, device=dev, dtype=p.dtype)
    accepted = u * q < p  # [B, k]
    # number of leading accepted drafts
    num_acc = accepted.to(torch.int64).cumprod(dim=1).sum(dim=1)  # [B]
    residual = (target_probs[:, :k] - draft_probs).clamp_min(0.0)  # [B, k, V]
    # a rejection implies p(x) < q(x), so the residual has mass; the bonus position uses p
    final = torch.cat([residual, target_probs[:, k:]], dim=1)  # [B, k + 1, V]
    dist = final[torch.arange(b, device=dev), num_acc]  # [B, V]
    extra = torch.multinomial(dist / dist.sum(dim=1, keepdim=True), 1, generator=generator)
    tokens = torch.full((b, k + 1), -1, dtype=torch.int64, device=dev)
    pos = torch.arange(k + 1, device=dev).unsqueeze(0)  # [1, k + 1]
    drafts_padded = torch.cat([draft_ids, draft_ids.new_zeros(b, 1)], dim=1)
    tokens = torch.where(pos < num_acc.unsqueeze(1), drafts_padded, tokens)
    tokens.scatter_(1, num_acc.unsqueeze(1), extra)
    return tokens, num_acc + 1

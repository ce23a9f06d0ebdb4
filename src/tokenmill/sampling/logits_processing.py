"""Logits processing before a draw, in vLLM's order: the grammar's mask (structured output),
logit_bias, min_tokens (stop ids and EOS masked), repetition penalty (prompt and output),
frequency and presence penalties (output).

The grammar's mask comes first so temperature, top-k/top-p and penalties keep their meaning over
the allowed tokens. A constrained row skips the min_tokens ban: its grammar alone decides when
EOS may come (banning it where the grammar allows nothing else would leave no token at all)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from tokenmill.sampling.block_ops import row_index

if TYPE_CHECKING:
    from tokenmill.sampling.sampler import SamplingRow


def process_logits(
    logits: torch.Tensor, rows: list[SamplingRow], unmasked: frozenset[int] = frozenset()
) -> torch.Tensor:
    """float32 logits after bias, min_tokens and penalties; may alias `logits` if none apply.
    Rows in `unmasked` skip their grammar's mask (the caller checks their token instead)."""
    vocab = logits.shape[1]
    bias_at: list[int] = []  # flat indices into the [n, vocab] logits
    bias: list[float] = []
    banned: list[int] = []
    rep_rows: list[int] = []
    pen_rows: list[int] = []
    grammars = [None if i in unmasked else r.grammar for i, r in enumerate(rows)]
    constrained = any(g is not None for g in grammars)
    for i, r in enumerate(rows):
        p, base = r.params, i * vocab
        if p.logit_bias:
            for tok, b in p.logit_bias.items():
                if 0 <= tok < vocab:
                    bias_at.append(base + tok)
                    bias.append(b)
        if len(r.output_token_ids) < p.min_tokens and r.grammar is None:
            stops = set(p.stop_token_ids or ())
            if not p.ignore_eos:
                stops |= r.eos_token_ids
            banned.extend(base + t for t in stops if 0 <= t < vocab)
        if p.repetition_penalty != 1.0:
            rep_rows.append(i)
        if p.frequency_penalty or p.presence_penalty:
            pen_rows.append(i)
    if not (bias_at or banned or rep_rows or pen_rows or constrained):
        return logits.float()

    # A copy: the caller's logits stay raw (logprobs are of the model's distribution).
    x = logits.to(torch.float32, copy=True).contiguous()
    flat, dev = x.view(-1), x.device
    if constrained:
        from tokenmill.structured.masks import apply_grammar_masks  # xgrammar: only if used

        apply_grammar_masks(x, grammars)
    if bias_at:
        flat.index_add_(0, row_index(bias_at, dev), torch.tensor(bias, device=dev))
    if banned:
        flat.index_fill_(0, row_index(banned, dev), float("-inf"))
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

"""Batched next-token sampling with vLLM's semantics and batch-independent seeded draws.

Order per row: the grammar's token mask (structured output), logit_bias, min_tokens (stop ids
and EOS masked), repetition penalty (prompt and output), frequency and presence penalties
(output) -- see logits_processing -- then greedy argmax when temperature is 0, else
temperature, top-k, top-p, min-p and one draw (see draw).
Logprobs are of the raw model distribution (see logprobs).

Reproducibility invariant: a row's token depends only on its own logits, its params and
(seed, len(output_token_ids)) -- never on which other rows share the batch or where the row sits
in it. The whole randomness of a draw is one uniform hashed from (seed, step) in Python, turned
into a token by inverse-CDF sampling over the vocabulary in token-id order; every tensor op on
the way is row-local (softmax, per-block sums, sequential cumsums, exact top-k values), so the
same seed gives the same tokens alone or in any batch, and a preempted request that is
recomputed continues its sequence exactly.

Speed: a vocabulary is split into blocks (see block_ops). Argmax, top-k values and the inverse
CDF first pick a block from per-block maxima or sums and then look inside that block, so no op
sorts or scans the whole vocabulary more than once. Work only runs for rows that ask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tokenmill.core.sched_types import TopLogprobs
from tokenmill.sampling.block_ops import block_argmax, row_index, take_rows
from tokenmill.sampling.draw import sample
from tokenmill.sampling.logits_processing import process_logits
from tokenmill.sampling.logprobs import prompt_logprobs, top_logprobs
from tokenmill.sampling_params import SamplingParams

if TYPE_CHECKING:
    from tokenmill.structured.grammar import MaskRow, RequestGrammar

__all__ = ["Sampler", "SamplingRow", "prompt_logprobs"]

_SAMPLING_EPS = 1e-5  # temperatures below this are greedy, as in vLLM


@dataclass
class SamplingRow:
    """One request's row in the batch."""

    params: SamplingParams
    seed: int  # per request (and per sample when n > 1); always set by the engine
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # generated so far, before this step's token
    eos_token_ids: frozenset[int] = frozenset()
    # Structured output: the request's grammar, which has accepted output_token_ids exactly.
    # A MaskRow instead: a draft position's mask, computed ahead (sampling/rejection.py).
    grammar: RequestGrammar | MaskRow | None = None


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
        greedy = [i for i, r in enumerate(rows) if r.params.temperature < _SAMPLING_EPS]
        # Greedy constrained rows: the argmax of the unmasked logits, kept when the grammar
        # allows it (a mask only removes candidates, and every processing step keeps -inf at
        # -inf, so it is then the masked argmax too); only the rest fill and apply a mask.
        lazy = frozenset(i for i in greedy if rows[i].grammar is not None)
        x = process_logits(logits, rows, lazy)  # [n, vocab] float32
        if len(greedy) == n:
            tokens = block_argmax(x).tolist()
        else:
            drawn = [i for i, r in enumerate(rows) if r.params.temperature >= _SAMPLING_EPS]
            out = torch.empty(n, dtype=torch.long, device=x.device)
            if greedy:
                out[row_index(greedy, x.device)] = block_argmax(take_rows(x, greedy))
            out[row_index(drawn, x.device)] = sample(take_rows(x, drawn), [rows[i] for i in drawn])
            tokens = out.tolist()
        if lazy:
            _mask_rejected_argmax(x, rows, sorted(lazy), tokens)

        logprobs: list[TopLogprobs | None] = [None] * n
        want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        if want:
            lp = torch.log_softmax(take_rows(logits, want).float(), dim=-1)  # [len(want), vocab]
            ks = [rows[i].params.logprobs or 0 for i in want]
            for i, top in zip(want, top_logprobs(lp, [tokens[i] for i in want], ks), strict=True):
                logprobs[i] = top
        return tokens, logprobs


def _mask_rejected_argmax(
    x: torch.Tensor, rows: list[SamplingRow], lazy: list[int], tokens: list[int]
) -> None:
    """For each greedy constrained row whose unmasked argmax its grammar rejects, the argmax
    over what the grammar allows (from its mask, for those rows alone)."""
    redo = [i for i in lazy if not rows[i].grammar.allows(tokens[i])]  # type: ignore[union-attr]
    if not redo:
        return
    from tokenmill.structured.masks import masked_argmax  # xgrammar: only if used

    grammars = [rows[i].grammar for i in redo]
    for i, token in zip(redo, masked_argmax(x, redo, grammars), strict=True):  # type: ignore[arg-type]
        tokens[i] = token

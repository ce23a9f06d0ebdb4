"""Helpers for the tensor-parallel tests: the prompts, greedy tokens, and the comparison of a
tensor-parallel LLM with TP=1 (the same tokens, the same logits at every step)."""

from __future__ import annotations

import torch

from tokenmill import LLM, SamplingParams

PROMPTS = ["Hello there, my name is", "The capital of France is", "1, 2, 3, 4,"]


def logits_recorded(llm: LLM) -> list[torch.Tensor]:
    """Wraps rank 0's compute_logits: every logits tensor the steps compute, in order."""
    model = llm.engine.runner.model
    inner, seen = model.compute_logits, []

    def record(hidden: torch.Tensor) -> torch.Tensor:
        out = inner(hidden)
        seen.append(out.clone())
        return out

    model.compute_logits = record
    return seen


def greedy(llm: LLM, n: int = 8, prompt_logprobs: int | None = None) -> list[list[int]]:
    params = SamplingParams(max_tokens=n, temperature=0, prompt_logprobs=prompt_logprobs)
    outs = llm.generate(PROMPTS, params)
    return [o.outputs[0].token_ids for o in outs]


def assert_matches_tp1(
    one: LLM,
    tp: LLM,
    n: int = 8,
    *,
    prompt_logprobs: int | None = None,
    exact: bool = False,
) -> int:
    """`tp` gives TP=1's (`one`'s) greedy tokens on PROMPTS and its logits at every step:
    bit for bit where `exact`, else within 1e-4 (row-parallel sums add in another order).
    Returns how many logits tensors each computed."""
    l1, l2 = logits_recorded(one), logits_recorded(tp)
    assert greedy(one, n, prompt_logprobs) == greedy(tp, n, prompt_logprobs)
    for a, b in zip(l1, l2, strict=True):
        if exact:
            assert torch.equal(b, a)
        else:
            torch.testing.assert_close(b, a, atol=1e-4, rtol=0)
    return len(l1)

"""Helpers for the end-to-end speculative-decoding tests: the engine options under which
outputs with and without speculation must be token-identical, a run's tokens, and a proposer
that drafts the known continuation, corrupted."""

from __future__ import annotations

import random
from typing import Any

from tokenmill import LLM, SamplingParams
from tokenmill.request import Request
from tokenmill.spec_decode.proposer import Proposer
from tokenmill.spec_decode.speculator import Speculator


def engine_kwargs(**kw: Any) -> dict[str, Any]:
    """fp32 and batch-invariant: a token's logits do not depend on what else the step runs."""
    return dict(dtype="float32", batch_invariant=True, **kw)


def tokens(llm: LLM, prompts: list[Any], params: list[SamplingParams]) -> list[list[int]]:
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def reference_tokens(
    model: str, prompts: list[Any], params: list[SamplingParams]
) -> list[list[int]]:
    """The outputs without speculation."""
    return tokens(LLM(model=model, **engine_kwargs()), prompts, params)


class OracleProposer(Proposer):
    """Drafts each prompt's known continuation, every token passed through `corrupt` (seeded:
    the same drafts on every run)."""

    def __init__(self, continuations: dict[tuple[int, ...], list[int]]) -> None:
        self.continuations = continuations
        self.rng = random.Random(0)

    def corrupt(self, token: int, full: list[int]) -> int:
        """The draft token in place of `token` of the continuation `full`."""
        raise NotImplementedError

    def propose(self, reqs: list[Request], max_drafts: list[int]) -> list[list[int]]:
        out = []
        for req, k in zip(reqs, max_drafts, strict=True):
            full = self.continuations[tuple(req.prompt_token_ids)]
            out.append([self.corrupt(t, full) for t in full[req.num_output_tokens :][:k]])
        return out


def use_oracle(
    llm: LLM, oracle_cls: type[OracleProposer], prompts: list[Any], reference: list[list[int]]
) -> None:
    """Replaces `llm`'s proposer with an oracle over `reference` (6 drafts a step)."""
    oracle = oracle_cls({tuple(p): r for p, r in zip(prompts, reference, strict=True)})
    engine = llm.engine
    engine.speculator = Speculator(oracle, 6, engine.scheduler.max_model_len)

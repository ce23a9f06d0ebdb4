"""Drives a proposer inside the engine step: drafts for every running request about to decode."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from tokenmill.config import EngineConfig, ModelConfig
from tokenmill.core.sched_types import SchedulerOutput
from tokenmill.request import Request
from tokenmill.spec_decode.ngram import NgramProposer
from tokenmill.spec_decode.proposer import Proposer
from tokenmill.spec_decode.step_cost import StepCostModel
from tokenmill.spec_decode.suffix import SuffixProposer

EXPLORE_EVERY = 16  # engine steps per step whose drafts the prior row cost sizes


def build_proposer(
    config: EngineConfig, target: ModelConfig, max_model_len: int
) -> Proposer | None:
    if config.speculative is None:
        return None
    if config.speculative == "draft":
        from tokenmill.spec_decode.draft_model import DraftModelProposer

        return DraftModelProposer.load(config, target, max_model_len)
    if config.speculative == "ngram":
        return NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
    if config.speculative == "suffix":
        return SuffixProposer(
            max_depth=config.suffix_max_depth,
            max_cached_requests=config.suffix_max_cached_requests,
        )
    raise ValueError(f"no proposer for speculative={config.speculative!r}")


class Speculator:
    """Asks the proposer for drafts each step, sized by what verifying them is worth.

    A verified draft token costs one more row in the step. With B requests decoding, it is
    worth it while its chance of acceptance exceeds B c / (1 + B c), c being a row's cost
    relative to a step's fixed cost (`StepCostModel`: `draft_cost` at first, then fitted to
    the measured step times): at batch 1 almost any draft pays, at batch 8 on a CPU only
    likely ones do. A request's chance is estimated from its own history,
    a = (accepted + 1) / (drafted + 2), the i-th draft token accepted with probability a^i, so
    it drafts at most log(threshold) / log(a) tokens. draft_cost 0 turns this off (always the
    full budget).
    """

    def __init__(
        self,
        proposer: Proposer,
        num_speculative_tokens: int,
        max_model_len: int,
        draft_cost: float = 0.0,
    ) -> None:
        self.proposer = proposer
        self.num_speculative_tokens = num_speculative_tokens
        self.max_model_len = max_model_len
        self.cost = StepCostModel(draft_cost) if draft_cost > 0.0 else None
        self._num_proposals = 0

    def observe_step(self, sched: SchedulerOutput, seconds: float) -> None:
        """Feeds the cost model one step's wall time, if the step only decoded."""
        if self.cost is not None and all(s.sample and s.num_tokens == 1 + s.num_draft_tokens
                                         for s in sched.seqs):  # fmt: skip
            self.cost.observe(sched.num_batched_tokens, seconds)

    def propose(self, decoding: Sequence[Request]) -> dict[str, list[int]]:
        """Drafts for `decoding`, the requests whose next step is a decode (the scheduler's
        `decoding_requests()`): request id -> draft token ids, for those that get any. The
        requests are only read; the scheduler takes the drafts."""
        threshold = 0.0
        if self.cost is not None:
            self._num_proposals += 1
            # Now and then the prior decides, so row counts the fit has ruled out get measured
            # again: an estimate spoiled by one slow step must not stop drafting for good.
            explore = self._num_proposals % EXPLORE_EVERY == 0
            threshold = self.cost.acceptance_threshold(len(decoding), prior=explore)
        reqs: list[Request] = []
        caps: list[int] = []
        for req in decoding:
            if not req.sampling_params.use_speculation:
                continue
            # A step emits up to drafts + 1 tokens: never draft past max_tokens or the context.
            cap = min(
                self.num_speculative_tokens,
                req.max_tokens - req.num_output_tokens - 1,
                self.max_model_len - req.num_tokens - 1,
                _worthwhile_drafts(req, threshold),
            )
            if cap > 0:
                reqs.append(req)
                caps.append(cap)
        if not reqs:
            return {}
        drafts = self.proposer.propose(reqs, caps)
        out: dict[str, list[int]] = {}
        for req, cap, draft in zip(reqs, caps, drafts, strict=True):
            draft = list(draft[:cap])
            if draft and req.grammar is not None:
                # Tokens the grammar rejects could never be accepted (the mask bans them): cut
                # the draft before the first one, so verification rows are all worth computing.
                del draft[req.grammar.valid_prefix(draft) :]
            if draft:
                out[req.request_id] = draft
        return out

    def finish(self, req_ids: Iterable[str]) -> None:
        self.proposer.finish(req_ids)


def _worthwhile_drafts(req: Request, threshold: float) -> int:
    """Most draft tokens whose estimated acceptance chance a^i stays >= threshold."""
    if threshold <= 0.0:
        return 1 << 30
    a = (req.num_accepted_draft_tokens + 1) / (req.num_drafted_tokens + 2)
    return max(0, math.floor(math.log(threshold) / math.log(a) + 1e-9))

"""Drives a proposer inside the engine step: drafts for every running request about to decode."""

from __future__ import annotations

from collections.abc import Iterable

from tokenmill.config import EngineConfig
from tokenmill.request import Request
from tokenmill.spec_decode.ngram import NgramProposer
from tokenmill.spec_decode.proposer import Proposer
from tokenmill.spec_decode.suffix import SuffixProposer


def build_proposer(config: EngineConfig) -> Proposer | None:
    if config.speculative is None:
        return None
    if config.speculative == "ngram":
        return NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
    if config.speculative == "suffix":
        return SuffixProposer(
            max_depth=config.suffix_max_depth,
            max_cached_requests=config.suffix_max_cached_requests,
        )
    raise ValueError(f"no proposer for speculative={config.speculative!r}")


class Speculator:
    def __init__(self, proposer: Proposer, num_speculative_tokens: int, max_model_len: int) -> None:
        self.proposer = proposer
        self.num_speculative_tokens = num_speculative_tokens
        self.max_model_len = max_model_len

    def propose(self, running: Iterable[Request]) -> None:
        """Sets `spec_token_ids` of each running request whose next step is a decode."""
        reqs: list[Request] = []
        caps: list[int] = []
        for req in running:
            req.spec_token_ids = []  # a request that was not scheduled last step keeps none
            if not req.sampling_params.use_speculation:
                continue
            if req.num_computed_tokens != req.num_tokens - 1:
                continue  # still prefilling (or resuming after preemption)
            # A step emits up to drafts + 1 tokens: never draft past max_tokens or the context.
            cap = min(
                self.num_speculative_tokens,
                req.max_tokens - req.num_output_tokens - 1,
                self.max_model_len - req.num_tokens - 1,
            )
            if cap > 0:
                reqs.append(req)
                caps.append(cap)
        if not reqs:
            return
        for req, cap, draft in zip(reqs, caps, self.proposer.propose(reqs, caps), strict=True):
            req.spec_token_ids = list(draft[:cap])

    def finish(self, req_ids: Iterable[str]) -> None:
        self.proposer.finish(req_ids)

"""Speculative decoding counters, kept by the scheduler as verified steps come back."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SpecDecodeStats:
    """Counts over the engine's lifetime.

    A "decode step" is one request generating in one engine step; with drafts it yields
    `1 + accepted` tokens, without them exactly one.
    """

    num_drafted_tokens: int = 0
    num_accepted_tokens: int = 0
    num_verify_steps: int = 0  # decode steps that carried at least one draft
    num_decode_steps: int = 0
    num_decode_tokens: int = 0  # tokens those decode steps produced (before stop truncation)

    def record(self, num_draft: int, num_sampled: int) -> None:
        self.num_decode_steps += 1
        self.num_decode_tokens += num_sampled
        if num_draft:
            self.num_verify_steps += 1
            self.num_drafted_tokens += num_draft
            self.num_accepted_tokens += num_sampled - 1

    @property
    def acceptance_rate(self) -> float:
        return (
            self.num_accepted_tokens / self.num_drafted_tokens if self.num_drafted_tokens else 0.0
        )

    @property
    def mean_tokens_per_step(self) -> float:
        """Tokens per decode step (1.0 without speculation)."""
        return self.num_decode_tokens / self.num_decode_steps if self.num_decode_steps else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "num_drafted_tokens": self.num_drafted_tokens,
            "num_accepted_tokens": self.num_accepted_tokens,
            "num_verify_steps": self.num_verify_steps,
            "num_decode_steps": self.num_decode_steps,
            "acceptance_rate": self.acceptance_rate,
            "mean_tokens_per_step": self.mean_tokens_per_step,
        }

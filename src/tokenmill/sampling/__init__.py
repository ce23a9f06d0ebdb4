"""Next-token sampling: logits processors, greedy/seeded sampling and logprobs (vLLM semantics)."""

from tokenmill.sampling.logprobs import prompt_logprobs
from tokenmill.sampling.sampler import Sampler, SamplingRow

__all__ = ["Sampler", "SamplingRow", "prompt_logprobs"]

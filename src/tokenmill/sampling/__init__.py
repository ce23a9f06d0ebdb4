"""Next-token sampling: logits processors, greedy/seeded sampling and logprobs (vLLM semantics)."""

from tokenmill.sampling.sampler import Sampler, SamplingRow, prompt_logprobs

__all__ = ["Sampler", "SamplingRow", "prompt_logprobs"]

"""What an engine serves and the limits a request must meet: the one place prompts are checked."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tokenmill.errors import ContextLengthError, InvalidRequestError
from tokenmill.sampling_params import SamplingParams, check_priority


@dataclass(frozen=True)
class ModelInfo:
    """The served model and its limits, fixed once the engine is built (so any thread may read
    it, and call its checks)."""

    name: str  # the loaded model's name
    aliases: tuple[str, ...]  # other names clients may use: the model argument it was loaded by
    # The most tokens (prompt plus output) one sequence may hold: the context length, which the
    # KV cache always holds whole (the engine does not start otherwise).
    max_seq_len: int
    vocab_size: int
    # chat: special-token text in message content becomes control tokens (else plain text)
    allow_special_tokens_in_content: bool = False

    def check_request(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        priority: int = 0,
        *,
        max_tokens_must_fit: bool = False,
    ) -> None:
        """Raises InvalidRequestError (ContextLengthError for the length) unless a request for
        `prompt_ids` with `params` and `priority` can run. `max_tokens_must_fit`: a max_tokens
        that runs past the context is an error (the OpenAI API's rule) rather than cut to fit.

        The length goes first: it costs nothing, while the other checks scan the ids.
        """
        check_priority(priority)
        self.check_length(
            len(prompt_ids), params.max_tokens if max_tokens_must_fit else None, params.min_tokens
        )
        if not prompt_ids:
            raise InvalidRequestError("prompt must not be empty", "prompt")
        vocab = self.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(
                f"prompt token ids must be in [0, {vocab}); got {bad[:5]}", "prompt"
            )
        for tok in params.logit_bias or {}:
            if not 0 <= tok < vocab:
                raise InvalidRequestError(
                    f"logit_bias token id {tok} is outside the vocabulary [0, {vocab})",
                    "logit_bias",
                )
        bad = [t for t in params.stop_token_ids or () if t >= vocab]
        if bad:
            raise InvalidRequestError(
                f"stop_token_ids must be in [0, {vocab}); got {bad[:5]}", "stop_token_ids"
            )

    def check_length(
        self, num_prompt_tokens: int, max_tokens: int | None = None, min_tokens: int = 0
    ) -> None:
        """Raises ContextLengthError unless a prompt of this length, plus `max_tokens` when
        given (and `min_tokens`, which could never all be generated otherwise), fits one
        sequence.

        This is exact for any n and any load. The samples of an n > 1 request share the
        prompt's full blocks through the prefix cache and each holds its own output blocks, but
        they need not run at once: under KV pressure the scheduler preempts the newest running
        sequence, so the oldest always advances, and one sequence of max_seq_len tokens fits
        the cache on its own. The last sampled token is never written to the cache, and the
        scheduler ends a sequence at max_seq_len tokens, so max_seq_len is the bound to check.
        """
        limit = self.max_seq_len
        what = f"This model's maximum context length is {limit} tokens"
        if num_prompt_tokens >= limit:
            raise ContextLengthError(
                f"{what}, but the prompt has {num_prompt_tokens} tokens (it must leave room for "
                "at least 1 generated token).",
                "prompt",
            )
        if max_tokens is not None and num_prompt_tokens + max_tokens > limit:
            raise ContextLengthError(
                f"{what}. However, you requested {num_prompt_tokens + max_tokens} tokens "
                f"({num_prompt_tokens} in the prompt, {max_tokens} for the completion). Please "
                "reduce the prompt or max_tokens.",
                "max_tokens",
            )
        if num_prompt_tokens + min_tokens > limit:
            raise ContextLengthError(
                f"{what}, so the {num_prompt_tokens}-token prompt leaves room for at most "
                f"{limit - num_prompt_tokens} generated tokens; min_tokens is {min_tokens}.",
                "min_tokens",
            )

"""Applying one step's model output to a scheduled request: accepted tokens and stop checks.

The scheduler keeps the bookkeeping that spans requests (running list, KV blocks, release);
these helpers touch only the request of one `ScheduledSeq`.
"""

from __future__ import annotations

import logging

from tokenmill.core.sched_types import EngineCoreOutput, ModelRunnerOutput, ScheduledSeq
from tokenmill.core.spec_stats import SpecDecodeStats
from tokenmill.request import Request, RequestStatus

logger = logging.getLogger(__name__)


def apply_sampled_tokens(
    seq: ScheduledSeq,
    runner_out: ModelRunnerOutput,
    spec_stats: SpecDecodeStats,
    max_model_len: int,
    max_forced_tokens: int = 0,
) -> list[int]:
    """Append the tokens sampled for `seq`, then up to `max_forced_tokens` its grammar forces
    (see `forced_tokens`), and advance its `num_computed_tokens`.

    Returns the tokens appended, up to and including one that stopped the request.
    """
    req = seq.req
    assert req.num_computed_tokens == seq.start_pos
    num_computed = seq.start_pos + seq.num_tokens

    new_ids: list[int] = []
    if seq.sample:
        sampled = runner_out.sampled_token_ids.get(req.request_id)
        assert sampled, f"no token sampled for {req.request_id}"
        if seq.num_tokens - seq.num_draft_tokens == 1:
            spec_stats.record(seq.num_draft_tokens, len(sampled))
            req.num_drafted_tokens += seq.num_draft_tokens
            req.num_accepted_draft_tokens += len(sampled) - 1
        # Rejected drafts' KV is dropped by not counting it: those slots are rewritten
        # later. The lookahead blocks stay with the request for its next drafts
        # (freeing them would push cached prefix blocks out of the LRU free queue).
        num_computed -= max(0, seq.num_draft_tokens + 1 - len(sampled))
        new_ids = append_tokens(req, sampled, max_model_len)
        if not req.is_finished:
            forced = forced_tokens(req, max_forced_tokens, max_model_len)
            new_ids += append_tokens(req, forced, max_model_len)
    # Only now do the accepted drafts' positions hold verified tokens: the caller hashes a block
    # into the prefix cache only once every token in it is verified.
    req.num_computed_tokens = min(num_computed, req.num_tokens)
    return new_ids


def append_tokens(req: Request, token_ids: list[int], max_model_len: int) -> list[int]:
    """Accept each token into the grammar, append it and apply the stop checks; returns the
    tokens appended, up to and including one that stopped the request."""
    new_ids: list[int] = []
    for token_id in token_ids:
        if req.grammar is not None and not req.grammar.accept_token(token_id):
            # The mask allows only tokens the grammar accepts, so this is a bug; ending the
            # request keeps its output valid as far as it goes.
            logger.error("%s: grammar rejected token %d; stopped", req.request_id, token_id)
            req.status = RequestStatus.FINISHED_STOPPED
            break
        req.output_token_ids.append(token_id)
        new_ids.append(token_id)
        if check_stop(req, token_id, max_model_len):
            break
    return new_ids


def forced_tokens(req: Request, max_forced_tokens: int, max_model_len: int) -> list[int]:
    """The tokens `req`'s grammar forces next, bounded so that they never pass max_tokens or
    max_model_len. Appended as if sampled, their KV is computed by the next step as one chunk,
    which samples only after the last of them. Masked sampling could only have picked each
    one; what may differ is their KV, computed as a chunk rather than as decode rows (bit for
    bit the same only where the model's rows do not depend on the row count: batch_invariant).
    None for a request that
    - asks for logprobs: those are of the raw model distribution, and a forced token never
      gets a logits row;
    - has stop strings: they are matched on text after the step, and a run's tokens past a
      match would be reported where token-by-token decoding had stopped."""
    sp = req.sampling_params
    if req.grammar is None or max_forced_tokens <= 0 or sp.logprobs is not None or sp.stop:
        return []
    room = min(req.max_tokens - req.num_output_tokens, max_model_len - req.num_tokens)
    return req.grammar.forced_tokens(min(max_forced_tokens, room))


def make_core_output(
    seq: ScheduledSeq, runner_out: ModelRunnerOutput, new_ids: list[int]
) -> EngineCoreOutput | None:
    """What the engine sees of this step for `seq`; None when there is nothing to report."""
    req = seq.req
    logprobs = runner_out.logprobs.get(req.request_id)
    if logprobs is not None:
        logprobs = logprobs[: len(new_ids)]
    prompt_logprobs = runner_out.prompt_logprobs.get(req.request_id)
    finished = req.is_finished
    if not (new_ids or prompt_logprobs or finished):
        return None
    return EngineCoreOutput(
        req=req,
        new_token_ids=new_ids,
        new_logprobs=logprobs,
        new_prompt_logprobs=prompt_logprobs,
        finished=finished,
        prompt_logprobs_start=seq.start_pos,
    )


def check_stop(req: Request, token_id: int, max_model_len: int) -> bool:
    """Apply the stop conditions for one just-appended token; sets status and reason."""
    sp = req.sampling_params
    # A grammar terminates only by accepting a stop token (EOS), which its mask allows only
    # where the output is complete: that ends the request whatever min_tokens and ignore_eos say.
    if req.grammar is not None and req.grammar.is_terminated():
        req.status = RequestStatus.FINISHED_STOPPED
        req.stop_reason = None
        return True
    # min_tokens: the first min_tokens outputs cannot stop the request.
    if req.num_output_tokens > sp.min_tokens:
        if not sp.ignore_eos and token_id in req.eos_token_ids:
            req.status = RequestStatus.FINISHED_STOPPED
            req.stop_reason = None
            return True
        if token_id in sp.stop_token_ids:
            req.status = RequestStatus.FINISHED_STOPPED
            req.stop_reason = token_id
            return True
    if req.num_output_tokens >= req.max_tokens or req.num_tokens >= max_model_len:
        req.status = RequestStatus.FINISHED_LENGTH
        return True
    return False

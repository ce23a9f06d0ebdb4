"""Scheduler side of speculative decoding, against a fake model that really reads its KV cache.

Drafts are scheduled as ordinary tokens; the fake runner verifies them greedily against a
deterministic chain, and the rejected drafts' KV must be dropped (rolled back) so that later
steps and other requests hitting the prefix cache never read it.
"""

from __future__ import annotations

import itertools
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.core.kv_group import KVGroupSpec
from tokenmill.core.sched_types import ModelRunnerOutput, SchedulerOutput
from tokenmill.core.scheduler import Scheduler, SchedulerConfig
from tokenmill.request import Request
from tokenmill.sampling_params import SamplingParams

VOCAB = 7  # small: so drafts guessed at random are often right
ROOT = 987


def mix(state: int, token: int) -> int:
    return hash((state, token)) & ((1 << 61) - 1)


class SpecFakeRunner:
    """KV of position p = mix(KV of p - 1, token p); the next token is a function of the KV.

    Every context slot is checked against the chain before use, so KV left behind by a rejected
    draft, or a prefix-cached block holding one, fails loudly.
    """

    def __init__(self, block_size: int) -> None:
        self.bs = block_size
        self.slots: dict[tuple[int, int], int] = {}

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        sampled: dict[str, list[int]] = {}
        for seq in out.seqs:
            state = ROOT
            for pos, token in enumerate(seq.req.token_slice(0, seq.start_pos)):
                state = mix(state, token)
                slot = (seq.block_ids[0][pos // self.bs], pos % self.bs)
                assert self.slots[slot] == state, f"corrupt KV at {pos}"
            predicted = []
            for j, token in enumerate(seq.token_ids):
                state = mix(state, token)
                pos = seq.start_pos + j
                self.slots[(seq.block_ids[0][pos // self.bs], pos % self.bs)] = state
                predicted.append(state % VOCAB)
            if seq.sample:
                k = seq.num_draft_tokens
                preds = predicted[len(predicted) - k - 1 :]
                n = 0
                while n < k and seq.draft_token_ids[n] == preds[n]:
                    n += 1
                sampled[seq.req.request_id] = preds[: n + 1]
        return ModelRunnerOutput(sampled)


def reference(prompt: list[int], max_tokens: int) -> list[int]:
    state = ROOT
    for token in prompt:
        state = mix(state, token)
    out = []
    while len(out) < max_tokens:
        out.append(state % VOCAB)
        state = mix(state, out[-1])
    return out


_ids = itertools.count()


def make_req(prompt: list[int], max_tokens: int, spec: bool = True) -> Request:
    sp = SamplingParams(max_tokens=max_tokens, use_speculation=spec)
    return Request(f"s{next(_ids)}", list(prompt), sp, max_tokens=max_tokens)


def run(
    sched: Scheduler, reqs: list[Request], rng: random.Random, max_draft: int
) -> tuple[int, int]:
    """Runs to completion, drafting random guesses (some right) for decoding requests."""
    runner = SpecFakeRunner(sched.config.block_size)
    for req in reqs:
        sched.add_request(req)
    # the KV cache size caps the context length too
    refs = {
        r.request_id: reference(
            r.prompt_token_ids, min(r.max_tokens, sched.max_model_len - r.num_prompt_tokens)
        )
        for r in reqs
    }
    drafted = scheduled_drafts = 0
    for _ in range(10_000):
        if not sched.has_unfinished_requests():
            break
        drafts: dict[str, list[int]] = {}
        decoding = sched.decoding_requests()
        assert list(decoding) == [
            r for r in sched.running if r.num_computed_tokens == r.num_tokens - 1
        ]
        for req in decoding:
            if req.sampling_params.use_speculation:
                room = req.max_tokens - req.num_output_tokens - 1
                ref = refs[req.request_id][req.num_output_tokens :]
                draft = [t if rng.random() < 0.7 else rng.randrange(VOCAB) for t in ref[:room]]
                drafts[req.request_id] = draft[: rng.randint(0, max_draft)]
                drafted += len(drafts[req.request_id])
        out = sched.schedule(drafts)
        assert out.num_batched_tokens <= sched.config.max_num_batched_tokens
        scheduled_drafts += sum(s.num_draft_tokens for s in out.seqs)
        sched.update_from_output(out, runner.execute(out))
        sched.kv_cache_manager.groups[0].pool.check_integrity()
    assert not sched.has_unfinished_requests()
    for req in reqs:
        assert req.output_token_ids == refs[req.request_id], req.request_id
    return drafted, scheduled_drafts


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    block_size=st.sampled_from([1, 2, 4]),
    budget=st.integers(3, 24),
    num_blocks=st.integers(12, 40),
    max_draft=st.integers(1, 6),
)
def test_drafts_verified_and_rolled_back(seed, block_size, budget, num_blocks, max_draft) -> None:
    rng = random.Random(seed)
    # Shared prefixes make later requests hit blocks that earlier ones filled while drafting.
    base = [rng.randrange(VOCAB) for _ in range(6)]
    reqs = [
        make_req(
            base + [rng.randrange(VOCAB) for _ in range(rng.randint(0, 5))], rng.randint(1, 12)
        )
        for _ in range(6)
    ]
    sched = Scheduler(
        SchedulerConfig(
            max_num_batched_tokens=budget,
            max_num_seqs=4,
            max_model_len=64,
            block_size=block_size,
            kv_groups=(KVGroupSpec(num_blocks),),
        )
    )
    run(sched, reqs, rng, max_draft)
    stats = sched.spec_stats
    assert stats.num_accepted_tokens <= stats.num_drafted_tokens
    assert sched.kv_cache_usage == 0


def test_drafts_take_budget_and_stats_count_them() -> None:
    rng = random.Random(0)
    sched = Scheduler(
        SchedulerConfig(
            max_num_batched_tokens=64,
            max_num_seqs=4,
            max_model_len=128,
            block_size=4,
            kv_groups=(KVGroupSpec(64),),
        )
    )
    req = make_req([1, 2, 3], 30)
    opted_out = make_req([4, 5, 6], 30, spec=False)
    drafted, scheduled = run(sched, [req, opted_out], rng, max_draft=4)
    stats = sched.spec_stats
    assert drafted > 0 and scheduled == drafted == stats.num_drafted_tokens
    assert 0 < stats.num_accepted_tokens < stats.num_drafted_tokens
    # Fewer steps than tokens: accepted drafts gave several tokens per step.
    assert stats.num_decode_tokens == stats.num_decode_steps + stats.num_accepted_tokens
    assert stats.mean_tokens_per_step > 1.0


def test_drafts_cut_to_budget_and_dropped_before_preempting() -> None:
    # 3 blocks of 2 tokens: the KV cache holds 6 tokens
    config = SchedulerConfig(
        max_num_batched_tokens=3,
        max_num_seqs=4,
        max_model_len=6,
        block_size=2,
        kv_groups=(KVGroupSpec(3),),
    )
    sched = Scheduler(config)
    req = make_req([1, 2, 3], 10)
    ref = reference(req.prompt_token_ids, 10)
    sched.add_request(req)
    runner = SpecFakeRunner(2)
    out = sched.schedule()
    sched.update_from_output(out, runner.execute(out))  # the prompt; 1 token out
    wrong = (ref[1] + 1) % VOCAB
    assert sched.decoding_requests() == (req,)
    out = sched.schedule({req.request_id: [wrong, 0, 0, 0]})
    # budget 3 = the pending token + 2 drafts; the other drafts are dropped
    assert [s.num_draft_tokens for s in out.seqs] == [2] and out.num_batched_tokens == 3
    assert req.spec_token_ids == []
    sched.update_from_output(out, runner.execute(out))
    assert req.output_token_ids == ref[:2] and req.num_computed_tokens == 4  # draft 0 rejected
    # 4 computed + 1 pending + 2 drafts would need a 4th block: the drafts go, nobody is preempted
    out = sched.schedule({req.request_id: [0, 0]})
    assert [s.num_draft_tokens for s in out.seqs] == [0] and not out.preempted_req_ids
    assert req.spec_token_ids == []
    sched.update_from_output(out, runner.execute(out))
    assert req.output_token_ids == ref[:3] and req.is_finished  # max_model_len reached

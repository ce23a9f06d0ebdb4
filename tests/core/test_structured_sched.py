"""The scheduler's side of structured output, with a scripted grammar (no xgrammar): a request
waits while its grammar compiles, each appended token is accepted exactly once (preemption and
recompute included), a terminated grammar ends the request, and forced runs (tokens a grammar
allows alone, appended unsampled) give the token-by-token output."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from sched_utils import FakeRunner, make_req, make_sched, reference, run

from tokenmill.core.sched_types import ModelRunnerOutput, SchedulerOutput
from tokenmill.request import Request, RequestStatus
from tokenmill.sampling_params import SamplingParams


@dataclass
class ScriptedGrammar:
    """Accepts every token except `reject`; terminates on accepting `stop`."""

    ready: bool = True
    stop: int | None = None
    reject: int | None = None
    accepted: list[int] = field(default_factory=list)

    def accept_token(self, token_id: int) -> bool:
        if token_id == self.reject:
            return False
        self.accepted.append(token_id)
        return True

    def is_terminated(self) -> bool:
        return self.stop is not None and self.stop in self.accepted


def test_request_waits_for_its_grammar_without_stalling_others() -> None:
    sched = make_sched()
    grammar = ScriptedGrammar(ready=False)
    slow = make_req([1, 2, 3], max_tokens=3, grammar=grammar)
    free = make_req([4, 5, 6], max_tokens=3)
    sched.add_request(slow)
    sched.add_request(free)
    runner = FakeRunner(sched.config.block_size)
    for _ in range(2):
        out = sched.schedule()
        assert [s.req for s in out.seqs] == [free]
        sched.update_from_output(out, runner.execute(out))
    assert slow.status == RequestStatus.WAITING and slow.num_computed_tokens == 0
    grammar.ready = True
    out = sched.schedule()
    assert slow in [s.req for s in out.seqs]


def test_grammar_accepts_exactly_the_output_through_preemption() -> None:
    # 8 blocks of 4 tokens for requests that need 4 each at the end: some are preempted and
    # recomputed; each grammar must still have seen its output once, in order.
    sched = make_sched(num_blocks=8, max_num_batched_tokens=16)
    reqs = [
        make_req(list(range(i, i + 6)), max_tokens=10, grammar=ScriptedGrammar()) for i in range(5)
    ]
    outputs = run(sched, [reqs])
    assert sched.num_preemptions > 0
    for req in reqs:
        assert outputs[req.request_id] == reference(req, sched.max_model_len)
        assert req.grammar.accepted == req.output_token_ids


class ScriptRunner:
    def __init__(self, tokens: list[list[int]]) -> None:
        self.tokens = iter(tokens)

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        return ModelRunnerOutput({s.req.request_id: next(self.tokens) for s in out.seqs})


def drive(req, tokens: list[list[int]]) -> None:
    sched = make_sched()
    sched.add_request(req)
    runner = ScriptRunner(tokens)
    while sched.has_unfinished_requests():
        out = sched.schedule()
        sched.update_from_output(out, runner.execute(out))
    assert sched.kv_cache_manager.num_free_blocks == sched.kv_cache_manager.num_blocks


def test_terminated_grammar_stops_even_with_ignore_eos_and_min_tokens() -> None:
    sp = SamplingParams(ignore_eos=True, min_tokens=5)
    req = make_req([1], max_tokens=9, eos_token_ids=frozenset({2}), sp=sp,
                   grammar=ScriptedGrammar(stop=2))  # fmt: skip
    drive(req, [[5], [2], [6]])
    assert req.output_token_ids == [5, 2]
    assert req.status == RequestStatus.FINISHED_STOPPED and req.stop_reason is None


def test_rejected_token_ends_the_request_without_emitting_it() -> None:
    req = make_req([1], max_tokens=9, grammar=ScriptedGrammar(reject=7))
    drive(req, [[5], [7], [6]])
    assert req.output_token_ids == [5]
    assert req.status == RequestStatus.FINISHED_STOPPED


def test_grammar_stops_on_a_draft_midway() -> None:
    # Multi-token updates (accepted drafts) stop at the token that terminates the grammar.
    req = make_req([1], max_tokens=9, grammar=ScriptedGrammar(stop=4))
    drive(req, [[3, 4, 8]])
    assert req.output_token_ids == [3, 4] and req.grammar.accepted == [3, 4]


# -- forced runs -------------------------------------------------------------------------------


@dataclass
class ForcingGrammar:
    """Forces the reference token at each position in `forced` (as a grammar whose mask allows
    one token there would); accepts any token elsewhere."""

    script: list[int]
    forced: frozenset[int]
    accepted: list[int] = field(default_factory=list)
    ready: bool = True

    def accept_token(self, token_id: int) -> bool:
        self.accepted.append(token_id)
        return True

    def is_terminated(self) -> bool:
        return False

    def forced_tokens(self, max_n: int) -> list[int]:
        out: list[int] = []
        i = len(self.accepted)
        while len(out) < max_n and i in self.forced and i < len(self.script):
            out.append(self.script[i])
            i += 1
        return out


def forcing_req(
    i: int, max_tokens: int, forced: frozenset[int], sp: SamplingParams | None = None
) -> Request:
    prompt = list(range(i, i + 6))
    # The grammar's script runs past max_tokens: only the bound keeps forced runs within it.
    script = reference(make_req(prompt, max_tokens=max_tokens + 8), 256)
    grammar = ForcingGrammar(script, forced)
    return make_req(prompt, max_tokens=max_tokens, grammar=grammar, sp=sp)


@pytest.mark.parametrize("num_blocks", [64, 9])  # 9: requests are preempted and recomputed
def test_forced_runs_give_the_same_tokens_with_fewer_samples(num_blocks: int) -> None:
    """Forced tokens are appended unsampled and their KV is computed in the next step as one
    chunk (the fake runner checks every slot it reads); the output is the token-by-token one,
    never longer than max_tokens, and the grammar accepts it exactly once."""
    forced = frozenset({1, 2, 3, 4, 6, 7, 10, 11, 12, 13})
    sched = make_sched(num_blocks=num_blocks, max_num_batched_tokens=16, max_forced_tokens=3)
    reqs = [forcing_req(i, max_tokens=12, forced=forced) for i in range(5)]
    samples: dict[str, int] = {r.request_id: 0 for r in reqs}

    def count(out: SchedulerOutput) -> None:
        for s in out.seqs:
            samples[s.req.request_id] += s.sample

    outputs = run(sched, [reqs], on_step=count)
    if num_blocks == 9:
        assert sched.num_preemptions > 0
    for req in reqs:
        assert outputs[req.request_id] == reference(req, sched.max_model_len)
        assert len(req.output_token_ids) == 12
        assert req.grammar.accepted == req.output_token_ids
        if req.num_preemptions == 0:
            # Sampled at positions 0, 4 (runs hold 3 at most), 5, 8 and 9; 1-3, 6-7 and
            # 10-11 forced; 12-13 would pass max_tokens.
            assert samples[req.request_id] == 5


def test_forced_runs_off_without_logprobs_or_stop_strings() -> None:
    for sp in (SamplingParams(logprobs=1), SamplingParams(stop=["x"])):
        sched = make_sched(max_forced_tokens=8)
        req = forcing_req(0, max_tokens=6, forced=frozenset(range(1, 6)), sp=sp)
        steps: list[SchedulerOutput] = []
        outputs = run(sched, [[req]], on_step=steps.append)
        assert outputs[req.request_id] == reference(req, sched.max_model_len)
        assert sum(s.sample for out in steps for s in out.seqs) == 6

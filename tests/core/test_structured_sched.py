"""The scheduler's side of structured output, with a scripted grammar (no xgrammar): a request
waits while its grammar compiles, each appended token is accepted exactly once (preemption and
recompute included), and a terminated grammar ends the request."""

from __future__ import annotations

from dataclasses import dataclass, field

from sched_utils import FakeRunner, make_req, make_sched, reference, run

from tokenmill.core.sched_types import ModelRunnerOutput, SchedulerOutput
from tokenmill.request import RequestStatus
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

"""Deadlines, predicted remaining work and slack of requests that carry SLOs.

Every request with an `slo` gets absolute targets when it is added: a TTFT deadline, a mean
TPOT target and a deadline. A workflow stage (`workflow.remaining_stages > 0`) gets the
workflow's remaining deadline less the predicted work of the stages still to come (the work of
a stage of each kind -- its index and the workflow's number of stages -- is an online average
over the requests seen; `SloKnobs.deadline_split` "proportional" gives it a share by work
instead). Prompt tokens the prefix cache held at
arrival are not predicted work. Doomed requests (core/slo_shed.py) rank after every request
that can make it, hopeless ones last.

Remaining work comes from the step-cost model at the current load: a decode step of the running
batch takes T; a pending chunk of p tokens takes ceil(p / budget) steps plus p tokens' marginal
cost. A request's latest start time (LST) is its tightest target minus the work still needed to
meet it; slack = LST - now. Least slack first is earliest LST first, so the order does not
depend on `now` within a step. A request whose slack is negative however it is served is
hopeless: the slo policy serves it after every request that can still make it, in arrival
order. Being hopeless is final once the step-cost model has measured `SETTLED_STEPS` steps.

The clock is injected (the simulator runs on simulated time). Pure Python.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from tokenmill.core.slo_knobs import SloKnobs
from tokenmill.core.step_model import StepCostModel, StepShape
from tokenmill.request import Request

INF = math.inf
# Hopeless is final once the step-cost model has measured this many steps. Before, its
# predictions may still be the prior's (a 2-core CPU), far from this host, so the verdict is
# taken afresh at each decision.
SETTLED_STEPS = 64
_EMA = 0.2  # weight of a new observation in a stage index's average work


def _average(avg: dict[tuple[int, int], float], stage: tuple[int, int], work: float) -> None:
    prev = avg.get(stage)
    avg[stage] = work if prev is None else prev + _EMA * (work - prev)


@dataclass
class SloState:
    ttft_deadline: float = INF
    tpot_s: float | None = None
    deadline: float = INF  # the whole request's (workflow's) deadline
    stage_deadline: float = INF  # this stage's share of it
    rest_work: float = 0.0  # predicted work of the dependent stages after this one
    rest_alone: float = 0.0  # the same, each served alone: the least they can take
    first_token: float | None = None
    hopeless: bool = False
    doomed: bool = False  # given up on to save others (core/slo_shed.py): served last
    cached: int = 0  # prompt tokens the prefix cache held at arrival: not work to predict


class SloTracker:
    def __init__(
        self,
        cost: StepCostModel,
        budget: int,
        clock: Callable[[], float],
        knobs: SloKnobs | None = None,
    ) -> None:
        self.cost = cost
        self.budget = budget
        self.clock = clock
        self.knobs = knobs or SloKnobs()
        self.states: dict[str, SloState] = {}
        self.now = clock()
        self.step_time = cost.predict(StepShape(1, 1, 0))
        self.urgent_slack = self.knobs.urgent_steps * self.step_time
        # (stage index, number of stages) -> average predicted work; the pair tells stages of
        # different kinds apart (a correction round from a final check at the same index).
        self._stage_work: dict[tuple[int, int], float] = {}
        self._stage_alone: dict[tuple[int, int], float] = {}  # ... and served alone
        self.num_hopeless = 0  # requests found hopeless (each counted once)
        self.num_doomed = 0  # requests given up on to save others (slo_shed.py)
        self.batch = 1  # sequences in the last step: they share its fixed cost
        # Workflows given up on: their later stages are doomed when they arrive (bounded).
        self.doomed_workflows: dict[str, None] = {}

    # ------------------------------------------------------------------ lifecycle
    def add(self, req: Request, cached: int = 0) -> SloState | None:
        """Targets of a new request; `cached`: its prompt tokens in the prefix cache now."""
        slo = req.sampling_params.slo
        if slo is None:
            return None
        now = self.clock()
        st = SloState(cached=cached)
        self.states[req.request_id] = st
        arrival = min(req.arrival_time, now)
        if slo.ttft_ms is not None:
            st.ttft_deadline = arrival + slo.ttft_ms / 1000.0
        if slo.tpot_ms is not None:
            st.tpot_s = slo.tpot_ms / 1000.0
        if slo.deadline_ms is not None:
            st.deadline = st.stage_deadline = arrival + slo.deadline_ms / 1000.0
            wf = req.sampling_params.workflow
            if wf is not None:
                work = self.remaining_work(req)[1]
                alone = self.remaining_work(req, alone=True)[1]
                n = wf.stage + wf.remaining_stages + 1
                st.rest_work = self._rest(self._stage_work, wf.stage, n, work)
                st.rest_alone = self._rest(self._stage_alone, wf.stage, n, alone)
                _average(self._stage_work, (wf.stage, n), work)
                _average(self._stage_alone, (wf.stage, n), alone)
                if self.knobs.deadline_split == "latest":
                    st.stage_deadline = st.deadline - st.rest_work
                else:
                    share = work / (work + st.rest_work) if st.rest_work > 0 else 1.0
                    st.stage_deadline = arrival + slo.deadline_ms / 1000.0 * share
        wf = req.sampling_params.workflow
        if wf is not None and wf.id in self.doomed_workflows:
            st.doomed = True
            self.num_doomed += 1
        return st

    def doom(self, req: Request) -> None:
        """Give up on `req` (and its workflow's later stages): it is served last."""
        st = self.states[req.request_id]
        if st.doomed:
            return
        st.doomed = True
        self.num_doomed += 1
        wf = req.sampling_params.workflow
        if wf is not None:
            self.doomed_workflows[wf.id] = None
            if len(self.doomed_workflows) > 10_000:
                del self.doomed_workflows[next(iter(self.doomed_workflows))]

    @staticmethod
    def _rest(avg: dict[tuple[int, int], float], stage: int, n: int, this: float) -> float:
        return sum(avg.get((k, n), this) for k in range(stage + 1, n))

    def pop(self, req_id: str) -> SloState | None:
        return self.states.pop(req_id, None)

    def on_output(self, req: Request) -> None:
        st = self.states.get(req.request_id)
        if st is not None and st.first_token is None and req.num_output_tokens:
            st.first_token = self.clock()

    def begin_step(self, running: Iterable[Request], last: StepShape | None = None) -> None:
        """Fixes `now` and the current decode step time for this step's decisions: that of the
        last step's decode rows (deferred requests are not in it), else of all running ones."""
        self.now = self.clock()
        if last is None or last.seqs == 0:
            n = ctx = 0
            for r in running:
                n += 1
                ctx += r.num_computed_tokens
            last = StepShape(max(n, 1), max(n, 1), ctx)
        seqs, context = last.seqs, last.context
        self.batch = max(1, seqs)
        predict = self.cost.predict_counts
        self.step_time = predict(seqs, seqs, context)
        full = predict(self.budget, seqs + 1, context)  # a step with a full-budget chunk
        knobs = self.knobs
        # Slack under this: about to miss (see SloKnobs.urgent_steps).
        self.urgent_slack = knobs.urgent_steps * self.step_time + knobs.urgent_chunks * full

    # ------------------------------------------------------------------ predictions
    def pending(self, req: Request) -> int:
        """Tokens the request still has to run through the model (at least 1): a queued one's
        prompt less what the prefix cache held when it arrived."""
        st = self.states.get(req.request_id)
        done = req.num_computed_tokens
        if st is not None and st.cached > done:
            done = st.cached
        return max(1, req.num_tokens - done)

    def remaining_work(self, req: Request, alone: bool = False) -> tuple[float, float]:
        """(seconds to the next sampled token, seconds to the end), at the current load, or
        (`alone`) in steps of this request only: the least it can take."""
        # `pending`, inline: this runs for every deferred request at every held step.
        st = self.states.get(req.request_id)
        n_out = len(req.output_token_ids)
        n_tok = len(req.prompt_token_ids) + n_out
        done = req.num_computed_tokens
        if st is not None and st.cached > done:
            done = st.cached
        pending = n_tok - done
        if pending < 1:
            pending = 1
        step = self.step_time
        a, b, c, d = self.cost.coeffs
        if alone:
            step = min(step, max(1e-6, a + b + c + d * n_tok / 1000.0))
        first = -(-pending // self.budget) * step + (pending - 1) * b
        after = req.max_tokens - n_out - 1
        return first, first + after * step if after > 0 else first

    def remaining_steps(self, req: Request) -> int:
        """Steps the request still needs: its pending chunks, then one per token."""
        pending = self.pending(req)
        after = max(0, req.max_tokens - req.num_output_tokens - 1)
        return math.ceil(pending / self.budget) + after

    def latest_start(self, req: Request, st: SloState) -> float:
        """The latest time the request's remaining work may start and still meet its tightest
        target (inf without one)."""
        to_first, to_end = self.remaining_work(req)
        lst = INF
        if st.first_token is None and st.ttft_deadline < INF:
            lst = st.ttft_deadline - to_first
        if st.stage_deadline < INF:
            lst = min(lst, st.stage_deadline - to_end)
        if st.tpot_s is not None and st.first_token is not None:
            # Mean TPOT: the last token is due tpot * (max_tokens - 1) after the first.
            lst = min(lst, st.first_token + st.tpot_s * max(0, req.max_tokens - 1) - to_end)
        return lst

    def miss_reason(self, req: Request, st: SloState) -> str | None:
        """Why the request cannot meet a target even if served alone, or None (the test that
        makes `key` rank it hopeless, with the reason in words)."""
        to_first, to_end = self.remaining_work(req, alone=True)
        now = self.now
        if st.first_token is None and now + to_first > st.ttft_deadline:
            left = (st.ttft_deadline - now) * 1000.0
            return (
                f"slo.ttft_ms cannot be met: the first token needs at least "
                f"~{to_first * 1000.0:.0f} ms, {max(left, 0.0):.0f} ms are left"
            )
        if now + to_end + st.rest_alone > st.deadline:
            left = (st.deadline - now) * 1000.0
            need = (to_end + st.rest_alone) * 1000.0
            return (
                f"slo.deadline_ms cannot be met: at least ~{need:.0f} ms of work remain (this "
                f"stage and the ones after it), {max(left, 0.0):.0f} ms are left"
            )
        return None

    def key(self, req: Request, arrival_seq: int) -> tuple:
        """(rank, latest start, arrival, arrival_seq): the slo policy's order. The same
        arithmetic as `miss_reason` and `latest_start`, in one pass (it runs for every queued
        request at every step)."""
        st = self.states.get(req.request_id)
        if st is None:
            return (0, INF, req.arrival_time, arrival_seq)
        if st.hopeless and self.cost.num_observed >= SETTLED_STEPS:
            # Final: served alone from now on, its work left would shrink no faster than time
            # passes. Hopeless requests go last, in arrival order, without taking slack again.
            return (2, INF, req.arrival_time, arrival_seq)
        n_out = len(req.output_token_ids)
        n_tok = len(req.prompt_token_ids) + n_out
        done = req.num_computed_tokens
        if st.cached > done:
            done = st.cached
        pending = n_tok - done
        if pending < 1:
            pending = 1
        a, b, c, d = self.cost.coeffs
        chunks = -(-pending // self.budget)
        prompt = (pending - 1) * b
        after = req.max_tokens - n_out - 1
        if after < 0:
            after = 0
        step = self.step_time
        alone = max(1e-6, a + b + c + d * n_tok / 1000.0)
        if alone > step:
            alone = step
        first = chunks * alone + prompt
        now = self.now
        hopeless = (st.first_token is None and now + first > st.ttft_deadline) or (
            now + first + after * alone + st.rest_alone > st.deadline
        )
        if hopeless and not st.hopeless:
            self.num_hopeless += 1
        if hopeless:
            st.hopeless = req.slo_hopeless = True
        first = chunks * step + prompt
        end = first + after * step
        lst = INF
        if st.first_token is None:
            if st.ttft_deadline < INF:
                lst = st.ttft_deadline - first
        elif st.tpot_s is not None:
            lst = st.first_token + st.tpot_s * max(0, req.max_tokens - 1) - end
        if st.stage_deadline - end < lst:
            lst = st.stage_deadline - end
        # 0: can make it; 1: doomed (given up on for others); 2: hopeless. Both go last.
        rank = 2 if hopeless else 1 if st.doomed else 0
        return (rank, lst, req.arrival_time, arrival_seq)

    def slack(self, req: Request) -> float:
        st = self.states.get(req.request_id)
        return INF if st is None else self.latest_start(req, st) - self.now

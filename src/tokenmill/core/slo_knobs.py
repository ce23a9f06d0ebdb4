"""The slo policy's tunable constants, in one place so the simulator can grid over them.

The defaults were picked in the simulator on seed 0 of the synthetic text-to-SQL + chat trace
(attainment at FCFS's 80% rate; `benchmarks/slo_sweep.py --tune` grids the main ones) and
checked on seeds 1 and 2; later ones, and re-checks, on fixed points of sixteen traces
(`benchmarks/slo_points.py`: the same workflows under each setting, so differences are paired).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SloKnobs:
    # A waiting request whose slack is under this many decode steps is about to miss: it may
    # preempt a decode with slack to spare (TTFT rescue) and passes admission control.
    urgent_steps: float = 4.0
    # ... plus this many steps that fill the token budget: the next step may be a long prompt
    # chunk, and a request that only notices it is urgent after one has missed already.
    urgent_chunks: float = 1.0
    max_urgent: int = 4  # at most this many urgent requests rescued per step (bounds the work)
    # Deferral: past the `min_batch` most urgent running requests, one whose slack exceeds
    # `defer_ratio` times its remaining work sits the step out (it keeps its KV). On a CPU every
    # sequence in a step slows the step; `min_batch` keeps the step's fixed cost shared.
    min_batch: int = 3
    defer_ratio: float = 1.0
    # Overload shedding (core/slo_shed.py): give up on the fewest requests so the rest make it,
    # with predicted work inflated by this factor; 0 turns it off.
    shed_load: float = 1.0
    # ... taking a workflow as one job (its deadline, and the predicted work of its later stages
    # too), rather than its current stage alone (due at the stage's share of the deadline).
    shed_workflows: bool = True
    # While decodes share a step, a prompt with slack to spare runs at most this many tokens a
    # step (0: the whole budget): a 512-token chunk stalls them as long as ~40 decode steps.
    chunk_tokens: int = 128
    # ... and less while a decode that runs is short of slack: this fraction of the tightest
    # one's slack per remaining step, in prompt tokens (core/slo_prompt_room.py; 0: off).
    decode_room: float = 1.0
    # While a request's first token is about to miss its TTFT, the prompt chunks of requests
    # with slack to spare share its step only as far as its TTFT allows (a chat admitted beside
    # a 400-token schema chunk waits for the whole chunk).
    ttft_room: bool = True
    # A request of the same workflow stage as one of the `min_batch` most urgent (a fan-out's
    # parallel candidates) is not deferred: the next stage waits for the last of them.
    siblings: bool = True
    # Admission control (core/slo_admission.py): a request is not admitted while it would push
    # a more urgent running request past its target.
    guard: bool = True
    # How a workflow stage is charged its share of the workflow's deadline: "proportional" (its
    # predicted work over its own plus the remaining stages') or "latest" (the deadline less the
    # remaining stages' predicted work: HEXGEN-Text2SQL's slack).
    deadline_split: str = "latest"
    # Hold: in a stretch of pure decode steps (nothing waits; nothing was added, finished or
    # preempted since the last full decision; every running request that is not deferred
    # decodes one token) a step keeps the last full decision -- the running order, the deferred
    # and the doomed -- for at most this many steps (0: re-decide every step), while every
    # deferred request would still be deferred now. Keys, doom and deferral of the requests
    # that run are not re-taken meanwhile, so a running request is found hopeless, doomed or
    # able to sit out up to this many steps late (core/slo_hold.py). In the simulator, where
    # the hold makes the slo policy's replay about twice as fast, 32 steps together with the
    # decode room meet as many deadlines as neither (docs/benchmarks.md).
    hold_steps: int = 32

    def __post_init__(self) -> None:
        assert min(self.urgent_steps, self.urgent_chunks, self.max_urgent) >= 0, self
        assert self.min_batch >= 1 and self.defer_ratio >= 0, self
        assert self.shed_load >= 0 and self.chunk_tokens >= 0 and self.hold_steps >= 0, self
        assert self.decode_room >= 0, self
        assert self.deadline_split in ("proportional", "latest"), self

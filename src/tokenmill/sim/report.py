"""SLO attainment, workflow latency and goodput of a simulated (or measured) run."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from tokenmill.sim.simulator import Outcome


@dataclass
class Report:
    num_requests: int
    num_workflows: int
    deadline_attainment: float  # workflows (and single requests with a deadline) on time
    ttft_attainment: float  # requests with a TTFT target that met it
    tpot_attainment: float
    slo_attainment: float  # requests meeting every target they carry (a stage: its deadline)
    p95_workflow_latency: float
    goodput: float  # requests meeting their SLOs per second of makespan
    workflow_goodput: float  # workflows meeting their deadline per second
    num_hopeless: int  # found unable to meet their SLO (slo policy), or rejected
    num_rejected: int  # refused as hopeless, or stages never sent: their deadline had passed
    makespan: float

    def lines(self) -> list[str]:
        return [
            f"requests {self.num_requests}  workflows {self.num_workflows}  "
            f"makespan {self.makespan:.1f} s",
            f"deadline attainment   {self.deadline_attainment:6.1%}",
            f"TTFT SLO attainment   {self.ttft_attainment:6.1%}",
            f"TPOT SLO attainment   {self.tpot_attainment:6.1%}",
            f"all-SLO attainment    {self.slo_attainment:6.1%}",
            f"p95 workflow latency  {self.p95_workflow_latency:8.2f} s",
            f"goodput               {self.goodput:8.2f} req/s "
            f"({self.workflow_goodput:.2f} workflows/s)",
            f"hopeless {self.num_hopeless}  rejected {self.num_rejected}",
        ]


def _frac(xs: list[bool]) -> float:
    return sum(xs) / len(xs) if xs else 1.0


def p95(xs: list[float]) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[min(len(s) - 1, int(0.95 * len(s)))]


def request_met(o: Outcome) -> dict[str, bool]:
    """Which of its targets a request met (a stage's deadline is its workflow's)."""
    slo = o.rec.slo or {}
    met: dict[str, bool] = {}
    done = o.finish is not None and not o.rejected
    if "ttft_ms" in slo:
        met["ttft"] = done and o.first_token - o.release <= slo["ttft_ms"] / 1000.0
    if "tpot_ms" in slo:
        n = o.rec.output_tokens
        tpot = 0.0 if not done or n <= 1 else (o.finish - o.first_token) / (n - 1)
        met["tpot"] = done and tpot <= slo["tpot_ms"] / 1000.0
    if "deadline_ms" in slo:
        met["deadline"] = done and o.finish - o.workflow_start <= slo["deadline_ms"] / 1000.0
    return met


def by_workflow(outcomes: Iterable[Outcome]) -> dict[str, list[Outcome]]:
    """Workflow id -> the outcomes of its stages (requests outside a workflow left out)."""
    workflows: dict[str, list[Outcome]] = {}
    for o in outcomes:
        wf = (o.rec.workflow or {}).get("id")
        if wf is not None:
            workflows.setdefault(wf, []).append(o)
    return workflows


def workflow_latency(stages: list[Outcome]) -> float:
    """From a workflow's start to the end of its last stage (inf if a stage was refused or never
    finished; a stage never sent, its parent refused, counts through that parent)."""
    if any(s.finish is None or s.rejected for s in stages):
        return float("inf")
    return max(s.finish for s in stages) - stages[0].workflow_start  # type: ignore[type-var]


def workflow_met(stages: list[Outcome], latency: float | None = None) -> bool:
    """Whether a workflow (the outcomes of its stages) met its deadline; `latency`: its
    `workflow_latency`, if the caller has it."""
    deadline = (stages[0].rec.slo or {}).get("deadline_ms")
    if latency is None:
        latency = workflow_latency(stages)
    return deadline is not None and latency <= deadline / 1e3


def summarize(outcomes: Iterable[Outcome], makespan: float) -> Report:
    outs = list(outcomes)
    mets = [request_met(o) for o in outs]
    workflows = by_workflow(outs)
    wf_met: list[bool] = []
    wf_latency: list[float] = []
    for stages in workflows.values():
        latency = workflow_latency(stages)
        wf_latency.append(latency)
        wf_met.append(workflow_met(stages, latency))
    single_deadline = [
        m["deadline"]
        for o, m in zip(outs, mets, strict=True)
        if "deadline" in m and not o.rec.workflow
    ]
    deadline_met = wf_met + single_deadline
    span = max(makespan, 1e-9)
    req_ok = [bool(m) and all(m.values()) for m in mets if m]
    return Report(
        num_requests=len(outs),
        num_workflows=len(workflows),
        deadline_attainment=_frac(deadline_met),
        ttft_attainment=_frac([m["ttft"] for m in mets if "ttft" in m]),
        tpot_attainment=_frac([m["tpot"] for m in mets if "tpot" in m]),
        slo_attainment=_frac(req_ok),
        p95_workflow_latency=p95(wf_latency),
        goodput=sum(req_ok) / span,
        workflow_goodput=sum(wf_met) / span,
        num_hopeless=sum(o.hopeless for o in outs),
        num_rejected=sum(o.rejected for o in outs),
        makespan=makespan,
    )

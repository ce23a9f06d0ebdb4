"""A synthetic agentic text-to-SQL workload mixed with interactive chat (fixed seed).

A workflow is a chain of 3-5 dependent stages under one deadline: schema linking (a long
prompt holding the schema), SQL generation -- half the time fanned out to 4 parallel candidates,
each with its own instructions after the schema (as generators with different prompts are) --,
zero to two self-correction rounds, each released after a simulated SQL execution, and a final
check. Every stage's prompt starts with the workflow's schema, which the prefix cache can
reuse between stages. Deadlines are drawn per workflow as a multiple of its work in
isolation. Chat requests arrive independently with a TTFT (and a loose TPOT) target.
"""

from __future__ import annotations

import random

from tokenmill.core.step_model import DEFAULT_COEFFS
from tokenmill.sim.trace import TraceRecord

FANOUT = 4


def alone_seconds(prompt: int, output: int, coeffs: tuple[float, ...], budget: int) -> float:
    """A request's time when served alone: its prefill chunks, then one step per token."""
    a, b, c, d = coeffs
    chunks = -(-prompt // budget)
    prefill = chunks * (a + c) + prompt * b + d * prompt / 1000.0 * chunks
    decode = (output - 1) * (a + b + c + d * (prompt + output / 2) / 1000.0)
    return prefill + decode


def generate(
    rate: float,
    duration: float,
    *,
    seed: int = 0,
    chat_fraction: float = 0.5,
    deadline_scale: tuple[float, float] = (2.0, 6.0),
    ttft_ms: tuple[float, float] = (300.0, 1500.0),
    coeffs: tuple[float, float, float, float] = DEFAULT_COEFFS,
    budget: int = 512,
) -> list[TraceRecord]:
    """Arrivals (workflows and chats together) at `rate` per second for `duration` seconds."""
    rng = random.Random(seed)
    records: list[TraceRecord] = []
    t = 0.0
    n = 0
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            break
        n += 1
        if rng.random() < chat_fraction:
            prompt = rng.randint(32, 256)
            records.append(
                TraceRecord(
                    id=f"chat{n}",
                    arrival=round(t, 6),
                    prompt_tokens=prompt,
                    output_tokens=rng.randint(16, 96),
                    slo={"ttft_ms": round(rng.uniform(*ttft_ms), 1), "tpot_ms": 250.0},
                )
            )
        else:
            records.extend(_workflow(rng, f"wf{n}", t, deadline_scale, coeffs, budget))
    return records


def _workflow(
    rng: random.Random,
    wid: str,
    t: float,
    deadline_scale: tuple[float, float],
    coeffs: tuple[float, float, float, float],
    budget: int,
) -> list[TraceRecord]:
    schema = rng.randint(256, 768)
    question = rng.randint(16, 64)
    fanout = rng.random() < 0.5
    corrections = rng.randint(0, 2)
    # (name, prompt beyond the schema, output, parallel copies, delay before release)
    stages = [("link", question, rng.randint(16, 48), 1, 0.0)]
    stages.append(("sql", question + 64, rng.randint(32, 96), FANOUT if fanout else 1, 0.0))
    for k in range(corrections):
        stages.append((f"fix{k}", question + 160, rng.randint(32, 96), 1, rng.uniform(0.02, 0.1)))
    stages.append(("check", question + 96, rng.randint(8, 24), 1, rng.uniform(0.02, 0.1)))
    # Critical path in isolation: the deadline is a random multiple of it.
    alone = sum(alone_seconds(schema + p, o, coeffs, budget) + dl for _, p, o, _, dl in stages)
    deadline_ms = round(alone * rng.uniform(*deadline_scale) * 1000.0, 1)
    out: list[TraceRecord] = []
    parents: list[str] = []
    for i, (name, extra, output, copies, delay) in enumerate(stages):
        ids = [f"{wid}.{name}" if copies == 1 else f"{wid}.{name}.{c}" for c in range(copies)]
        for rid in ids:
            out.append(
                TraceRecord(
                    id=rid,
                    arrival=round(t, 6) if i == 0 else 0.0,
                    after=list(parents),
                    delay=round(delay, 4),
                    prompt_tokens=schema + extra,
                    output_tokens=output,
                    prefix=wid,  # every stage's prompt starts with the schema
                    prefix_tokens=schema,
                    slo={"deadline_ms": deadline_ms},
                    workflow={"id": wid, "stage": i, "remaining_stages": len(stages) - 1 - i},
                )
            )
        parents = ids
    return out


def deadline_multiples(
    records: list[TraceRecord],
    coeffs: tuple[float, float, float, float] = DEFAULT_COEFFS,
    budget: int = 512,
) -> dict[str, tuple[int, float]]:
    """Workflow id -> (number of stages, its deadline over its critical path served alone): the
    multiple `generate` drew (with the same `coeffs` and `budget`)."""
    stages: dict[str, dict[int, TraceRecord]] = {}
    for r in records:
        if r.workflow is not None:
            stages.setdefault(r.workflow["id"], {}).setdefault(r.workflow["stage"], r)
    out: dict[str, tuple[int, float]] = {}
    for wid, by_stage in stages.items():
        alone = sum(
            alone_seconds(r.prompt_tokens, r.output_tokens, coeffs, budget) + r.delay
            for r in by_stage.values()
        )
        deadline = (by_stage[0].slo or {})["deadline_ms"] / 1000.0
        out[wid] = (len(by_stage), deadline / alone)
    return out

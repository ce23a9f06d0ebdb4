"""Deadline-aware scheduling on the synthetic agentic text-to-SQL + chat workload.

Replays the trace of `tokenmill make-trace` (workflows of 3-5 dependent stages, some fanned out
to 4 parallel SQL candidates, a deadline per workflow, mixed with chat requests that have a TTFT
target) live against `tokenmill serve` under each scheduling policy, and against llama.cpp's
llama-server (no deadline scheduling: the FCFS peer), at rising arrival rates. A stage is sent
when its parents' responses have arrived (plus the trace's delay, standing in for SQL
execution); every request is streamed so TTFT is measured. Reports deadline attainment, TTFT /
TPOT attainment, p95 workflow latency and goodput (requests per second meeting their SLOs),
then runs the simulator (`tokenmill simulate`) on the same trace at `--sim-scale` times the
duration, whose figures do not depend on the host's load.

    python benchmarks/slo.py --rates 0.2 0.3 0.4 0.5 --duration 300 \\
        --llama-bin PATH/TO/llama.cpp/build/bin --out results/slo

Prompts are token ids (the same for both servers); `ignore_eos` makes output lengths exact.
The step costs the simulator assumes are `--step-cost` (a b c d; default: tokenmill's prior
for the default model on a 2-core CPU); `tests/engine/test_step_tracking.py` checks that such
predictions track the measured steps of the default model. They also set the trace's deadlines
(each workflow's is a multiple of its work alone at those costs), so a live run passes the
host's own fitted costs: with the prior's, a host several times faster meets every deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import host_info  # noqa: E402
from serving_compare import stop, wait_ready  # noqa: E402

from tokenmill.core.step_model import DEFAULT_COEFFS  # noqa: E402
from tokenmill.loader.model_source import default_model_path  # noqa: E402
from tokenmill.sim.report import summarize  # noqa: E402
from tokenmill.sim.simulator import Outcome, SimConfig, simulate  # noqa: E402
from tokenmill.sim.text2sql import generate  # noqa: E402
from tokenmill.sim.trace import TraceRecord, prompt_ids  # noqa: E402


async def _send(
    client: httpx.AsyncClient, url: str, rec: TraceRecord, o: Outcome, t0: float, slo_fields: bool
) -> None:
    body: dict[str, Any] = {
        "prompt": prompt_ids(rec),
        "max_tokens": rec.output_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
    }
    if slo_fields and rec.slo:
        slo = dict(rec.slo)
        if "deadline_ms" in slo:  # the part of the workflow's deadline that is left
            slo["deadline_ms"] = slo["deadline_ms"] - (o.release - o.workflow_start) * 1000.0
            if slo["deadline_ms"] <= 0:
                o.rejected = True
                return
        body["slo"] = slo
        if rec.workflow:
            body["workflow"] = rec.workflow
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code == 429:
            o.rejected = True
            return
        if r.status_code != 200:
            raise RuntimeError(f"{rec.id}: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if o.first_token is None and any(c.get("text") for c in chunk.get("choices", ())):
                o.first_token = time.monotonic() - t0
    o.finish = time.monotonic() - t0


async def replay(url: str, records: list[TraceRecord], slo_fields: bool) -> dict[str, Outcome]:
    """Sends each record at its arrival (roots) or when its parents are done (stages)."""
    children: dict[str, list[TraceRecord]] = {}
    waiting_on = {r.id: len(r.after) for r in records}
    for r in records:
        for p in r.after:
            children.setdefault(p, []).append(r)
    outcomes: dict[str, Outcome] = {}
    tasks: set[asyncio.Task] = set()
    # No keep-alive: llama-server closes idle connections, which httpx would then reuse.
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=limits) as client:
        t0 = time.monotonic()

        async def run(rec: TraceRecord, at: float, wf_start: float) -> None:
            await asyncio.sleep(max(0.0, at - (time.monotonic() - t0)))
            o = outcomes[rec.id] = Outcome(rec, time.monotonic() - t0, wf_start)
            await _send(client, url, rec, o, t0, slo_fields)
            for child in children.get(rec.id, ()):
                waiting_on[child.id] -= 1
                if waiting_on[child.id] == 0 and not o.rejected:
                    start(child, o.finish + child.delay, wf_start)

        def start(rec: TraceRecord, at: float, wf_start: float) -> None:
            task = asyncio.create_task(run(rec, at, wf_start))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        for rec in records:
            if not rec.after:
                start(rec, rec.arrival, rec.arrival)
        while tasks:
            await asyncio.gather(*list(tasks))
    return outcomes


def _group(rec: TraceRecord) -> str:
    return (rec.workflow or {}).get("id") or rec.id


def server_cmd(args: argparse.Namespace, target: str, model: str) -> list[str]:
    if target == "llama.cpp":
        return [
            str(Path(args.llama_bin) / "llama-server"), "-m", model,
            "-np", str(args.llama_slots), "-c", str(args.llama_ctx),
            "-t", str(args.threads), "-tb", str(args.threads),
            "--host", "127.0.0.1", "--port", str(args.port), "--log-disable",
        ]  # fmt: skip
    policy = target.split(":")[1]
    return [
        sys.executable, "-m", "tokenmill.cli", "serve", model, "--port", str(args.port),
        "--uvicorn-log-level", "warning", "--scheduling-policy", policy,
        *(["--slo-reject-hopeless"] if args.reject_hopeless and policy == "slo" else []),
        *shlex.split(args.tokenmill_args),
    ]  # fmt: skip


def live(args: argparse.Namespace, model: str) -> dict[str, Any]:
    targets = [f"tokenmill:{p}" for p in args.policies]
    if args.llama_bin:
        targets.append("llama.cpp")
    url = f"http://127.0.0.1:{args.port}"
    results: dict[str, Any] = {}
    for target in targets:
        log_path = Path(args.out) / f"{target.replace(':', '_')}.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(server_cmd(args, target, model), stdout=log, stderr=log)
            try:
                wait_ready(url, proc)
                for rate in args.rates:
                    records = generate(
                        rate, args.duration, seed=args.seed, coeffs=tuple(args.step_cost)
                    )
                    if args.limit:  # a smoke test: the first records (whole workflows only)
                        keep = {_group(r) for r in records[: args.limit]}
                        records = [r for r in records if _group(r) in keep]
                    outcomes = asyncio.run(replay(url, records, target.startswith("tokenmill")))
                    wall = max((o.finish or 0.0) for o in outcomes.values())
                    rep = summarize(outcomes.values(), wall)
                    results.setdefault(target, {})[str(rate)] = asdict(rep)
                    print(f"== live {target} rate {rate}/s")
                    print("\n".join("  " + line for line in rep.lines()), flush=True)
            finally:
                stop(proc)
    return results


def simulated(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    if args.sim_scale <= 0:
        return results  # the live runs only
    for rate in args.rates:
        records = generate(
            rate, args.duration * args.sim_scale, seed=args.seed, coeffs=tuple(args.step_cost)
        )
        for policy in args.policies:
            t0 = time.perf_counter()
            res = simulate(records, SimConfig(policy=policy, coeffs=tuple(args.step_cost)))
            wall = time.perf_counter() - t0
            rep = summarize(res.outcomes.values(), res.makespan)
            results.setdefault(policy, {})[str(rate)] = {**asdict(rep), "wall_s": wall}
            print(f"== sim {policy} rate {rate}/s ({len(records)} requests, {wall:.1f} s wall)")
            print("\n".join("  " + line for line in rep.lines()), flush=True)
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", type=float, nargs="+", default=[0.2, 0.3, 0.4, 0.5])
    p.add_argument("--duration", type=float, default=300.0, help="seconds of arrivals (live)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--policies", nargs="*", default=["fcfs", "priority", "slo"])
    p.add_argument("--reject-hopeless", action="store_true", help="slo: --slo-reject-hopeless")
    p.add_argument("--model", default=None, help="GGUF (default: the default model)")
    p.add_argument("--llama-bin", default=None, help="llama.cpp bin folder (with llama-server)")
    p.add_argument("--llama-slots", type=int, default=16)
    p.add_argument("--llama-ctx", type=int, default=32768)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--port", type=int, default=8791)
    p.add_argument("--tokenmill-args", default="", help="extra flags for tokenmill serve")
    p.add_argument(
        "--sim-scale", type=float, default=100.0, help="simulated duration multiple (0: none)"
    )
    p.add_argument("--step-cost", type=float, nargs=4, default=list(DEFAULT_COEFFS))
    p.add_argument("--no-live", action="store_true", help="the simulator only")
    p.add_argument("--limit", type=int, default=0, help="live: only the first N records")
    p.add_argument("--out", default="results/slo")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    model = args.model or str(default_model_path())
    report: dict[str, Any] = {"host": host_info(), "args": vars(args)}
    if not args.no_live:
        report["live"] = live(args, model)
    report["sim"] = simulated(args)
    path = Path(args.out) / "slo.json"
    path.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()

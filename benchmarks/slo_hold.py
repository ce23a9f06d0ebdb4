"""The slo policy's hold (`SloKnobs.hold_steps`) in the simulator: attainment and replay speed.

For each seed one synthetic text-to-SQL + chat trace is drawn at 1 arrival a second and replayed
at each rate (arrivals scaled as in `slo_sweep.py`) under slo with each `hold_steps`, and under
fcfs for reference. It reports, per trace, the deadline attainment at each hold and its change
from `hold_steps=0` (re-deciding every step), then the mean change over the traces, and the
simulator's speed (requests replayed per wall second) at each hold. A single trace moves by a
workflow or more under any change to the schedule, so the means over several traces are what
tells a hold apart from no hold:

    python benchmarks/slo_hold.py --seeds 1 2 3 4 5 6 7 8 --rates 0.41 0.43
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import host_info, write_json  # noqa: E402
from slo_sweep import at_rate  # noqa: E402

from tokenmill.core.slo_knobs import SloKnobs  # noqa: E402
from tokenmill.sim.report import summarize  # noqa: E402
from tokenmill.sim.simulator import SimConfig, simulate  # noqa: E402
from tokenmill.sim.text2sql import generate  # noqa: E402

UNBOUNDED = 10**9


def run(recs: list, policy: str, hold: int) -> tuple[float, float]:
    """(deadline attainment, requests replayed per wall second)."""
    config = SimConfig(policy=policy, slo_knobs=SloKnobs(hold_steps=hold))
    t = time.perf_counter()
    res = simulate(recs, config)
    wall = time.perf_counter() - t
    return summarize(res.outcomes.values(), res.makespan).deadline_attainment, len(recs) / wall


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rates", type=float, nargs="+", default=[0.43])
    p.add_argument("--arrivals", type=float, default=1500, help="workflows + chats per trace")
    p.add_argument("--holds", type=int, nargs="+", default=[0, 4, 8, 16, 32, UNBOUNDED])
    p.add_argument("--out", default="results/slo_hold.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    holds = sorted(set(args.holds) | {0})
    traces: list[dict[str, Any]] = []
    for seed in args.seeds:
        base = generate(1.0, args.arrivals, seed=seed)
        for rate in args.rates:
            recs = at_rate(base, rate)
            fcfs = run(recs, "fcfs", 0)
            slo = {h: run(recs, "slo", h) for h in holds}
            traces.append({"seed": seed, "rate": rate, "fcfs": fcfs, "slo": slo})
            cells = "  ".join(
                f"{h}: {a:.4f} ({(a - slo[0][0]) * 100:+.2f})" for h, (a, _) in slo.items()
            )
            print(f"seed {seed} rate {rate}: attainment (pp vs 0) {cells}", flush=True)
    summary: dict[int, dict[str, float]] = {}
    for h in holds:
        delta = [(t["slo"][h][0] - t["slo"][0][0]) * 100 for t in traces]
        speed = [t["slo"][h][1] for t in traces]
        summary[h] = {
            "mean_pp": statistics.mean(delta),
            "sd_pp": statistics.stdev(delta) if len(delta) > 1 else 0.0,
            "req_per_s": statistics.mean(speed),
        }
        print(
            f"hold {h}: attainment {summary[h]['mean_pp']:+.3f} pp on average "
            f"(sd {summary[h]['sd_pp']:.3f}), {summary[h]['req_per_s']:.0f} requests/s"
        )
    fcfs_speed = statistics.mean(t["fcfs"][1] for t in traces)
    print(f"fcfs: {fcfs_speed:.0f} requests/s")
    report = {
        "host": host_info(),
        "args": vars(args),
        "knobs": asdict(SloKnobs()),
        "traces": traces,
        "summary": summary,
        "fcfs_req_per_s": fcfs_speed,
    }
    write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()

"""Which workflows miss their deadline in the simulator: by number of stages and by deadline
multiple (the deadline over the workflow's critical path served alone, drawn from 2x-6x).

Each point is a seed of the synthetic text-to-SQL + chat trace and an arrival rate (arrivals
scaled as in `slo_sweep.py`); each policy replays every point, and the misses are summed over
the points. The default points are seeds 0-7 at 1.5x FCFS's 95%-attainment rate on each (from
`slo_sweep.py`), the load at which the goodput target asks `slo` to meet 95%:

    python benchmarks/slo_misses.py --policies fcfs slo
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import host_info, write_json  # noqa: E402
from slo_points import SETS  # noqa: E402
from slo_sweep import at_rate  # noqa: E402

from tokenmill.sim.report import by_workflow, summarize, workflow_met  # noqa: E402
from tokenmill.sim.simulator import SimConfig, simulate  # noqa: E402
from tokenmill.sim.text2sql import deadline_multiples, generate  # noqa: E402

# seed:rate, 1.5x FCFS's 95% rate per seed: slo_points.py's point set t2a
POINTS = [f"{seed}:{rate}" for seed, rate in SETS["t2a"]]
BUCKETS = ("2-3x", "3-4x", "4-5x", "5-6x")


def tally(policy: str, seed: int, rate: float, arrivals: float) -> tuple[Counter, float]:
    """(Counter of (stages, bucket, "n" | "miss"), deadline attainment) of one point."""
    recs = at_rate(generate(1.0, arrivals, seed=seed), rate)
    res = simulate(recs, SimConfig(policy=policy))
    by_wf = by_workflow(res.outcomes.values())
    counts: Counter = Counter()
    for wid, (n, multiple) in deadline_multiples(recs).items():
        bucket = BUCKETS[min(max(int(multiple) - 2, 0), len(BUCKETS) - 1)]
        counts[n, bucket, "n"] += 1
        counts[n, bucket, "miss"] += not workflow_met(by_wf[wid])
    att = summarize(res.outcomes.values(), res.makespan).deadline_attainment
    return counts, att


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--points", nargs="+", default=POINTS, help="SEED:RATE ...")
    p.add_argument("--policies", nargs="+", default=["fcfs", "slo"])
    p.add_argument("--arrivals", type=float, default=1500, help="workflows + chats per trace")
    p.add_argument("--out", default="results/slo_misses.json")
    args = p.parse_args(argv)
    points = [(int(s), float(r)) for s, r in (pt.split(":") for pt in args.points)]
    report: dict[str, Any] = {"host": host_info(), "args": vars(args), "policies": {}}
    for policy in args.policies:
        total: Counter = Counter()
        atts = []
        for seed, rate in points:
            counts, att = tally(policy, seed, rate, args.arrivals)
            total.update(counts)
            atts.append(att)
        mean = sum(atts) / len(atts)
        print(f"== {policy}: mean deadline attainment {mean:.2%} over {len(points)} points")
        print("  stages  " + "  ".join(f"{b:>11s}" for b in BUCKETS) + "        all")
        rows = {}
        for n in sorted({k[0] for k in total}):
            cells = [(total[n, b, "miss"], total[n, b, "n"]) for b in BUCKETS]
            miss, num = sum(c[0] for c in cells), sum(c[1] for c in cells)
            line = "  ".join(f"{m:4d} / {k:4d}" for m, k in cells)
            print(f"  {n:6d}  {line}  {miss:4d} / {num:4d}")
            rows[str(n)] = {
                b: {"missed": m, "workflows": k} for b, (m, k) in zip(BUCKETS, cells, strict=True)
            }
        report["policies"][policy] = {"attainment": atts, "mean": mean, "missed": rows}
    write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()

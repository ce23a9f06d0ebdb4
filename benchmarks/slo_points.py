"""The slo policy's deadline attainment at fixed (trace, rate) points, for variants of its knobs.

A bisection over the rate (`slo_sweep.py`) is a coarse judge of a policy change: attainment is
jagged in the rate (moving it by 1e-5 moves a trace's attainment by up to ±0.3 points), so the
crossing a bisection lands on moves by more than most changes do. Replaying the same points
under each variant instead gives paired differences: each variant sees the same workflows,
arrivals and deadlines, and a change that helps shows on most points at once.

Point sets (seed:rate; the rates come from `benchmarks/results/slo_sweep/`, FCFS's rates, which
no slo knob moves):
  t2a  seeds 0-7 at 1.5x FCFS's 95%-attainment rate: the load of the goodput target
  t2b  seeds 8-15, the same
  f80  seeds 0-7 at FCFS's 80% rate: the load of the attainment target

    python benchmarks/slo_points.py --sets t2a t2b f80 --variants '{}' '{"decode_room": 0.5}'
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor
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

SETS: dict[str, list[tuple[int, float]]] = {
    "t2a": [(0, 0.4116), (1, 0.4419), (2, 0.45), (3, 0.4242), (4, 0.4604), (5, 0.3984),
            (6, 0.4451), (7, 0.4572)],
    "t2b": [(8, 0.4179), (9, 0.4656), (10, 0.4539), (11, 0.44), (12, 0.4929), (13, 0.4755),
            (14, 0.4293), (15, 0.4502)],
    "f80": [(0, 0.4094), (1, 0.4344), (2, 0.4094), (3, 0.4219), (4, 0.4375), (5, 0.4156),
            (6, 0.4375), (7, 0.4344)],
}  # fmt: skip


def attainment(knobs: dict[str, Any], seed: int, rate: float, arrivals: float) -> float:
    """Deadline attainment of `slo` with these knobs (the rest at their defaults) at a point."""
    recs = at_rate(generate(1.0, arrivals, seed=seed), rate)
    res = simulate(recs, SimConfig(policy="slo", slo_knobs=SloKnobs(**knobs)))
    return summarize(res.outcomes.values(), res.makespan).deadline_attainment


def _one(job: tuple[dict[str, Any], int, float, float]) -> float:
    return attainment(*job)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sets", nargs="+", default=["t2a"], choices=sorted(SETS))
    p.add_argument(
        "--variants", nargs="+", default=["{}"], help="JSON knob overrides; the first is the base"
    )
    p.add_argument("--arrivals", type=float, default=1500, help="workflows + chats per trace")
    p.add_argument("--jobs", type=int, default=2, help="replays at a time (processes)")
    p.add_argument("--out", default="results/slo_points.json")
    args = p.parse_args(argv)
    variants = [json.loads(v) for v in args.variants]
    for v in variants:  # a misspelt knob or a bad value fails here, before any replay
        try:
            SloKnobs(**v)
        except (TypeError, AssertionError) as e:
            msg = f"--variants {json.dumps(v)}: not a valid SloKnobs override ({e})"
            raise SystemExit(msg) from None
    points = [(s, r) for name in args.sets for s, r in SETS[name]]
    jobs = [(v, s, r, args.arrivals) for v in variants for s, r in points]
    with ProcessPoolExecutor(args.jobs) as pool:
        flat = list(pool.map(_one, jobs))
    n = len(points)
    report: dict[str, Any] = {"host": host_info(), "args": vars(args), "variants": []}
    base = flat[:n]
    for i, v in enumerate(variants):
        att = flat[i * n : (i + 1) * n]
        entry: dict[str, Any] = {"knobs": v, "all_knobs": asdict(SloKnobs(**v)), "sets": {}}
        for name in args.sets:
            idx = [k for k, pt in enumerate(points) if pt in SETS[name]]
            diffs = [att[k] - base[k] for k in idx]
            entry["sets"][name] = {
                "attainment": {f"{points[k][0]}:{points[k][1]}": att[k] for k in idx},
                "mean": sum(att[k] for k in idx) / len(idx),
                "mean_vs_base": sum(diffs) / len(idx),
                "points_up_down": [sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)],
            }
            e = entry["sets"][name]
            print(
                f"{name} {json.dumps(v):40s} mean {100 * e['mean']:6.2f}%  vs base "
                f"{100 * e['mean_vs_base']:+.2f}  up/down {e['points_up_down']}",
                flush=True,
            )
        report["variants"].append(entry)
    write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()

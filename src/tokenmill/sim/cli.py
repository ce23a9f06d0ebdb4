"""`tokenmill simulate TRACE.jsonl` and `tokenmill make-trace OUT.jsonl`."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict

from tokenmill.core.policy import POLICIES
from tokenmill.core.step_model import DEFAULT_COEFFS


def _coeffs(text: str) -> tuple[float, float, float, float]:
    parts = [float(x) for x in text.split(",")]
    if len(parts) != 4 or min(parts) < 0:
        raise argparse.ArgumentTypeError("--step-cost takes 4 numbers >= 0: a,b,c,d")
    return parts[0], parts[1], parts[2], parts[3]


def add_parsers(sub: argparse._SubParsersAction) -> None:
    sim = sub.add_parser(
        "simulate",
        help="replay a request trace through the real scheduler on simulated time",
    )
    sim.add_argument("trace", help="JSONL trace (see tokenmill.sim.trace)")
    sim.add_argument("--policy", choices=POLICIES, action="append", help="repeatable")
    sim.add_argument("--max-num-batched-tokens", type=int, default=512)
    sim.add_argument("--max-num-seqs", type=int, default=128)
    sim.add_argument("--block-size", type=int, default=16)
    sim.add_argument("--num-kv-blocks", type=int, default=4096)
    sim.add_argument("--no-prefix-caching", action="store_true")
    sim.add_argument(
        "--slo-reject-hopeless",
        action="store_true",
        help="slo policy: refuse requests hopeless at arrival, as serve's flag does",
    )
    sim.add_argument(
        "--step-cost",
        type=_coeffs,
        default=DEFAULT_COEFFS,
        help="a,b,c,d of step seconds = a + b tokens + c seqs + d context/1000 "
        f"(default: {','.join(map(str, DEFAULT_COEFFS))}, the default model on a 2-core CPU)",
    )
    sim.add_argument("--json", action="store_true", help="print one JSON report per policy")

    gen = sub.add_parser(
        "make-trace", help="write the synthetic agentic text-to-SQL + chat trace (fixed seed)"
    )
    gen.add_argument("out", help="JSONL file to write")
    gen.add_argument("--rate", type=float, default=0.4, help="arrivals per second")
    gen.add_argument("--duration", type=float, default=600.0, help="seconds of arrivals")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--chat-fraction", type=float, default=0.5)


def cmd_simulate(args: argparse.Namespace) -> int:
    from tokenmill.sim.report import summarize
    from tokenmill.sim.simulator import SimConfig, simulate
    from tokenmill.sim.trace import load_trace

    records = load_trace(args.trace)
    for policy in args.policy or ["fcfs", "priority", "slo"]:
        config = SimConfig(
            policy=policy,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_num_seqs=args.max_num_seqs,
            block_size=args.block_size,
            num_kv_blocks=args.num_kv_blocks,
            enable_prefix_caching=not args.no_prefix_caching,
            reject_hopeless=args.slo_reject_hopeless,
            coeffs=args.step_cost,
        )
        t0 = time.perf_counter()
        result = simulate(records, config)
        wall = time.perf_counter() - t0
        report = summarize(result.outcomes.values(), result.makespan)
        if args.json:
            busy = {"busy_s": result.busy, "num_steps": result.num_steps}
            print(
                json.dumps({"policy": policy, "wall_s": round(wall, 3), **busy, **asdict(report)})
            )
        else:
            print(
                f"== {policy}: {result.num_steps} steps, busy "
                f"{result.busy / max(result.makespan, 1e-9):.0%} of the makespan, "
                f"{len(records) / wall:.0f} req/s wall"
            )
            print("\n".join("  " + line for line in report.lines()))
    return 0


def cmd_make_trace(args: argparse.Namespace) -> int:
    from tokenmill.sim.text2sql import generate
    from tokenmill.sim.trace import save_trace

    records = generate(args.rate, args.duration, seed=args.seed, chat_fraction=args.chat_fraction)
    save_trace(records, args.out)
    print(f"wrote {len(records)} records to {args.out}")
    return 0

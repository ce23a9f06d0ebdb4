"""tokenmill vs llama.cpp's server, same GGUF, same workload, one run.

Starts each server in turn (never both at once: on a small CPU they would fight for the cores),
drives it with `benchmarks/serving.py`'s load generator at the same load levels and the same
requests, stops it, then writes one JSON, one PNG with both latency-throughput curves, and a
table of the ratios.

    python benchmarks/serving_compare.py --llama-server PATH/TO/llama-server \\
        --concurrency 8 --num-prompts 32 --input-len 128 --output-len 128 --out results/vs_llama

`--llama-server` is a `llama-server` binary built from the llama.cpp source that the
llama-cpp-python sdist vendors (AVX-512 on, native off); it runs with `-np` slots (default 8),
`-t 2`. Extra flags for either server go through `--tokenmill-args` / `--llama-args`.
Prompts are token ids of the same GGUF vocabulary, so both servers see identical inputs;
`ignore_eos` makes the output lengths exact on both.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import serving

from tokenmill.loader.model_source import default_model_path


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with code {proc.returncode} during start-up")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"server at {url} not ready after {timeout:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def server_commands(args: argparse.Namespace, model: str) -> dict[str, list[str]]:
    cmds = {
        "tokenmill": [
            sys.executable, "-m", "tokenmill.cli", "serve", model,
            "--port", str(args.port), "--uvicorn-log-level", "warning",
            *shlex.split(args.tokenmill_args),
        ],
    }  # fmt: skip
    if args.llama_server:
        cmds["llama.cpp"] = [
            args.llama_server, "-m", model, "-np", str(args.llama_slots),
            "-c", str(args.llama_ctx), "-t", str(args.threads), "-tb", str(args.threads),
            "--host", "127.0.0.1", "--port", str(args.port), "--log-disable",
            *shlex.split(args.llama_args),
        ]  # fmt: skip
    return cmds


def bench_target(name: str, cmd: list[str], args: argparse.Namespace, specs) -> dict[str, Any]:
    url = f"http://127.0.0.1:{args.port}"
    print(f"\n#### {name}: {shlex.join(cmd)}", flush=True)
    log = open(Path(args.out).with_suffix(f".{name}.log"), "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(url, proc)
        targs = copy.copy(args)
        targs.base_url = f"{url}/v1"
        targs.model = serving.discover_model(targs)
        serving.warm_up(targs, specs, name)
        levels = serving.run_levels(targs, specs, name)
        return {"command": shlex.join(cmd), "levels": levels}
    finally:
        stop(proc)
        log.close()


def draw_targets(report: dict[str, Any], ax1: Any, ax2: Any) -> None:
    """TTFT and end-to-end latency against output throughput, one colour per server."""
    for (name, target), color in zip(report["targets"].items(), ("C0", "C1", "C2"), strict=False):
        levels = target["levels"]
        tput = [lv["summary"]["output_throughput"] for lv in levels]
        for stat, style in (("p50", "o-"), ("p99", "s--")):
            ttft = [lv["summary"]["ttft_ms"][stat] / 1000 for lv in levels]
            ax1.plot(tput, ttft, style, color=color, label=f"{name} TTFT {stat}")
            e2e = [lv["summary"]["e2e_ms"][stat] / 1000 for lv in levels]
            ax2.plot(tput, e2e, style, color=color, label=f"{name} e2e {stat}")
        for lv, x in zip(levels, tput, strict=True):
            ax2.annotate(lv["name"], (x, lv["summary"]["e2e_ms"]["p50"] / 1000), fontsize=7)
    for ax, what in ((ax1, "time to first token"), (ax2, "end-to-end latency")):
        ax.set_xlabel("output tokens/s (all clients)")
        ax.set_ylabel(f"{what} (s)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)


def print_table(report: dict[str, Any]) -> None:
    targets = report["targets"]
    print("\nlevel     target       out tok/s  TTFT mean  TTFT p99  TPOT mean   (ms)")
    for i, (level, _, _) in enumerate(report["plan"]):
        for name, t in targets.items():
            s = t["levels"][i]["summary"]
            print(f"{level:<9} {name:<12} {s['output_throughput']:9.1f} "
                  f"{s['ttft_ms']['mean']:10.0f} {s['ttft_ms']['p99']:9.0f} "
                  f"{s['tpot_ms']['mean']:10.1f}")  # fmt: skip
        if {"tokenmill", "llama.cpp"} <= targets.keys():
            ours = targets["tokenmill"]["levels"][i]["summary"]
            peer = targets["llama.cpp"]["levels"][i]["summary"]
            tput = ours["output_throughput"] / peer["output_throughput"]
            ttft_mean = ours["ttft_ms"]["mean"] / peer["ttft_ms"]["mean"]
            ttft_p99 = ours["ttft_ms"]["p99"] / peer["ttft_ms"]["p99"]
            print(f"{'':<9} ratio        {tput:8.2f}x {ttft_mean:9.2f}x {ttft_p99:8.2f}x")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="GGUF file (default: the default model)")
    p.add_argument("--llama-server", default=None, help="llama-server binary (else ours only)")
    p.add_argument("--llama-slots", type=int, default=8, help="llama-server -np")
    p.add_argument("--llama-ctx", type=int, default=8192, help="llama-server -c (all slots)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--llama-args", default="", help="extra llama-server flags")
    p.add_argument("--tokenmill-args", default="", help="extra `tokenmill serve` flags")
    p.add_argument("--port", type=int, default=8321)
    p.add_argument("--only", nargs="+", default=None, help="run only these targets")
    known, rest = p.parse_known_args(argv)
    # The workload flags are serving.py's own (--concurrency, --num-prompts, --input-len, ...).
    sargs = serving.parse_args(rest + ["--model", "m"])
    for k, v in vars(known).items():
        setattr(sargs, k, v)
    return sargs


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    model = args.model or str(default_model_path())
    specs = serving.make_workload(args)
    report: dict[str, Any] = {"plan": serving.load_plan(args), "model": model, "targets": {}}
    for name, cmd in server_commands(args, model).items():
        if args.only and name not in args.only:
            continue
        report["targets"][name] = bench_target(name, cmd, args, specs)
    print_table(report)
    report["config"] = {k: v for k, v in vars(args).items() if k != "model"}
    title = (f"{Path(model).name}: {args.num_prompts} requests, input ~{args.input_len}, "
             f"output ~{args.output_len} tokens")  # fmt: skip
    serving.write_report(report, Path(args.out), title, functools.partial(draw_targets, report))
    return report


if __name__ == "__main__":
    main()

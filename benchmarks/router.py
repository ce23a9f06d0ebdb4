"""Data-parallel replicas behind the router: cache-aware routing vs round-robin (and least-load)
on a shared-prefix workload.

4 system prompts of ~1,000 tokens x 32 questions each, sent as streaming chat requests in a
seeded random order (an interleaved order would let round-robin keep every system prompt on
one replica by accident) with `--concurrency` in flight. For each policy a fresh
`tokenmill serve --data-parallel-size N --router-policy P` starts (cold caches), then the
workload runs once. Reported per policy: mean / p95 time to
first token, mean end-to-end time, the replicas' own prefix-cache hit rate (their /metrics:
prompt tokens served from the cache / looked up), the share of prompt tokens reported cached in
`usage`, and the router's routing decisions. `--replicas 1` gives the one-replica baseline.

    python benchmarks/router.py [--replicas 2] [--policies cache_aware,round_robin]
        [--systems 4] [--system-tokens 1000] [--questions 32] [--max-tokens 16]
        [--concurrency 8] [--num-threads N] [--model PATH] [--serve-arg=--flag ...]
        [--router-option balance_abs_requests=4 ...]
        [--out benchmarks/results/router.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

import httpx
from common import WORDS, write_results  # noqa: I001  (benchmarks/ is run as a script folder)


def system_prompts(num: int, num_tokens: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = int(num_tokens * 0.75)  # ~1.3 tokens per English word with the default tokenizer
    return [
        f"You are assistant {i}. Follow these notes. " + " ".join(rng.choices(WORDS, k=words))
        for i in range(num)
    ]


def workload(args: argparse.Namespace) -> list[dict[str, Any]]:
    systems = system_prompts(args.systems, args.system_tokens)
    bodies = [
        {
            "messages": [
                {"role": "system", "content": s},
                {"role": "user", "content": f"Question {q}: name a {WORDS[q % len(WORDS)]}."},
            ],
            "max_tokens": args.max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        for q in range(args.questions)
        for s in systems
    ]
    random.Random(args.seed).shuffle(bodies)
    return bodies


async def send(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    start = time.perf_counter()
    ttft, usage = None, None
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return {"ok": False, "error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if ttft is None and any(
                (c.get("delta") or {}).get("content") for c in chunk.get("choices") or []
            ):
                ttft = time.perf_counter() - start
    return {"ok": True, "ttft": ttft, "e2e": time.perf_counter() - start, "usage": usage}


async def run_workload(url: str, bodies: list[dict[str, Any]], concurrency: int) -> list[dict]:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:

        async def one(body: dict[str, Any]) -> dict[str, Any]:
            async with sem:
                return await send(client, body)

        return await asyncio.gather(*(one(b) for b in bodies))


def scrape(url: str) -> list[tuple[str, dict[str, str], float]]:
    series = []
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, _, value = line.rpartition(" ")
        name, _, rest = key.partition("{")
        series.append((name, dict(re.findall(r'(\w+)="([^"]*)"', rest)), float(value)))
    return series


def total(series: list[tuple[str, dict[str, str], float]], name: str) -> float:
    return sum(v for n, _, v in series if n == name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(args: argparse.Namespace, policy: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [sys.executable, "-m", "tokenmill", "serve", *([args.model] if args.model else []),
           "--port", str(port), "--uvicorn-log-level", "warning", *args.serve_arg]  # fmt: skip
    if args.replicas > 1:  # else one plain server, no router in front
        cmd += ["--data-parallel-size", str(args.replicas), "--router-policy", policy]
        for option in args.router_option:
            cmd += ["--router-option", option]
    if args.num_threads:
        cmd += ["--num-threads", str(args.num_threads)]
    env = dict(os.environ, TQDM_DISABLE="1")
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.startup_timeout
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}: {' '.join(cmd)}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"the server did not come up in {args.startup_timeout} s")
        time.sleep(0.5)


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]


def run_policy(args: argparse.Namespace, policy: str) -> dict[str, Any]:
    proc, url = start_server(args, policy)
    try:
        front = scrape(url)
        workers = sorted({lab["worker"] for n, lab, _ in front if "worker" in lab}) or [url]
        t0 = time.perf_counter()
        results = asyncio.run(run_workload(url, workload(args), args.concurrency))
        wall = time.perf_counter() - t0
        replica = [scrape(w) for w in workers]
        router = scrape(url) if args.replicas > 1 else []
    finally:
        stop_server(proc)
    ok = [r for r in results if r["ok"] and r["ttft"] is not None]
    errors = [r["error"] for r in results if not r["ok"]][:3]
    hits = sum(total(s, "tokenmill_prefix_cache_hits_total") for s in replica)
    queries = sum(total(s, "tokenmill_prefix_cache_queries_total") for s in replica)
    prompt = sum(r["usage"]["prompt_tokens"] for r in ok if r["usage"])
    cached = sum(
        r["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0)
        for r in ok
        if r["usage"]
    )
    ttfts = [r["ttft"] for r in ok]
    decisions = {
        lab["reason"]: v for n, lab, v in router if n == "tokenmill_router_routing_decisions_total"
    }
    return {
        "policy": policy if args.replicas > 1 else "one_replica",
        "requests": len(results),
        "ok": len(ok),
        "errors": errors,
        "wall_s": wall,
        "ttft_mean_ms": 1000 * statistics.fmean(ttfts) if ttfts else None,
        "ttft_p95_ms": 1000 * _p95(ttfts) if ttfts else None,
        "e2e_mean_ms": 1000 * statistics.fmean(r["e2e"] for r in ok) if ok else None,
        "replica_prefix_hit_rate": hits / queries if queries else None,
        "usage_cached_share": cached / prompt if prompt else None,
        "mean_prompt_tokens": prompt / len(ok) if ok else None,
        "routing_decisions": decisions,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--policies", default="cache_aware,round_robin")
    p.add_argument("--systems", type=int, default=4)
    p.add_argument("--system-tokens", type=int, default=1000)
    p.add_argument("--questions", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="of the request order")
    p.add_argument("--num-threads", type=int, default=None, help="shared by all replicas")
    p.add_argument("--model", default=None, help="default: tokenmill's default model")
    p.add_argument("--serve-arg", action="append", default=[], help="extra `serve` flag")
    p.add_argument(
        "--router-option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a router option for the front end, e.g. balance_abs_requests=4 (repeatable)",
    )
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--out", default=None, help="results JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    rows = [run_policy(args, policy) for policy in args.policies.split(",")]
    for r in rows:
        print(
            f"{r['policy']:>12}: {r['ok']}/{r['requests']} ok, TTFT mean "
            f"{r['ttft_mean_ms']:.0f} ms p95 {r['ttft_p95_ms']:.0f} ms, e2e mean "
            f"{r['e2e_mean_ms']:.0f} ms, replica prefix hit rate "
            f"{r['replica_prefix_hit_rate']:.3f}, "
            f"usage cached {r['usage_cached_share']:.3f}, wall {r['wall_s']:.1f} s, "
            f"decisions {r['routing_decisions']}"
        )
    results = {"policies": rows}
    if args.out:
        write_results(args, results)
    return results


if __name__ == "__main__":
    main()

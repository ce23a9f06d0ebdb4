"""Serving benchmark: a load generator for any OpenAI-compatible server (tokenmill, vLLM, ...).

Sends streaming requests at Poisson arrival rates (`--request-rates 1 2 4 inf`) or with a fixed
number of concurrent clients (`--concurrency 1 4 16`), one load level after another, and reports
per level: throughput (req/s, output tok/s), TTFT, TPOT, ITL and end-to-end latency (mean, p50,
p99), and DeepSpeed-FastGen's effective throughput under an SLA. Writes a JSON file and a PNG
with the latency-throughput curve and the effective throughput.

    tokenmill serve &            # or any OpenAI-compatible server
    python benchmarks/serving.py --base-url http://127.0.0.1:8000/v1 --num-prompts 64 \\
        --input-len 256 --output-len 64 --concurrency 1 2 4 8 16 --out results/serving

Prompts are token ids by default (`/v1/completions` accepts them), so input lengths are exact
without a tokenizer; `--prompt-kind text` sends English words (about one token each) and is what
`--endpoint chat` uses. Output lengths are exact when the server honours `ignore_eos` (tokenmill
and vLLM do); the token counts come from the stream's final usage chunk.

Definitions. TTFT: request sent -> first chunk with content. ITL: time between content chunks.
TPOT: (e2e - TTFT) / (output tokens - 1). Effective throughput (DeepSpeed-FastGen): requests per
second that meet both SLAs: TTFT <= prompt tokens / `--sla-prompt-tps` (default 512 tok/s), and
the generation rate, an exponential moving average of 1 / ITL (span `--sla-ema-span`), never below
`--sla-gen-tps` (default 4 tok/s, a reading speed).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the tests load this file by path
from common import host_info  # noqa: E402

_WORDS = (
    "the river mountain city ancient library engine quiet storm garden light winter market "
    "journey forest silver promise window letter bridge harbor village music theory question "
    "answer history science ocean shadow morning evening candle stone story dream machine"
)
WORDS = _WORDS.split()


@dataclass
class RequestSpec:
    prompt: list[int] | str
    prompt_len: int
    max_tokens: int


@dataclass
class RequestResult:
    ok: bool
    prompt_len: int
    output_len: int = 0
    ttft: float = math.nan
    e2e: float = math.nan
    itls: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def tpot(self) -> float:
        if self.output_len < 2:
            return math.nan
        return (self.e2e - self.ttft) / (self.output_len - 1)


# -- workload ------------------------------------------------------------------------------------


def sample_lengths(
    rng: np.random.Generator, n: int, mean: int, dist: str, spread: float, cap: int
) -> list[int]:
    """Lengths: `fixed`, `uniform` in mean * (1 +- spread) or `normal` (std spread * mean)."""
    if dist == "fixed":
        values = np.full(n, mean, dtype=float)
    elif dist == "uniform":
        values = rng.uniform(mean * (1 - spread), mean * (1 + spread), n)
    elif dist == "normal":
        values = rng.normal(mean, spread * mean, n)
    else:
        raise ValueError(f"unknown length distribution {dist!r}")
    return [int(min(max(round(v), 1), cap)) for v in values]


def make_workload(args: argparse.Namespace) -> list[RequestSpec]:
    rng = np.random.default_rng(args.seed)
    n = args.num_prompts
    in_lens = sample_lengths(rng, n, args.input_len, args.input_dist, args.spread, args.max_input)
    out_lens = sample_lengths(rng, n, args.output_len, args.output_dist, args.spread, 1 << 20)
    lo, hi = args.token_id_range
    specs = []
    for i, (p, o) in enumerate(zip(in_lens, out_lens, strict=True)):
        if args.prompt_kind == "ids":
            prompt: list[int] | str = rng.integers(lo, hi, p).tolist()
        else:
            words = [f"Request {i}:"] + [WORDS[j] for j in rng.integers(0, len(WORDS), p)]
            prompt = " ".join(words)
        specs.append(RequestSpec(prompt, p, o))
    return specs


# -- one request ---------------------------------------------------------------------------------


def request_body(args: argparse.Namespace, spec: RequestSpec) -> tuple[str, dict[str, Any]]:
    body: dict[str, Any] = {
        "model": args.model,
        "max_tokens": spec.max_tokens,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.ignore_eos:
        body["ignore_eos"] = True
    if args.endpoint == "chat":
        prompt = spec.prompt if isinstance(spec.prompt, str) else " ".join(map(str, spec.prompt))
        body["messages"] = [{"role": "user", "content": prompt}]
        return "/chat/completions", body
    body["prompt"] = spec.prompt
    return "/completions", body


def _content(chunk: dict[str, Any]) -> str:
    text = ""
    for choice in chunk.get("choices") or []:
        if "text" in choice:
            text += choice["text"] or ""
        else:
            text += (choice.get("delta") or {}).get("content") or ""
    return text


async def send(client: httpx.AsyncClient, args: argparse.Namespace, spec: RequestSpec):
    path, body = request_body(args, spec)
    result = RequestResult(ok=False, prompt_len=spec.prompt_len)
    num_chunks = 0
    start = time.perf_counter()
    last = start
    try:
        async with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                result.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if chunk.get("usage"):
                    result.output_len = chunk["usage"]["completion_tokens"]
                    result.prompt_len = chunk["usage"]["prompt_tokens"]
                if _content(chunk):
                    if num_chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itls.append(now - last)
                    num_chunks += 1
                    last = now
        result.e2e = time.perf_counter() - start
        result.output_len = result.output_len or num_chunks
        result.ok = num_chunks > 0
        if not result.ok:
            result.error = "no content received"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        result.error = f"{type(e).__name__}: {e}"
    return result


# -- one load level ------------------------------------------------------------------------------


async def run_level(
    args: argparse.Namespace, specs: list[RequestSpec], rate: float | None, concurrency: int | None
) -> tuple[list[RequestResult], float]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = httpx.Timeout(args.timeout)
    async with httpx.AsyncClient(
        base_url=args.base_url, headers=headers, limits=limits, timeout=timeout
    ) as client:
        start = time.perf_counter()
        if concurrency is not None:
            queue = list(reversed(specs))
            results: list[RequestResult] = []

            async def worker() -> None:
                while queue:
                    results.append(await send(client, args, queue.pop()))

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        else:
            rng = random.Random(args.seed)
            tasks = []
            for spec in specs:
                tasks.append(asyncio.create_task(send(client, args, spec)))
                if rate is not None and math.isfinite(rate):
                    await asyncio.sleep(rng.expovariate(rate))  # Poisson arrivals
            results = list(await asyncio.gather(*tasks))
        return results, time.perf_counter() - start


def load_plan(args: argparse.Namespace) -> list[tuple[str, float | None, int | None]]:
    """(name, request rate, concurrency) of each load level, in order."""
    if args.concurrency is not None:
        return [(f"c={c}", None, c) for c in args.concurrency]
    return [(f"rate={r:g}", r, None) for r in args.request_rates]


WARM_UP_LEVEL = 10_000  # seeds the warm-up's prompt apart from every level's


def level_workload(args: argparse.Namespace, level: int) -> list[RequestSpec]:
    """The requests of load level `level` (0 = `make_workload(args)`): fresh prompts for each
    level, so no level reuses what an earlier one left in a server's prefix or prompt cache;
    the same for every server given the same arguments."""
    return make_workload(argparse.Namespace(**{**vars(args), "seed": args.seed + level}))


def warm_up(args: argparse.Namespace, specs: list[RequestSpec], label: str = "") -> None:
    warm_spec = level_workload(args, WARM_UP_LEVEL)[0]
    warm = RequestSpec(warm_spec.prompt, warm_spec.prompt_len, 4)
    res, _ = asyncio.run(run_level(args, [warm], None, 1))
    if not res[0].ok:
        prefix = f"{label}: " if label else ""
        raise SystemExit(f"{prefix}warm-up request failed: {res[0].error}")


def run_levels(
    args: argparse.Namespace, specs: list[RequestSpec], label: str = ""
) -> list[dict[str, Any]]:
    """Every load level of `load_plan` in turn; prints each level's summary as it ends."""
    levels = []
    for i, (name, rate, conc) in enumerate(load_plan(args)):
        level_specs = specs if i == 0 else level_workload(args, i)
        results, duration = asyncio.run(run_level(args, level_specs, rate, conc))
        summary = summarize(results, duration, args)
        print_level(f"{label} {name}" if label else name, summary)
        levels.append({"name": name, "request_rate": rate, "concurrency": conc,
                       "summary": summary})  # fmt: skip
    return levels


def meets_sla(r: RequestResult, args: argparse.Namespace) -> bool:
    if not r.ok or r.ttft > r.prompt_len / args.sla_prompt_tps:
        return False
    alpha = 2.0 / (args.sla_ema_span + 1)
    ema = None
    for itl in r.itls:
        ema = itl if ema is None else alpha * itl + (1 - alpha) * ema
        if ema > 0 and 1.0 / ema < args.sla_gen_tps:
            return False
    return True


def _stats(values: list[float], scale: float = 1000.0) -> dict[str, float]:
    vals = np.array([v for v in values if not math.isnan(v)], dtype=float) * scale
    if vals.size == 0:
        return {"mean": math.nan, "p50": math.nan, "p99": math.nan}
    return {
        "mean": float(vals.mean()),
        "p50": float(np.percentile(vals, 50)),
        "p99": float(np.percentile(vals, 99)),
    }


def summarize(
    results: list[RequestResult], duration: float, args: argparse.Namespace
) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    num_out = sum(r.output_len for r in ok)
    num_in = sum(r.prompt_len for r in ok)
    num_sla = sum(meets_sla(r, args) for r in ok)
    return {
        "num_requests": len(results),
        "num_completed": len(ok),
        "num_failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_throughput": num_out / duration,
        "input_throughput": num_in / duration,
        "total_input_tokens": num_in,
        "total_output_tokens": num_out,
        "ttft_ms": _stats([r.ttft for r in ok]),
        "tpot_ms": _stats([r.tpot for r in ok]),
        "itl_ms": _stats([x for r in ok for x in r.itls]),
        "e2e_ms": _stats([r.e2e for r in ok]),
        "sla_fraction": num_sla / len(results) if results else 0.0,
        "effective_throughput": num_sla / duration,
    }


# -- output --------------------------------------------------------------------------------------


def print_level(name: str, s: dict[str, Any]) -> None:
    def fmt(d: dict[str, float]) -> str:
        return f"{d['mean']:8.1f} {d['p50']:8.1f} {d['p99']:8.1f}"

    print(f"\n== {name}: {s['num_completed']}/{s['num_requests']} ok in {s['duration_s']:.1f}s")
    print(f"  throughput   {s['request_throughput']:.2f} req/s, {s['output_throughput']:.1f} "
          f"output tok/s, {s['input_throughput']:.1f} input tok/s")  # fmt: skip
    print("  (ms)             mean      p50      p99")
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        print(f"  {key[:-3].upper():<10} {fmt(s[key])}")
    print(f"  effective throughput {s['effective_throughput']:.2f} req/s "
          f"({100 * s['sla_fraction']:.0f}% of requests meet the SLA)")  # fmt: skip
    for err in s["errors"]:
        print(f"  error: {err}")


def draw_levels(levels: list[dict[str, Any]], ax1: Any, ax2: Any) -> None:
    """Latency against throughput, and effective throughput per load level."""
    thr = [lv["summary"]["request_throughput"] for lv in levels]
    for key, label in (("e2e_ms", "e2e latency"), ("ttft_ms", "TTFT")):
        for stat, style in (("p50", "o-"), ("p99", "s--")):
            lat = [lv["summary"][key][stat] / 1000 for lv in levels]
            ax1.plot(thr, lat, style, label=f"{label} {stat}")
    for lv, x in zip(levels, thr, strict=True):
        ax1.annotate(lv["name"], (x, lv["summary"]["e2e_ms"]["p50"] / 1000), fontsize=7)
    ax1.set_xlabel("throughput (requests/s)")
    ax1.set_ylabel("latency (s)")
    ax1.set_title("latency vs throughput")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    names = [lv["name"] for lv in levels]
    ax2.bar(names, [lv["summary"]["effective_throughput"] for lv in levels], label="effective")
    ax2.plot(names, thr, "k.-", label="all requests")
    ax2.set_xlabel("load level")
    ax2.set_ylabel("requests/s")
    ax2.set_title("effective throughput (SLA met)")
    ax2.legend(fontsize=8)
    ax2.tick_params(axis="x", labelrotation=45, labelsize=8)


def save_plot(path: Path, title: str, draw: Callable[[Any, Any], None]) -> None:
    """A PNG of two side-by-side panels; `draw(ax1, ax2)` fills them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    draw(ax1, ax2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(
    report: dict[str, Any], out: Path, title: str, draw: Callable[[Any, Any], None]
) -> None:
    """OUT.json (NaN written as null) and OUT.png."""
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out.with_suffix(".json"), out.with_suffix(".png")
    report = {**report, "host": host_info()}  # the client's machine (the server's if local)
    json_path.write_text(json.dumps(_json_safe(report), indent=2, default=str))
    save_plot(png_path, title, draw)
    print(f"\nwrote {json_path} and {png_path}")


def _json_safe(obj: Any) -> Any:
    """NaN (a statistic with no samples) is not JSON: write null."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def discover_model(args: argparse.Namespace) -> str:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    r = httpx.get(f"{args.base_url}/models", headers=headers, timeout=30)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="OpenAI-compatible URL")
    p.add_argument("--model", default=None, help="model name (default: the first of /models)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--request-rates", type=float, nargs="+", metavar="RPS",
                      help="Poisson arrival rates, req/s ('inf': all at once)")  # fmt: skip
    load.add_argument("--concurrency", type=int, nargs="+", metavar="N",
                      help="fixed numbers of concurrent clients (default: 1 2 4 8)")  # fmt: skip
    p.add_argument("--num-prompts", type=int, default=32, help="requests per load level")
    p.add_argument("--input-len", type=int, default=128, help="mean prompt tokens")
    p.add_argument("--output-len", type=int, default=64, help="mean output tokens")
    p.add_argument("--input-dist", choices=("fixed", "uniform", "normal"), default="normal")
    p.add_argument("--output-dist", choices=("fixed", "uniform", "normal"), default="normal")
    p.add_argument("--spread", type=float, default=0.3, help="relative spread of the lengths")
    p.add_argument("--max-input", type=int, default=4096, help="cap on prompt tokens")
    p.add_argument("--prompt-kind", choices=("ids", "text"), default=None,
                   help="token ids (exact lengths) or words (chat: text)")  # fmt: skip
    p.add_argument("--token-id-range", type=int, nargs=2, default=(1000, 20000))
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--sla-prompt-tps", type=float, default=512.0,
                   help="SLA: TTFT <= prompt tokens / this")  # fmt: skip
    p.add_argument("--sla-gen-tps", type=float, default=4.0,
                   help="SLA: EMA generation rate >= this (tok/s)")  # fmt: skip
    p.add_argument("--sla-ema-span", type=int, default=16)
    p.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--out", default="serving_bench", help="output prefix: OUT.json and OUT.png")
    args = p.parse_args(argv)
    if args.prompt_kind is None:
        args.prompt_kind = "text" if args.endpoint == "chat" else "ids"
    if args.request_rates is None and args.concurrency is None:
        args.concurrency = [1, 2, 4, 8]
    args.base_url = args.base_url.rstrip("/")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.model = args.model or discover_model(args)
    specs = make_workload(args)
    if not args.no_warmup:
        warm_up(args, specs)
    levels = run_levels(args, specs)
    report = {"config": dict(vars(args)), "levels": levels}
    report["config"]["token_id_range"] = list(args.token_id_range)
    title = (f"{args.model} via {args.base_url}: {args.endpoint}, input ~{args.input_len}, "
             f"output ~{args.output_len} tokens")  # fmt: skip
    write_report(report, Path(args.out), title, functools.partial(draw_levels, levels))
    return report


if __name__ == "__main__":
    main()

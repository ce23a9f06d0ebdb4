"""Chat latency with tools, against a running OpenAI-compatible server: no tools, tool_choice
auto (free text, parsed), required and a named function (grammar-forced), greedy.

    tokenmill serve &   # or any OpenAI-compatible server
    python benchmarks/tool_calls.py --base-url http://127.0.0.1:8000/v1 --repeats 4

Each mode's first request includes compiling its grammar (forced modes); the median of the
others is the warm latency. Prints one line per mode and writes JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import httpx

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 12},
                    "unit": {"enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
            },
        },
    },
]
MODES: dict[str, dict[str, Any]] = {
    "no tools": {},
    "auto": {"tools": TOOLS},
    "required": {"tools": TOOLS, "tool_choice": "required"},
    "named": {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "add"}}},
}


def run(base_url: str, repeats: int, max_tokens: int) -> dict[str, Any]:
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    model = httpx.get(f"{base_url}/models", timeout=30).json()["data"][0]["id"]
    results: dict[str, Any] = {}
    with httpx.Client(timeout=600) as client:
        for name, extra in MODES.items():
            times, body = [], {}
            for _ in range(repeats):
                req = {"model": model, "messages": messages, "max_tokens": max_tokens,
                       "temperature": 0, **extra}  # fmt: skip
                t = time.perf_counter()
                r = client.post(f"{base_url}/chat/completions", json=req)
                times.append(time.perf_counter() - t)
                r.raise_for_status()
                body = r.json()
            choice = body["choices"][0]
            results[name] = {
                "first_ms": times[0] * 1000,
                "warm_median_ms": statistics.median(times[1:] or times) * 1000,
                "prompt_tokens": body["usage"]["prompt_tokens"],
                "completion_tokens": body["usage"]["completion_tokens"],
                "finish_reason": choice["finish_reason"],
                "tool_calls": choice["message"].get("tool_calls"),
            }
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=40)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    results = run(args.base_url, args.repeats, args.max_tokens)
    for name, r in results.items():
        calls = [(c["function"]["name"], c["function"]["arguments"]) for c in r["tool_calls"] or []]
        print(
            f"{name:9s} first {r['first_ms']:6.0f} ms  warm {r['warm_median_ms']:6.0f} ms  "
            f"prompt {r['prompt_tokens']:4d}  completion {r['completion_tokens']:3d}  "
            f"{r['finish_reason']:10s} {calls}"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

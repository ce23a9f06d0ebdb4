"""The structured-output benchmark's requests against llama.cpp's `llama-server` (same GGUF).

`benchmarks/structured.py --llama-bin DIR` starts `DIR/llama-server -np 8 -c 8192 -t 2 -tb 2`
on the default model, sends the same chat requests at batch 1 (one at a time) and batch 16 (16
concurrent clients; llama-server's 8 slots take 8 at once), "json" with the schema in
llama-server's `json_schema` request field (its own GBNF conversion) and "free" with none and
`ignore_eos`, greedy, the same max_tokens; best of --repeats. Output tokens come from the
response's usage. tokenmill's figures in the same run are offline (`LLM.chat`, no HTTP): the
HTTP layer costs llama-server a little per request that the offline runs do not pay.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from serving_compare import stop, wait_ready

LLAMA_FLAGS = ["-np", "8", "-c", "8192", "-t", "2", "-tb", "2"]


def llama_command(bin_dir: str, model: str, port: int) -> list[str]:
    server = Path(bin_dir) / "llama-server"
    if not server.is_file():
        raise SystemExit(f"no llama-server in {bin_dir}")
    return [str(server), "-m", model, *LLAMA_FLAGS, "--host", "127.0.0.1", "--port", str(port)]


def _one(client: httpx.Client, url: str, body: dict[str, Any]) -> int:
    r = client.post(f"{url}/v1/chat/completions", json=body, timeout=600)
    r.raise_for_status()
    return int(r.json()["usage"]["completion_tokens"])


def _run(url: str, bodies: list[dict[str, Any]], batch: int) -> tuple[float, int]:
    """(seconds, output tokens) for `bodies`, `batch` in flight at a time."""
    t0 = time.perf_counter()
    with httpx.Client() as client, ThreadPoolExecutor(batch) as pool:
        tokens = sum(pool.map(lambda b: _one(client, url, b), bodies))
    return time.perf_counter() - t0, tokens


def bench_llama(
    args: argparse.Namespace,
    model: str,
    schema: dict[str, Any],
    messages: Any,
    log_path: Path,
) -> list[dict[str, Any]]:
    """Rows like bench_decode's (mode "free" or "json", target "llama.cpp")."""
    import subprocess

    url = f"http://127.0.0.1:{args.llama_port}"
    cmd = llama_command(args.llama_bin, model, args.llama_port)
    print("####", " ".join(cmd), flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_ready(url, proc)
            return _bench(args, url, schema, messages)
        finally:
            stop(proc)


def _bench(
    args: argparse.Namespace, url: str, schema: dict[str, Any], messages: Any
) -> list[dict[str, Any]]:
    def body(i: int, mode: str) -> dict[str, Any]:
        b: dict[str, Any] = {
            "messages": messages(i),
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "cache_prompt": False,  # as the offline runs: every prompt computed
        }
        if mode == "json":
            b["json_schema"] = schema
        else:
            b["ignore_eos"] = True
        return b

    _run(url, [body(i, "json") for i in range(16)], 16)  # warm-up
    rows = []
    for batch, num in ((1, args.num_single), (16, 16)):
        best: dict[str, tuple[float, int]] = {}
        for _ in range(args.repeats):
            for mode in ("free", "json"):
                secs, toks = _run(url, [body(i, mode) for i in range(num)], batch)
                if mode not in best or toks / secs > best[mode][1] / best[mode][0]:
                    best[mode] = (secs, toks)
        for mode, (secs, toks) in best.items():
            row = {"target": "llama.cpp", "batch": batch, "mode": mode, "requests": num}
            row.update(seconds=secs, output_tokens=toks, tok_s=toks / secs)
            row.update(tokens_per_request=toks / num)
            rows.append(row)
            print(row, flush=True)
    return rows

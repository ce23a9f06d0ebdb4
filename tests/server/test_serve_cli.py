"""`tokenmill serve` in a subprocess: the default model when MODEL is omitted, server flags."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tokenmill.cli import build_parser


def test_serve_flags_parse() -> None:
    args = build_parser().parse_args(
        ["serve", "smollm2", "--port", "9000", "--api-key", "k", "--max-num-seqs", "4",
         "--max-queue", "8", "--cors-origins", "http://a", "--cors-origins", "http://b"]
    )  # fmt: skip
    assert args.model_arg == "smollm2"
    assert args.port == 9000 and args.api_key == "k" and args.max_num_seqs == 4
    assert args.max_queue == 8 and args.cors_origins == ["http://a", "http://b"]
    assert build_parser().parse_args(["serve"]).model_arg is None


@pytest.mark.slow
def test_serve_subprocess() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    cmd = [sys.executable, "-m", "tokenmill", "serve", "--port", str(port), "--api-key", "k",
           "--dtype", "float32", "--kv-cache-memory-gb", "0.5"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up in 120 s"
            time.sleep(0.25)
        headers = {"Authorization": "Bearer k"}
        models = httpx.get(f"{url}/v1/models", headers=headers).json()["data"]
        assert models[0]["id"] == "SmolLM2-135M-Instruct"
        r = httpx.post(
            f"{url}/v1/completions",
            json={"model": models[0]["id"], "prompt": "Hi", "max_tokens": 2},
            headers=headers,
            timeout=60,
        )
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] <= 2
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, proc.stdout.read().decode()

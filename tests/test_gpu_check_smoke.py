"""benchmarks/gpu_check.py, the prepared GPU check, run on the CPU: `--smoke` takes the same code
paths with tiny shapes (no CUDA graphs, bandwidth by wall clock, Triton under its interpreter),
so the one run on a lent GPU does not fail on a typo. Plus the section runner's bookkeeping:
an error, a skip and a timeout are recorded and the next section still runs."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
SECTIONS = [
    "build_models", "eager_vs_graph", "bandwidth", "decode_batch1", "throughput",
    "logits_parity", "greedy_agreement", "triton_attention", "pytest_gpu", "quant_matmul",
    "attention_bench",
]  # fmt: skip
# Need triton (or another engineer's file): "missing" is an allowed outcome for these.
OPTIONAL = {"triton_attention", "quant_matmul", "attention_bench"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    # A budget no section should reach on a slow machine: skips here would hide code paths.
    cmd = [sys.executable, str(SCRIPT), "--smoke", "--budget-s", "200", "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "throughput" in r.stdout  # the summary table
    return json.loads(out.read_text())


@pytest.mark.slow
def test_smoke_runs_every_section_without_errors(smoke: dict) -> None:
    meta = smoke["meta"]
    for key in ("card", "torch", "triton", "transformers", "git_commit", "smoke"):
        assert key in meta
    assert meta["smoke"] is True
    secs = smoke["sections"]
    assert list(secs) == SECTIONS
    for name, s in secs.items():
        allowed = {"ok", "missing"} if name in OPTIONAL else {"ok"}
        assert s["status"] in allowed, f"{name}: {s['status']}\n{s.get('error', s)}"
    assert [row["section"] for row in smoke["summary"]] == SECTIONS


@pytest.mark.slow
def test_smoke_results(smoke: dict) -> None:
    res = {name: s["result"] for name, s in smoke["sections"].items()}
    assert res["build_models"]["tiny-llama"]["params"] > 0
    g = res["eager_vs_graph"]
    assert g["identical"] and g["num_fully_agree"] == g["num_prompts"]
    assert g["graphs_active"] is False  # CPU: no CUDA graphs, and the result says so
    assert res["bandwidth"]["copy_GBps"] > 0 and res["bandwidth"]["roofline_tok_s"] > 0
    for mode in ("tokenmill_graph", "tokenmill_eager", "transformers"):
        assert res["decode_batch1"][mode]["decode_tok_s"] > 0
    thr = res["throughput"]
    assert thr["tokenmill"]["output_tokens"] == thr["tokenmill"]["requested_output_tokens"]
    assert thr["transformers"]["useful_output_tokens"] <= thr["transformers"]["generated_tokens"]
    assert thr["ratio_output_tok_s"] > 0
    for shape in ("tiny-llama", "tiny-qwen2"):
        for dtype in ("float32", "bfloat16"):
            assert res["logits_parity"][f"{shape}/{dtype}"]["pass"]
        fp32 = res["greedy_agreement"][f"{shape}/float32"]
        assert fp32["num_fully_agree"] == fp32["num_prompts"]
    if smoke["sections"]["triton_attention"]["status"] == "ok":
        assert all(r["pass"] for r in res["triton_attention"].values() if isinstance(r, dict))
    assert res["pytest_gpu"]["returncode"] in (0, 5) and "failed" not in res["pytest_gpu"]


def _load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_section_errors_skips_and_timeouts_are_recorded(tmp_path: Path) -> None:
    gc = _load_gpu_check()
    out = tmp_path / "check.json"
    args = argparse.Namespace(smoke=True, budget_s=60.0, out=str(out))
    c = gc.Check(args)
    c.p = dict(c.p, min_s={"late": 10_000}, max_s={"slow": 0.3})
    old = gc.signal.signal(gc.signal.SIGALRM, gc._on_alarm)
    try:
        c.section("boom", lambda c, r: 1 / 0)
        assert json.loads(out.read_text())["sections"]["boom"]["status"] == "error"
        c.section("fine", lambda c, r: r.update(headline="done"))
        c.section("late", lambda c, r: None)
        t = time.monotonic()
        c.section("slow", lambda c, r: time.sleep(10))
        assert time.monotonic() - t < 5
    finally:
        gc.signal.signal(gc.signal.SIGALRM, old)
        shutil.rmtree(c.tmp, ignore_errors=True)
    secs = json.loads(out.read_text())["sections"]
    assert secs["boom"]["status"] == "error" and "ZeroDivisionError" in secs["boom"]["error"]
    assert secs["fine"]["status"] == "ok" and secs["fine"]["result"]["headline"] == "done"
    assert secs["late"]["status"] == "skipped" and "needs" in secs["late"]["reason"]
    assert secs["slow"]["status"] == "timeout"

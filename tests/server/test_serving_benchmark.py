"""benchmarks/serving.py against a live server: a tiny sweep writes its JSON and PNG."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from server_utils import Server

pytestmark = pytest.mark.slow  # a benchmark sweep against a server over the default model

ROOT = Path(__file__).resolve().parents[2]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("serving_bench", ROOT / "benchmarks/serving.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_serving_benchmark_sweep(server: Server, tmp_path: Path) -> None:
    bench = load_benchmark()
    out = tmp_path / "bench"
    common = ["--base-url", server.base_url, "--num-prompts", "4", "--input-len", "24",
              "--output-len", "4", "--output-dist", "fixed", "--out", str(out)]  # fmt: skip
    report = bench.main([*common, "--concurrency", "1", "4"])
    assert [lv["name"] for lv in report["levels"]] == ["c=1", "c=4"]
    for lv in report["levels"]:
        s = lv["summary"]
        assert s["num_completed"] == 4 and s["num_failed"] == 0
        assert s["total_output_tokens"] == 16  # ignore_eos: exact output lengths
        assert s["request_throughput"] > 0 and s["output_throughput"] > 0
        assert s["ttft_ms"]["p50"] > 0 and s["itl_ms"]["p99"] >= s["itl_ms"]["p50"]
        assert 0 <= s["effective_throughput"] <= s["request_throughput"]
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["levels"][1]["summary"]["total_output_tokens"] == 16
    assert out.with_suffix(".png").stat().st_size > 1000
    chat = bench.main([*common, "--endpoint", "chat", "--request-rates", "inf", "--no-warmup"])
    assert chat["levels"][0]["summary"]["num_completed"] == 4
    server.wait_idle()

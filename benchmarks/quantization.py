"""Weight formats side by side on the default model: single-stream decode and 16-request
throughput for fp32, bf16 (dense), the GGUF's own Q4_1 blocks (the default), int8 and int4,
next to llama.cpp's llama-bench on the same GGUF, in one run.

    python benchmarks/quantization.py [--llama-bench ../peers/build-llama/bin/llama-bench]

Single stream: one 128-token prompt, then `--decode-len` tokens, ignore_eos; the rate counts
tokens after the first. Throughput: `--batch` requests of 128-token prompts and 128 output
tokens submitted together. llama-bench's tg figure is its single-stream decode rate. All engines
are loaded at once and every round measures each format and llama-bench in turn; the best of
`--repeats` rounds counts (the host's speed drifts by tens of percent over minutes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time

from common import make_prompts, write_results  # noqa: I001  (benchmarks/ is run as a script folder)

from tokenmill import LLM, SamplingParams
from tokenmill.loader.model_source import default_model_path

FORMATS = {  # name -> LLM kwargs
    "fp32": dict(dtype="float32", quantization="none"),
    "bf16": dict(dtype="bfloat16", quantization="none"),
    "Q4_1 (GGUF, default)": dict(dtype="bfloat16"),
    "int8": dict(dtype="bfloat16", quantization="int8"),
    "int4": dict(dtype="bfloat16", quantization="int4"),
}


class Format:
    """One weight format's engine, loaded once; measured a round at a time."""

    def __init__(self, kwargs: dict, prompts: list[list[int]], args) -> None:
        self.llm = LLM(**kwargs, max_model_len=1024, kv_cache_memory_gb=0.5)
        self.prompts = prompts
        self.args = args
        model = self.llm.engine.runner.model
        self.weight_mib = sum(getattr(m, "weight_bytes", 0) for m in model.modules()) / 2**20
        warm = SamplingParams(max_tokens=8, ignore_eos=True)
        self.llm.generate([{"prompt_token_ids": prompts[0]}], warm, use_tqdm=False)
        self.single: list[float] = []
        self.batch: list[float] = []

    def _generate(self, prompts: list[list[int]], params: SamplingParams) -> float:
        self.llm.engine.scheduler.kv_cache_manager.reset_prefix_cache()
        t = time.perf_counter()
        self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return time.perf_counter() - t

    def run_single(self) -> None:
        """Decode steps alone are timed: from the first token (the prefill's) to the last."""
        engine = self.llm.engine
        engine.scheduler.kv_cache_manager.reset_prefix_cache()
        n = self.args.decode_len
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        engine.add_request(self.prompts[0], params)
        while not any(out.outputs[0].token_ids for out in engine.step()):
            pass
        t = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        self.single.append((n - 1) / (time.perf_counter() - t))

    def run_batch(self) -> None:
        params = SamplingParams(max_tokens=self.args.output_len, temperature=0.0, ignore_eos=True)
        batch = self.prompts[: self.args.batch]
        self.batch.append(len(batch) * self.args.output_len / self._generate(batch, params))

    def result(self) -> dict:
        return {
            "linear_weight_mib": self.weight_mib,
            "single_stream_tok_s": max(self.single),
            "single_stream_runs": self.single,
            f"batch{self.args.batch}_tok_s": max(self.batch),
            f"batch{self.args.batch}_runs": self.batch,
        }


def llama_bench_once(path: str, args) -> tuple[str, float]:
    cmd = [path, "-m", str(default_model_path()), "-t", str(args.threads), "-p", "0",
           "-n", str(args.decode_len), "-r", "1", "-o", "json"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rows = json.loads(out[out.index("[") :])
    return " ".join(cmd), next(r for r in rows if r.get("n_gen"))["avg_ts"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-bench", default=None, help="llama-bench binary (llama.cpp)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    ap.add_argument("--out", default="benchmarks/results/quantization.json")
    args = ap.parse_args()

    from tokenmill.engine.tokenizer import Tokenizer

    prompts = make_prompts(Tokenizer.from_gguf(default_model_path()), args.batch, 128)
    # All engines side by side; each round measures every format and llama-bench in turn, so
    # a slow spell of a shared host hits them alike. The best round of each counts.
    formats = {name: Format(FORMATS[name], prompts, args) for name in args.formats}
    llama_runs: list[float] = []
    llama_cmd = ""
    for r in range(args.repeats):
        for fmt in formats.values():
            fmt.run_single()
        if args.llama_bench:
            llama_cmd, rate = llama_bench_once(args.llama_bench, args)
            llama_runs.append(rate)
        for fmt in formats.values():
            fmt.run_batch()
        print(f"round {r + 1}/{args.repeats} done", flush=True)
    results = {name: fmt.result() for name, fmt in formats.items()}
    if llama_runs:
        results["llama.cpp Q4_1 (llama-bench)"] = {
            "command": llama_cmd, "single_stream_tok_s": max(llama_runs),
            "single_stream_runs": llama_runs,
        }  # fmt: skip
    for name, r in results.items():
        print(name, json.dumps(r), flush=True)

    fp32 = results.get("fp32", {}).get("single_stream_tok_s")
    print(f"\n{'format':<30} {'weights MiB':>11} {'1-stream tok/s':>15} "
          f"{f'batch {args.batch} tok/s':>15} {'vs fp32':>8}")  # fmt: skip
    for name, r in results.items():
        ratio = f"{r['single_stream_tok_s'] / fp32:7.2f}x" if fp32 else ""
        mib = f"{r['linear_weight_mib']:11.1f}" if "linear_weight_mib" in r else " " * 11
        tput = r.get(f"batch{args.batch}_tok_s")
        tput_s = f"{tput:15.1f}" if tput else " " * 15
        print(f"{name:<30} {mib} {r['single_stream_tok_s']:15.1f} {tput_s} {ratio}")
    write_results(args, results)


if __name__ == "__main__":
    main()

"""Weight formats side by side on the default model: single-stream decode and 16-request
throughput for fp32, bf16 (dense), the GGUF's own Q4_1 blocks (the default), int8 and int4,
next to llama.cpp's llama-bench on the same GGUF, in one run.

    python benchmarks/quantization.py [--llama-bench ../peers/build-llama/bin/llama-bench]

Single stream: one 128-token prompt, then `--decode-len` tokens, ignore_eos; the rate counts
tokens after the first. Throughput: `--batch` requests of 128-token prompts and 128 output
tokens submitted together. llama-bench's tg figure is its single-stream decode rate.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

from common import make_prompts  # noqa: I001  (benchmarks/ is run as a script folder)

from tokenmill import LLM, SamplingParams
from tokenmill.loader.model_source import default_model_path

FORMATS = {  # name -> LLM kwargs
    "fp32": dict(dtype="float32", quantization="none"),
    "bf16": dict(dtype="bfloat16", quantization="none"),
    "Q4_1 (GGUF, default)": dict(dtype="bfloat16"),
    "int8": dict(dtype="bfloat16", quantization="int8"),
    "int4": dict(dtype="bfloat16", quantization="int4"),
}


def bench_format(kwargs: dict, prompts: list[list[int]], args) -> dict:
    llm = LLM(**kwargs, max_model_len=1024, kv_cache_memory_gb=0.5)
    runner = llm.engine.runner
    weight_mib = sum(m.weight_bytes for m in runner.model.modules() if hasattr(m, "weight_bytes"))
    warm = SamplingParams(max_tokens=8, ignore_eos=True)
    llm.generate([{"prompt_token_ids": prompts[0]}], warm, use_tqdm=False)

    first = SamplingParams(max_tokens=1, temperature=0.0)
    single = SamplingParams(max_tokens=args.decode_len, temperature=0.0, ignore_eos=True)
    rates = []
    for _ in range(args.repeats):
        llm.engine.scheduler.kv_cache_manager.reset_prefix_cache()
        t = time.perf_counter()
        llm.generate([{"prompt_token_ids": prompts[0]}], first, use_tqdm=False)
        t_first = time.perf_counter() - t
        llm.engine.scheduler.kv_cache_manager.reset_prefix_cache()
        t = time.perf_counter()
        llm.generate([{"prompt_token_ids": prompts[0]}], single, use_tqdm=False)
        rates.append((args.decode_len - 1) / (time.perf_counter() - t - t_first))

    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    batch = [{"prompt_token_ids": p} for p in prompts[: args.batch]]
    llm.engine.scheduler.kv_cache_manager.reset_prefix_cache()
    t = time.perf_counter()
    outs = llm.generate(batch, params, use_tqdm=False)
    elapsed = time.perf_counter() - t
    num_out = sum(len(o.outputs[0].token_ids) for o in outs)
    return {
        "linear_weight_mib": weight_mib / 2**20,
        "single_stream_tok_s": max(rates),
        "single_stream_runs": rates,
        f"batch{args.batch}_tok_s": num_out / elapsed,
    }


def bench_llama(path: str, args) -> dict:
    cmd = [path, "-m", str(default_model_path()), "-t", str(args.threads), "-p", "0",
           "-n", str(args.decode_len), "-r", str(args.repeats), "-o", "json"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rows = json.loads(out[out.index("[") :])
    tg = next(r for r in rows if r.get("n_gen"))
    return {"command": " ".join(cmd), "single_stream_tok_s": tg["avg_ts"]}


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
    results: dict[str, dict] = {}
    for name in args.formats:
        results[name] = bench_format(FORMATS[name], prompts, args)
        print(name, json.dumps(results[name]), flush=True)
    if args.llama_bench:
        results["llama.cpp Q4_1 (llama-bench)"] = bench_llama(args.llama_bench, args)
        print("llama.cpp", json.dumps(results["llama.cpp Q4_1 (llama-bench)"]), flush=True)

    fp32 = results.get("fp32", {}).get("single_stream_tok_s")
    print(f"\n{'format':<30} {'weights MiB':>11} {'1-stream tok/s':>15} "
          f"{f'batch {args.batch} tok/s':>15} {'vs fp32':>8}")  # fmt: skip
    for name, r in results.items():
        ratio = f"{r['single_stream_tok_s'] / fp32:7.2f}x" if fp32 else ""
        mib = f"{r['linear_weight_mib']:11.1f}" if "linear_weight_mib" in r else " " * 11
        tput = r.get(f"batch{args.batch}_tok_s")
        tput_s = f"{tput:15.1f}" if tput else " " * 15
        print(f"{name:<30} {mib} {r['single_stream_tok_s']:15.1f} {tput_s} {ratio}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()

"""Offline throughput: tokenmill vs transformers `generate`, same prompts, same run.

Default workload: the default model on the CPU, 64 requests with 128-token
prompts and 128 generated tokens each (ignore_eos); transformers runs batches of 32, left-padded.
Also single-stream decode tokens/s and 512-token prefill tokens/s for both.

    python benchmarks/offline_throughput.py [--num-requests 64] [--hf-dtype float32]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from common import hf_generate, host_info, make_prompts  # noqa: I001  (benchmarks/ is run as a script folder)

from tokenmill import LLM, SamplingParams
from tokenmill.loader.model_source import default_model_path


def bench_tokenmill(args, prompts_ids, long_prompt) -> dict:
    llm = LLM(
        dtype=args.dtype,
        quantization=args.quantization,
        batch_invariant=args.batch_invariant,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    llm.generate([prompts_ids[0]], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)

    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts_ids], params, use_tqdm=False)
    elapsed = time.perf_counter() - t
    num_out = sum(len(o.outputs[0].token_ids) for o in outs)

    # single stream: decode rate after the first token
    single = SamplingParams(max_tokens=args.single_len, temperature=0.0, ignore_eos=True)
    t = time.perf_counter()
    llm.generate(
        [{"prompt_token_ids": prompts_ids[0]}], SamplingParams(max_tokens=1), use_tqdm=False
    )
    t_first = time.perf_counter() - t
    t = time.perf_counter()
    llm.generate([{"prompt_token_ids": prompts_ids[0]}], single, use_tqdm=False)
    t_all = time.perf_counter() - t
    decode_tps = (args.single_len - 1) / (t_all - t_first)

    llm.engine.scheduler.kv_cache_manager.reset_prefix_cache()
    t = time.perf_counter()
    llm.generate([{"prompt_token_ids": long_prompt}], SamplingParams(max_tokens=1), use_tqdm=False)
    prefill_tps = len(long_prompt) / (time.perf_counter() - t)
    return {
        "dtype": str(llm.engine.dtype),
        "quantization": args.quantization or "as stored (GGUF blocks)",
        "throughput_tok_s": num_out / elapsed,
        "elapsed_s": elapsed,
        "output_tokens": num_out,
        "single_stream_decode_tok_s": decode_tps,
        "prefill_tok_s": prefill_tps,
        "preemptions": llm.engine.scheduler.num_preemptions,
    }


def bench_transformers(args, prompts_ids, long_prompt) -> dict:
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    dtype = getattr(torch, args.hf_dtype)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, torch_dtype=dtype
    ).eval()
    pad = (
        model.config.eos_token_id
        if model.config.pad_token_id is None
        else model.config.pad_token_id
    )

    def generate(batch: list[list[int]], max_new: int) -> int:
        return hf_generate(model, batch, max_new, pad).numel()

    generate(prompts_ids[:2], 2)
    t = time.perf_counter()
    num_out = 0
    for i in range(0, len(prompts_ids), args.hf_batch_size):
        num_out += generate(prompts_ids[i : i + args.hf_batch_size], args.output_len)
    elapsed = time.perf_counter() - t

    t = time.perf_counter()
    generate(prompts_ids[:1], 1)
    t_first = time.perf_counter() - t
    t = time.perf_counter()
    generate(prompts_ids[:1], args.single_len)
    decode_tps = (args.single_len - 1) / (time.perf_counter() - t - t_first)

    t = time.perf_counter()
    with torch.inference_mode():
        model(torch.tensor([long_prompt]))
    prefill_tps = len(long_prompt) / (time.perf_counter() - t)
    return {
        "dtype": args.hf_dtype,
        "throughput_tok_s": num_out / elapsed,
        "elapsed_s": elapsed,
        "output_tokens": num_out,
        "single_stream_decode_tok_s": decode_tps,
        "prefill_tok_s": prefill_tps,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--single-len", type=int, default=128)
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--quantization", default=None, help="none | int8 | int4 (default: as stored)")
    ap.add_argument(
        "--batch-invariant",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the engine's option (default on, as in the engine)",
    )
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--hf-dtype", default="float32")
    ap.add_argument("--hf-batch-size", type=int, default=32)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/offline_throughput.json")
    args = ap.parse_args()

    from tokenmill.engine.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(default_model_path())
    prompts = make_prompts(tok, args.num_requests, args.prompt_len)
    long_prompt = make_prompts(tok, 1, args.prefill_len, seed=99)[0]

    results = {"config": vars(args), "host": host_info(), "torch_threads": torch.get_num_threads()}
    results["tokenmill"] = bench_tokenmill(args, prompts, long_prompt)
    print("tokenmill", json.dumps(results["tokenmill"], indent=1))
    if not args.skip_hf:
        results["transformers"] = bench_transformers(args, prompts, long_prompt)
        print("transformers", json.dumps(results["transformers"], indent=1))
        tm, hf = results["tokenmill"], results["transformers"]
        results["ratios"] = {
            k: tm[k] / hf[k]
            for k in ("throughput_tok_s", "single_stream_decode_tok_s", "prefill_tok_s")
        }
        print("ratios tokenmill / transformers:", json.dumps(results["ratios"], indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

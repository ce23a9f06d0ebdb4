"""KV cache groups for a model that interleaves sliding-window and global layers: the hybrid KV
cache (a group per window, windowed blocks freed as they slide out) against one block table for
every layer (`--no-hybrid-kv-cache`), in the same run.

    python benchmarks/kv_groups.py [--layers 12] [--kv-gb 0.1] --out PATH

The model: Gemma-3-1B's widths (window 512, one global layer in six) with `--layers` layers,
random weights, bf16 with int8 weights (the CPU fast path). Figures per mode:
- one long conversation (`--long-prompt` tokens, then `--long-output`): the most KV a request
  holds at once, in blocks per group and in MiB, and its decode tokens/s at that length;
- a batch of `--num-requests` prompts of `--prompt-len` tokens under a `--kv-gb` budget: how many
  requests ran at once, preemptions, and tokens/s.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import write_results
from families import build_folder


def run_mode(folder: Path, hybrid: bool, args: argparse.Namespace) -> dict:
    from tokenmill import LLM, SamplingParams

    llm = LLM(
        model=str(folder), dtype="bfloat16", quantization="int8", hybrid_kv_cache=hybrid,
        kv_cache_memory_gb=args.kv_gb, max_num_seqs=args.num_requests,
    )  # fmt: skip
    engine = llm.engine
    runner, sched = engine.runner, engine.scheduler
    kv = sched.kv_cache_manager
    cfg = runner.model_config
    layer_block = 2 * runner.block_size * cfg.num_key_value_heads * cfg.head_dim * 2  # bf16
    layers = [len(g.layers) for g in runner.kv_layout]
    peak_blocks = [0] * len(layers)
    running = [0]
    update = sched.update_from_output

    def recording_update(sched_out, runner_out):  # noqa: ANN001, ANN202
        outputs = update(sched_out, runner_out)
        running[0] = max(running[0], len(sched.running))
        for req in sched.running:
            for g, n in enumerate(kv.num_held_blocks(req)):
                peak_blocks[g] = max(peak_blocks[g], n)
        return outputs

    sched.update_from_output = recording_update
    greedy = dict(temperature=0.0, ignore_eos=True)
    g = torch.Generator().manual_seed(0)
    vocab = cfg.vocab_size
    long_prompt = torch.randint(100, vocab, (args.long_prompt,), generator=g).tolist()
    llm.generate([{"prompt_token_ids": long_prompt}], SamplingParams(max_tokens=1), use_tqdm=False)
    t = time.perf_counter()
    llm.generate([{"prompt_token_ids": long_prompt}], SamplingParams(max_tokens=1), use_tqdm=False)
    t_first = time.perf_counter() - t
    t = time.perf_counter()
    llm.generate([{"prompt_token_ids": long_prompt}],
                 SamplingParams(max_tokens=args.long_output, **greedy), use_tqdm=False)  # fmt: skip
    decode = (args.long_output - 1) / (time.perf_counter() - t - t_first)
    long_peak = list(peak_blocks)

    running[0] = 0
    preempted = sched.num_preemptions
    prompts = [
        torch.randint(100, vocab, (args.prompt_len,), generator=g).tolist()
        for _ in range(args.num_requests)
    ]
    params = SamplingParams(max_tokens=args.output_len, **greedy)
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - t
    return {
        "kv_groups": [
            {"window": spec.sliding_window, "layers": n, "blocks": spec.num_blocks}
            for spec, n in zip(runner.kv_groups, layers, strict=True)
        ],
        "long_request_peak_blocks": long_peak,
        "long_request_peak_kv_mib": sum(b * n for b, n in zip(long_peak, layers, strict=True))
        * layer_block
        / 2**20,
        "long_request_decode_tok_s": decode,
        "batch_max_running": running[0],
        "batch_preemptions": sched.num_preemptions - preempted,
        "batch_throughput_tok_s": sum(len(o.outputs[0].token_ids) for o in outs) / elapsed,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--kv-gb", type=float, default=0.1)
    ap.add_argument("--long-prompt", type=int, default=3072)
    ap.add_argument("--long-output", type=int, default=64)
    ap.add_argument("--num-requests", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/results/kv_groups.json")
    args = ap.parse_args()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="tokenmill-kv-groups-") as tmp:
        folder = build_folder("gemma3", args.layers, Path(tmp))
        for hybrid in (True, False):
            name = "hybrid" if hybrid else "one_table"
            results[name] = run_mode(folder, hybrid, args)
            print(name, results[name], file=sys.stderr)
    write_results(args, results)


if __name__ == "__main__":
    main()

"""Prompt prefill of the default model with the quantized matmul's AMX path and without.

Each variant runs in its own process (the AMX probe and TOKENMILL_NO_AMX are read once per
process): "amx" (batch-invariant default; quant_linear takes AMX int8 from 32 rows where the
CPU has it), "vnni" (the same with TOKENMILL_NO_AMX=1: every row on the AVX512-VNNI kernel) and
"dense" (batch_invariant=False: above block.DENSE_ABOVE_ROWS rows the weights are dequantized
to bfloat16 for oneDNN where it has AMX). Figures: best of --repeat prefills of a
--prompt-len token prompt (prefix cache reset each time), tokens/s.

    python benchmarks/prefill_amx.py [--prompt-len 512] [--repeat 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {
    "amx": ({}, True),
    "vnni": ({"TOKENMILL_NO_AMX": "1"}, True),
    "dense": ({}, False),
}


def measure(prompt_len: int, repeat: int, threads: int, batch_invariant: bool) -> dict:
    import torch
    from common import make_prompts  # noqa: I001  (benchmarks/ is run as a script folder)

    from tokenmill import LLM, SamplingParams
    from tokenmill.kernels.cpu_quant import amx_usable

    torch.set_num_threads(threads)
    llm = LLM(batch_invariant=batch_invariant, max_num_batched_tokens=prompt_len)
    prompt = make_prompts(llm.get_tokenizer(), 1, prompt_len)[0]
    one = SamplingParams(max_tokens=1)
    llm.generate([{"prompt_token_ids": prompt}], one, use_tqdm=False)  # warm-up
    best = float("inf")
    for _ in range(repeat):
        llm.engine.scheduler.kv_cache_manager.reset_prefix_cache()
        t = time.perf_counter()
        llm.generate([{"prompt_token_ids": prompt}], one, use_tqdm=False)
        best = min(best, time.perf_counter() - t)
    return {"prefill_tok_s": prompt_len / best, "best_s": best, "amx_usable": amx_usable()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", default=None, help="write the results JSON here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        env, invariant = VARIANTS[args.child]
        res = measure(args.prompt_len, args.repeat, args.threads, invariant)
        print("RESULT " + json.dumps(res))
        return
    results = {}
    for name in args.variants:
        env = {**os.environ, **VARIANTS[name][0]}
        cmd = [sys.executable, __file__, "--child", name, "--prompt-len", str(args.prompt_len)]
        cmd += ["--repeat", str(args.repeat), "--threads", str(args.threads)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        res = json.loads(out.split("RESULT ", 1)[1])
        results[name] = res
        print(
            f"{name:6s} {res['prefill_tok_s']:8.1f} tok/s  ({res['best_s'] * 1e3:.1f} ms, "
            f"AMX usable: {res['amx_usable']})",
            flush=True,
        )
    if args.out:
        from common import host_info

        report = {"host": host_info(), "threads": args.threads, "prompt_len": args.prompt_len}
        Path(args.out).write_text(json.dumps({**report, "results": results}, indent=1))


if __name__ == "__main__":
    main()

"""Tensor parallelism: TP=1 against TP=N on the default model, in one run.

Per tensor-parallel size: single-stream decode tokens/s, batched decode tokens/s (a batch of
requests decoding together), prefill tokens/s of one long prompt, and the communication share
of rank 0's steps: time inside the collectives (all-reduce, all-gathers, the logits gather)
plus publishing the step to the broadcast queue, over the whole step time. Rank 0's collective
time includes waiting for the slowest rank (the default model's 3 KV heads split 2 + 1 at
TP=2), so the share is an upper bound on pure transfer time.

    python benchmarks/tensor_parallel.py [--tp 1 2] [--decode-len 64] [--batch 8]
        [--prefill-len 512] [--backend mp|ray] [--out benchmarks/results/tensor_parallel.json]
        [--model PATH [--tokenizer PATH]] [--enable-expert-parallel]

`--model` times another model (default: the default model); an MoE model (Mixtral, Qwen-MoE)
needs `--enable-expert-parallel` at TP > 1, whose per-layer all-reduce of the partial expert
outputs counts as communication.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from common import make_prompts, write_results  # noqa: I001  (benchmarks/ is run as a script folder)

from tokenmill import LLM, SamplingParams


class _Clock:
    """Accumulated seconds of the wrapped calls."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t

        return timed


def _instrument(llm: LLM) -> tuple[_Clock, _Clock]:
    """(communication, step) clocks on rank 0; communication stays 0 at TP=1."""
    comm, step = _Clock(), _Clock()
    runner = llm.engine.runner
    runner.execute = step.wrap(runner.execute)  # type: ignore[method-assign]
    executor = llm.engine.executor
    if executor is not None:
        tp = executor.tp
        for name in ("all_reduce", "all_gather_cols", "gather_cols"):
            setattr(tp, name, comm.wrap(getattr(tp, name)))
        channel = executor.channel
        channel.publish = comm.wrap(channel.publish)  # type: ignore[method-assign]
    return comm, step


def bench(args: argparse.Namespace, tp: int) -> dict:
    kw: dict[str, Any] = dict(dtype=args.dtype, tensor_parallel_size=tp)
    if args.model:
        kw.update(model=args.model, tokenizer=args.tokenizer)
    if tp > 1:
        kw["distributed_executor_backend"] = args.backend
        kw["enable_expert_parallel"] = args.enable_expert_parallel
    llm = LLM(**kw)
    try:
        tok = llm.get_tokenizer()
        prompts = make_prompts(tok, args.batch, args.prompt_len)
        long_prompt = make_prompts(tok, 1, args.prefill_len, seed=1)[0]
        warm = SamplingParams(max_tokens=4, ignore_eos=True)
        llm.generate([{"prompt_token_ids": prompts[0]}], warm, use_tqdm=False)
        comm, step = _instrument(llm)

        def run(ps: list[list[int]], n: int) -> float:
            params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
            t = time.perf_counter()
            llm.generate([{"prompt_token_ids": p} for p in ps], params, use_tqdm=False)
            return time.perf_counter() - t

        llm.engine.scheduler.kv_cache_manager.reset_prefix_cache()
        t_first = run(prompts[:1], 1)
        single = (args.decode_len - 1) / (run(prompts[:1], args.decode_len) - t_first)
        t_first_b = run(prompts, 1)
        batched = len(prompts) * (args.decode_len - 1) / (run(prompts, args.decode_len) - t_first_b)
        llm.engine.scheduler.kv_cache_manager.reset_prefix_cache()
        prefill = len(long_prompt) / run([long_prompt], 1)
        return {
            "tensor_parallel_size": tp,
            "expert_parallel": tp > 1 and args.enable_expert_parallel,
            "dtype": str(llm.engine.dtype),
            "single_stream_decode_tok_s": single,
            "batched_decode_tok_s": batched,
            "prefill_tok_s": prefill,
            "comm_share_of_step": comm.seconds / step.seconds if step.seconds else 0.0,
            "step_s": step.seconds,
            "comm_s": comm.seconds,
        }
    finally:
        llm.engine.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--backend", default="mp", choices=("mp", "ray"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--decode-len", type=int, default=64)
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--out", default="benchmarks/results/tensor_parallel.json")
    ap.add_argument("--model", default=None, help="default: the default model")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--enable-expert-parallel", action="store_true")
    args = ap.parse_args()
    results = [bench(args, tp) for tp in args.tp]
    for r in results:
        single, batched = r["single_stream_decode_tok_s"], r["batched_decode_tok_s"]
        print(
            f"TP={r['tensor_parallel_size']} ({r['dtype']}): decode {single:.1f} tok/s single, "
            f"{batched:.1f} tok/s x{args.batch}; prefill {r['prefill_tok_s']:.0f} tok/s; "
            f"communication {100 * r['comm_share_of_step']:.0f}% of step time"
        )
    write_results(args, {"runs": results})


if __name__ == "__main__":
    main()

"""Shared helpers for benchmarks: deterministic prompts of exact token lengths, results JSON."""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

WORDS = (
    "the river mountain city ancient library engine quiet storm garden light winter market "
    "journey forest silver promise window letter bridge harbor village music theory question "
    "answer history science ocean shadow morning evening candle stone story dream machine "
    "language memory signal number pattern circle square travel distant simple careful bright"
).split()


def make_prompts(tokenizer, num: int, num_tokens: int, seed: int = 0) -> list[list[int]]:
    """`num` distinct token-id prompts of exactly `num_tokens` tokens each (readable English)."""
    rng = random.Random(seed)
    prompts = []
    for i in range(num):
        words = [f"Request {i}:"] + [rng.choice(WORDS) for _ in range(num_tokens * 2)]
        ids = tokenizer.encode(" ".join(words), add_special_tokens=False)
        prompts.append(ids[:num_tokens])
    return prompts


def write_results(args: argparse.Namespace, results: dict) -> None:
    """{"config": the arguments, "results": results} as JSON at `args.out`."""
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": vars(args), "results": results}, indent=2))


def time_ms(fn: Callable[[], object], device, iters: int) -> float:
    """Median milliseconds of fn() (CUDA events on a GPU, wall clock elsewhere)."""
    import torch

    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def hf_generate(model, prompts: list[list[int]], max_new: int, pad: int = 0):
    """Greedy transformers `generate` over one left-padded batch, exactly `max_new` new tokens
    per row (min_new_tokens masks EOS); returns the new token ids, [batch, max_new]."""
    import torch

    width = max(len(p) for p in prompts)
    device = model.device
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new,
            min_new_tokens=max_new,
            do_sample=False,
            pad_token_id=pad,
        )
    return out[:, width:]

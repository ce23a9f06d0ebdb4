"""Shared helpers for benchmarks: deterministic prompts of exact token lengths, results JSON
(with the host that produced them)."""

from __future__ import annotations

import argparse
import json
import os
import platform
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


# /proc/cpuinfo flags that decide which kernel code runs (vector ISA, FMA, dot products).
_ISA_FLAG_PREFIXES = ("sse", "ssse", "avx", "amx", "fma", "f16c")


def host_info() -> dict:
    """The machine the figures come from, for every results JSON (figures from different CPUs
    must never be mixed: the C++ kernels are built for the host, -march=native):
    {"cpu_model", "cpu_id" (vendor, family, model, stepping: virtual machines often show a
    generic model name), "cpu_flags" (the vector-ISA subset of /proc/cpuinfo's), "cpus",
    "torch"}."""
    info: dict[str, str] = {}
    flags: list[str] = []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("vendor_id", "cpu family", "model", "model name", "stepping"):
                    info.setdefault(key, value.strip())
                elif key == "flags":  # the first core's; all list the same
                    flags = sorted(v for v in value.split() if v.startswith(_ISA_FLAG_PREFIXES))
                    break
    except OSError:
        pass
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    cpu_id = [f"{k} {info[k]}" for k in ("cpu family", "model", "stepping") if k in info]
    return {
        "cpu_model": info.get("model name") or platform.processor() or None,
        "cpu_id": " ".join([info.get("vendor_id", ""), *cpu_id]).strip() or None,
        "cpu_flags": flags,
        "cpus": os.cpu_count(),
        "torch": torch_version,
    }


def write_json(out: str | Path, doc: dict) -> Path:
    """`doc` as indented JSON at `out` (its folder made), announced on stdout."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, default=str))
    print(f"wrote {path}")
    return path


def write_results(args: argparse.Namespace, results: dict) -> None:
    """{"config": the arguments, "host": host_info(), "results": results} as JSON at `args.out`."""
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"config": vars(args), "host": host_info(), "results": results}
    out.write_text(json.dumps(doc, indent=2))


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

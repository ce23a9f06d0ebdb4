"""The expert-offloading sweep of benchmarks/moe.py (`--expert-fractions`): for each fraction of
the experts kept resident, each configuration (`--policies`: LRU, the sequence-level policy,
with layer-level prefetch, and with mixed-precision misses), the decode and batch tokens/s, the
hit rate, bytes loaded per token and low-precision hits; and (`--ppl-tokens N`) the perplexity
of the configurations with mixed-precision misses against the lossless model on the repository's
evaluation text (benchmarks/perplexity.py's windows).

A configuration is `policy[+prefetch][+int4|+int2]`, e.g. `hobbit+prefetch+int4`; the misses
under `--miss-threshold` then run the experts' int4 copies. The perplexity runs score the text
`--ppl-chunk` tokens per forward pass (1: as decode runs, a token at a time, which is where
low-weight misses are served from the copies; a long prompt chunk activates most experts with
some high-weight row, so few misses there are low precision).
"""

from __future__ import annotations

import ctypes
import gc
import json
import math
from importlib.resources import files
from pathlib import Path
from typing import Any

from tokenmill import LLM
from tokenmill.data import US_FOUNDING_TEXTS


def reset_memory_peak() -> None:
    """Frees what the previous runs left (their engines, glibc's free heap) and restarts the
    process's peak RSS (VmHWM) from its current RSS (Linux: clear_refs 5)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def memory_figures() -> dict[str, float]:
    """MiB from /proc/self/status: peak RSS since `reset_memory_peak` (the file's mapped pages
    included), and the current private (RssAnon) and file-backed (RssFile: the checkpoint's
    mapped pages, which the kernel can drop) resident memory."""
    names = {"VmHWM": "peak_rss_mib", "RssAnon": "rss_anon_mib", "RssFile": "rss_file_mib"}
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in names:
                out[names[key]] = int(value.split()[0]) / 1024
    except OSError:
        pass
    return out


def offload_kwargs(config: str, threshold: float) -> dict[str, Any]:
    """`policy[+prefetch][+int4|+int2]` -> the LLM's expert offloading keywords."""
    policy, *flags = config.split("+")
    unknown = set(flags) - {"prefetch", "int4", "int2"}
    if unknown:
        raise SystemExit(f"unknown offloading option(s) {sorted(unknown)} in {config!r}")
    kw: dict[str, Any] = dict(expert_cache_policy=policy, expert_prefetch="prefetch" in flags)
    for precision in ("int4", "int2"):
        if precision in flags:
            kw.update(expert_miss_precision=precision, expert_miss_threshold=threshold)
    return kw


def budget_gb(resident: dict, fraction: float) -> float:
    """The budget holding `fraction` of the experts: half an expert over the fraction's bytes,
    so the floor gives its slot count."""
    per_expert = resident["all_expert_bytes"] / resident["num_experts"]
    return (fraction * resident["all_expert_bytes"] + per_expert / 2) / 2**30


def cache_figures(llm: LLM) -> dict:
    """The expert cache's counts over all runs of `llm` (warm-up included)."""
    cache = llm.engine.runner.expert_cache
    st = cache.stats
    lookups = st.hits + st.misses + st.low_precision_hits
    return dict(
        slots=cache.num_slots, pool_bytes=cache.pool_bytes,
        low_precision_bytes=cache.low_precision_bytes, hit_rate=st.hit_rate,
        bytes_per_token=st.bytes_per_token, low_precision_hits=st.low_precision_hits,
        low_precision_fraction=st.low_precision_hits / lookups if lookups else 0.0,
        prefetch_accuracy=st.prefetch_accuracy, prefetch_recall=st.prefetch_recall,
    )  # fmt: skip


def perplexity(args, model: Path, quant: str | None, **offload: Any) -> dict:
    """Perplexity of the first `--ppl-tokens` tokens of the evaluation text."""
    from perplexity import token_logprobs

    window = min(args.ppl_window, args.ppl_tokens)
    gc.collect()  # the previous runs' engines (reference cycles): one model in memory at a time
    llm = LLM(
        model=str(model), dtype=args.dtype, quantization=quant, kv_cache_memory_gb=0.3,
        max_model_len=window + 8, max_num_batched_tokens=args.ppl_chunk, **offload,
    )  # fmt: skip
    text = files("tokenmill.data").joinpath(US_FOUNDING_TEXTS).read_text()
    ids = llm.get_tokenizer().encode(text)[: args.ppl_tokens]
    lps = token_logprobs(llm, ids, window, max(1, window // 2))
    out = {"tokens": len(lps), "ppl": math.exp(-sum(lps) / len(lps))}
    if llm.engine.runner.expert_cache is not None:
        out.update(cache_figures(llm))
    return out


def sweep(
    args, bench, model: Path, prompts: list[list[int]], quant: str | None, prefix: str,
    resident: dict, results: dict,
) -> None:  # fmt: skip
    """`bench(args, model, prompts, quant, **offload)` for every fraction and configuration
    (results keys `{prefix}_resident{fraction}_{config}`), and the perplexities."""
    ppl_base = None
    if args.ppl_tokens and any("+int" in c for c in args.policies):
        ppl_base = results[f"{prefix}_ppl_lossless"] = perplexity(args, model, quant)
        print(f"{prefix}_ppl_lossless", json.dumps(ppl_base), flush=True)
    for frac in args.expert_fractions:
        gb = budget_gb(resident, frac)
        for config in args.policies:
            kw = offload_kwargs(config, args.miss_threshold)
            name = f"{prefix}_resident{frac:g}_{config}"
            results[name] = bench(args, model, prompts, quant, expert_memory_gb=gb, **kw)
            print(name, json.dumps(results[name], indent=1), flush=True)
            if ppl_base is not None and "expert_miss_precision" in kw:
                r = perplexity(args, model, quant, expert_memory_gb=gb, **kw)
                r["ppl_change"] = r["ppl"] / ppl_base["ppl"] - 1
                results[f"{name}_ppl"] = r
                print(f"{name}_ppl", json.dumps(r), flush=True)

"""Perplexity of the default model in each weight format on a public-domain text in the repo.

    python benchmarks/perplexity.py [--text FILE]  # default: tokenmill.data's us_founding_texts.txt
        [--sq4 DIR --sq3 DIR]  # SqueezeLLM checkpoints written by `tokenmill quantize`

Sliding windows of `--window` tokens advancing by `--stride`: each window scores the tokens
that no earlier window scored, with the rest as context (the first window scores all but its
first token). Perplexity = exp(-mean log p(token | context)) over the whole text.
"""

from __future__ import annotations

import argparse
import json
import math
from importlib.resources import files
from pathlib import Path

import torch
from common import write_results  # noqa: I001  (benchmarks/ is run as a script folder)

from tokenmill import LLM, SamplingParams
from tokenmill.data import US_FOUNDING_TEXTS
from tokenmill.layers.linear import Linear
from tokenmill.quant.packing import quantize_rtn

FORMATS = {  # name -> LLM kwargs
    "fp32": dict(dtype="float32", quantization="none"),
    "bf16": dict(dtype="bfloat16", quantization="none"),
    "Q4_1 (GGUF, default)": dict(dtype="bfloat16"),
    "Q4_1, fp32 activations": dict(dtype="float32"),
    "int8 (per channel)": dict(dtype="bfloat16", quantization="int8"),
    "int4 (g=32, RTN)": dict(dtype="bfloat16", quantization="int4"),
    # Equal-bits baselines for SqueezeLLM (one scale and offset per output row), applied in
    # memory to the dequantized weights: weight error only, no activation quantization, like
    # the SqueezeLLM kernel (float32 arithmetic). 3-bit codes fit the 4-bit layout.
    "RTN 4-bit per-channel": dict(dtype="bfloat16", quantization="none", rtn_bits=4),
    "RTN 3-bit per-channel": dict(dtype="bfloat16", quantization="none", rtn_bits=3),
    "SqueezeLLM 4-bit": dict(dtype="bfloat16", checkpoint="sq4"),
    "SqueezeLLM 3-bit": dict(dtype="bfloat16", checkpoint="sq3"),
}


def rtn_per_channel(llm: LLM, bits: int) -> None:
    """Replaces every decoder linear weight by its per-row round-to-nearest dequantization."""
    for name, layer in llm.engine.runner.model.named_modules():
        if isinstance(layer, Linear) and name.startswith("model.layers."):
            w = layer.weight.data
            w.copy_(quantize_rtn(w.float(), bits, group=w.shape[1]).dequantize().to(w.dtype))
            layer.quant_method.process_after_loading(layer)  # re-pack for oneDNN


def build(name: str, args: argparse.Namespace, max_len: int) -> LLM:
    kw = dict(FORMATS[name])
    rtn_bits = kw.pop("rtn_bits", None)
    checkpoint = kw.pop("checkpoint", None)
    if checkpoint is not None:
        kw["model"] = getattr(args, checkpoint)
        if kw["model"] is None:
            raise SystemExit(f"{name}: pass --{checkpoint} DIR (from `tokenmill quantize`)")
    llm = LLM(**kw, max_model_len=max_len, kv_cache_memory_gb=0.3)
    if rtn_bits is not None:
        with torch.no_grad():
            rtn_per_channel(llm, rtn_bits)
    return llm


def token_logprobs(llm: LLM, ids: list[int], window: int, stride: int) -> list[float]:
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    scored: list[float] = []
    done = 1  # tokens [0, done) are scored (token 0 has no context)
    start = 0
    while done < len(ids):
        end = min(start + window, len(ids))
        out = llm.generate([{"prompt_token_ids": ids[start:end]}], params, use_tqdm=False)[0]
        for pos in range(max(done, start + 1), end):
            entry = out.prompt_logprobs[pos - start]
            scored.append(entry[ids[pos]].logprob)
        done = end
        start = max(0, end - window + stride) if end < len(ids) else end
    return scored


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    packaged = files("tokenmill.data").joinpath(US_FOUNDING_TEXTS)
    ap.add_argument("--text", default=str(packaged), help="the evaluation text (a file)")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--sq4", help="SqueezeLLM 4-bit checkpoint folder")
    ap.add_argument("--sq3", help="SqueezeLLM 3-bit checkpoint folder")
    default = [n for n in FORMATS if "SqueezeLLM" not in n]
    ap.add_argument("--formats", nargs="+", default=None, choices=list(FORMATS))
    ap.add_argument("--out", default="benchmarks/results/perplexity.json")
    args = ap.parse_args()
    if args.formats is None:  # SqueezeLLM formats when their checkpoints are given
        args.formats = default + [f"SqueezeLLM {b}-bit" for b in (4, 3) if getattr(args, f"sq{b}")]

    text = Path(args.text).read_text()
    results = {}
    for name in args.formats:
        llm = build(name, args, args.window + 8)
        ids = llm.get_tokenizer().encode(text)
        lps = token_logprobs(llm, ids, args.window, args.stride)
        results[name] = {"tokens": len(lps), "ppl": math.exp(-sum(lps) / len(lps))}
        print(name, json.dumps(results[name]), flush=True)
        del llm
    base = results.get("fp32", {}).get("ppl")
    print(f"\n{'format':<26} {'perplexity':>10} {'vs fp32':>8}")
    for name, r in results.items():
        rel = f"{100 * (r['ppl'] / base - 1):+7.2f}%" if base else ""
        print(f"{name:<26} {r['ppl']:10.3f} {rel}")
    write_results(args, results)


if __name__ == "__main__":
    main()

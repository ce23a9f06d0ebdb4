"""Model families at their real small shapes (layers cut to fit the machine), random weights:
tokenmill against transformers in the same run.

    python benchmarks/families.py [--families llama qwen3 gemma2 gemma3 phi3] [--layers 4]
                                  [--quantization int8] [--repeats N] [--threads N] --out PATH

Each family's config takes the width of a real checkpoint (Llama-3.2-1B, Qwen3-0.6B, Gemma-2-2B,
Gemma-3-1B, Phi-3-mini) with `--layers` layers and the default model's tokenizer (vocabulary
49152, so every family pays the same LM head). Figures: single-stream decode tokens/s (after the
first token) and offline throughput (`--num-requests` prompts of `--prompt-len` tokens,
`--output-len` generated each), tokenmill in bf16 (optionally quantized at load; best of
`--repeats`, with the CPU milliseconds per token its process spent) and transformers in bf16,
plus which fast paths tokenmill ran: the fused whole-layer CPU decode (quantized weights only)
and the packed quantized kernels.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import hf_generate, make_prompts, write_results

SHAPES: dict[str, tuple[str, str, dict[str, Any]]] = {
    # name: (architecture, transformers config class, real widths)
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(
        hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
        head_dim=64, rope_theta=500000.0, tie_word_embeddings=True)),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(
        hidden_size=1024, intermediate_size=3072, num_attention_heads=16, num_key_value_heads=8,
        head_dim=128, rope_theta=1000000.0, tie_word_embeddings=True)),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", dict(
        hidden_size=2304, intermediate_size=9216, num_attention_heads=8, num_key_value_heads=4,
        head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", dict(
        hidden_size=1152, intermediate_size=6912, num_attention_heads=4, num_key_value_heads=1,
        head_dim=256, query_pre_attn_scalar=256, sliding_window=512, rope_theta=1000000.0,
        rope_local_base_freq=10000.0)),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", dict(
        hidden_size=3072, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=32,
        rope_theta=10000.0)),
}  # fmt: skip


def build_folder(name: str, layers: int, root: Path) -> Path:
    """Random weights at `name`'s shapes, saved with the default model's tokenizer."""
    import transformers

    from tokenmill.loader.model_source import default_model_path

    arch, config_cls, shape = SHAPES[name]
    gguf = default_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    cfg = getattr(transformers, config_cls)(
        vocab_size=49152, num_hidden_layers=layers, max_position_embeddings=4096, **shape
    )
    cfg.architectures = [arch]
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = getattr(transformers, arch)(cfg).to(torch.bfloat16)
    folder = root / name
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def bench_tokenmill(folder: Path, args: argparse.Namespace, prompts: list[list[int]]) -> dict:
    """Best of `--repeats`: wall-clock tokens/s and this process's CPU milliseconds per token
    (a figure that other processes on a shared host disturb less than the wall clock)."""
    from tokenmill import LLM, SamplingParams

    llm = LLM(model=str(folder), dtype="bfloat16", quantization=args.quantization)
    greedy = dict(temperature=0.0, ignore_eos=True)
    llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(max_tokens=4, **greedy),
                 use_tqdm=False)  # fmt: skip
    decode, throughput, decode_cpu, throughput_cpu = [], [], [], []
    for _ in range(args.repeats):
        t, c = time.perf_counter(), time.process_time()
        llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(max_tokens=1),
                     use_tqdm=False)  # fmt: skip
        t_first, c_first = time.perf_counter() - t, time.process_time() - c
        single = SamplingParams(max_tokens=args.single_len, **greedy)
        t, c = time.perf_counter(), time.process_time()
        llm.generate([{"prompt_token_ids": prompts[0]}], single, use_tqdm=False)
        decode.append((args.single_len - 1) / (time.perf_counter() - t - t_first))
        decode_cpu.append(1e3 * (time.process_time() - c - c_first) / (args.single_len - 1))
        params = SamplingParams(max_tokens=args.output_len, **greedy)
        t, c = time.perf_counter(), time.process_time()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        num_out = sum(len(o.outputs[0].token_ids) for o in outs)
        throughput.append(num_out / (time.perf_counter() - t))
        throughput_cpu.append(1e3 * (time.process_time() - c) / num_out)
    model = llm.engine.runner.model
    fused = [getattr(m, "fused_decode", None) for m in model.modules()]
    methods = {type(m.quant_method).__name__ for m in model.modules() if hasattr(m, "quant_method")}
    return {
        "single_stream_decode_tok_s": max(decode),
        "throughput_tok_s": max(throughput),
        "single_stream_decode_cpu_ms_per_tok": min(decode_cpu),
        "throughput_cpu_ms_per_tok": min(throughput_cpu),
        "fused_decode_layers": sum(1 for f in fused if f is not None and f.active),
        "linear_methods": sorted(methods),
        "attention_backend": llm.engine.runner.attn_backend.name,
    }


def bench_transformers(folder: Path, args: argparse.Namespace, prompts: list[list[int]]) -> dict:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.bfloat16
    ).eval()
    pad = model.config.pad_token_id or 0
    hf_generate(model, prompts[:1], 2, pad)
    t = time.perf_counter()
    hf_generate(model, prompts[:1], 1, pad)
    t_first = time.perf_counter() - t
    t = time.perf_counter()
    hf_generate(model, prompts[:1], args.single_len, pad)
    decode = (args.single_len - 1) / (time.perf_counter() - t - t_first)
    t = time.perf_counter()
    num_out = hf_generate(model, prompts, args.output_len, pad).numel()
    return {
        "single_stream_decode_tok_s": decode,
        "throughput_tok_s": num_out / (time.perf_counter() - t),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--quantization", default=None, help="none | int8 | int4 (default: bf16)")
    ap.add_argument("--num-requests", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--single-len", type=int, default=32)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--repeats", type=int, default=1, help="tokenmill's figures: best of N")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: its default)")
    ap.add_argument("--out", default="benchmarks/results/families.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from tokenmill.engine.tokenizer import Tokenizer

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="tokenmill-families-") as tmp:
        for name in args.families:
            folder = build_folder(name, args.layers, Path(tmp))
            prompts = make_prompts(Tokenizer.from_pretrained(str(folder)), args.num_requests,
                                   args.prompt_len)  # fmt: skip
            row = {"tokenmill": bench_tokenmill(folder, args, prompts)}
            if not args.skip_hf:
                row["transformers"] = bench_transformers(folder, args, prompts)
            results[name] = row
            print(name, row, file=sys.stderr)
    write_results(args, results)


if __name__ == "__main__":
    main()

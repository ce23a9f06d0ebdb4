"""Mixture-of-experts decode: tokenmill vs transformers on a random-weight, scaled-down Mixtral,
in the same run.

The model: Mixtral's graph (8 experts, top 2, GQA 4:1) at hidden 1024 and expert width 3584
(Mixtral's 14336 / 4096 ratio), 4 layers, the default model's tokenizer (vocabulary 49152),
saved once as an HF folder. Measured: single-stream decode tokens/s after the first token, and
the output tokens/s of a batch of 16 requests generated together (16-token prompts,
`--output-len` new tokens each, ignore_eos). tokenmill runs each `--quantization` given (none:
dense in `--dtype`; int8 / int4: round-to-nearest blocks at load); transformers runs `generate`
on the same folder in `--hf-dtype`, the batch left-padded.

    python benchmarks/moe.py [--quantization none int4] [--output-len 32] [--threads N]

Expert offloading (`--expert-fractions 1 0.5 0.25`; benchmarks/moe_offload.py): for each
fraction of the experts kept resident (the budget `--expert-memory-gb` that holds that many),
each configuration (LRU, the sequence-level policy, with layer-level prefetch, and with int4
mixed-precision misses under `--miss-threshold`) runs the same measurements and reports the
expert cache's hit rate, bytes loaded per token, low-precision hits and prefetch accuracy, and
for the mixed-precision ones the perplexity change against the lossless model on the
repository's evaluation text (`--ppl-tokens`, scored `--ppl-chunk` tokens a pass). On a CPU host the
"slow" store is the checkpoint's memory map and the pool host memory: a miss costs reading the
expert's pages (from the page cache once they were read) into the slot's layout, not a PCIe
transfer, so this measures the mechanism's overhead, not a GPU's offloading speed. The
offloaded experts stay in the checkpoint's memory map: each run reports its memory after the
load and over the runs (`memory`: peak RSS, which counts the file's pages the runs touched,
private RssAnon, file-backed RssFile that the kernel can drop), the resident run's included.

    python benchmarks/moe.py --quantization int4 --skip-hf --expert-fractions 0.5 0.25

Against llama.cpp on the very same file (`--olmoe-gguf --llama-bin DIR`): an OLMoE-1B-7B-shaped
GGUF with random Q4_0 blocks and synthetic Zipf routing (benchmarks/moe_gguf.py; `--layers` of
the 16 layers, to fit the host's time and memory). tokenmill keeps the Q4_0 blocks as stored
and runs twice, with the grouped expert kernel and with the per-expert loop; llama.cpp's
llama-bench gives single-stream decode (`-p 0 -n 64`) and llama-batched-bench the generation
throughput of `--batch` sequences; transformers runs its OLMoE of the same shape in bfloat16
(random experts, the file's embedding and routers).

    python benchmarks/moe.py --olmoe-gguf --layers 4 --llama-bin path/to/llama.cpp/bin --threads 2

The offloading sweep on the OLMoE-shaped file (synthetic weights and routing; the whole model:
`--layers 16`, a 3.7 GiB file in a temporary folder):

    python benchmarks/moe.py --olmoe-gguf --layers 16 --skip-hf --skip-loop
        --expert-fractions 1 0.5 0.25 --ppl-tokens 512   (one command line)

The 16-layer file is 3.77 GiB, written in ~100 s at a peak of 1.9 GB of memory. Every run
loads it afresh (one engine in memory at a time); a load of the resident model peaked at
11.7 GB RSS, the file's mapped pages included (on a loaded 2-core host it took 12 minutes).
The experts' Q4_0 blocks take 5 bits a weight in the kernel's tiles (q, fp16 scale and
offset), as much as their int4 copies (`+int4` doubles the experts' memory here; `+int2`
copies take 3 bits a weight).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import moe_offload
import torch
from common import hf_generate, host_info, make_prompts  # noqa: I001  (benchmarks/ is run as a script folder)

from tokenmill import LLM, SamplingParams
from tokenmill.layers.expert_tensors import expert_tensor_refs, get_ref
from tokenmill.layers.moe import SparseMoeBlock
from tokenmill.loader.model_source import default_model_path

SHAPE = dict(
    hidden_size=1024,
    intermediate_size=3584,
    num_hidden_layers=4,
    num_attention_heads=16,
    num_key_value_heads=4,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
)


def make_folder(root: Path) -> Path:
    """A random-weight Mixtral of SHAPE with the default tokenizer, as an HF folder."""
    import transformers

    path = default_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(
        vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, **SHAPE,
    )  # fmt: skip
    cfg.architectures = ["MixtralForCausalLM"]
    model = transformers.MixtralForCausalLM(cfg).eval()
    with torch.no_grad():  # routers with clear preferences, as trained ones have
        for layer in model.model.layers:
            torch.nn.init.normal_(layer.mlp.gate.weight, std=0.1)
    folder = root / "mixtral-scaled"
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def bench_tokenmill(
    args,
    folder: Path,
    prompts: list[list[int]],
    quant: str | None,
    loop: bool = False,
    probe: Any = None,
    **offload: Any,
) -> dict:
    """`loop`: the experts run one by one (the grouped quantized kernel off); `probe(model)`:
    more measurements on the loaded model, kept under "probe"."""
    # The previous runs' engines (reference cycles) go: one model in memory at a time.
    moe_offload.reset_memory_peak()
    llm = LLM(
        model=str(folder), dtype=args.dtype, quantization=quant, kv_cache_memory_gb=0.5,
        max_num_seqs=args.batch, **offload,
    )  # fmt: skip
    loaded = moe_offload.memory_figures()
    for m in llm.engine.runner.model.modules():
        if isinstance(m, SparseMoeBlock):
            m.experts.grouped = not loop
    warm = SamplingParams(max_tokens=4, ignore_eos=True)
    llm.generate([{"prompt_token_ids": prompts[0]}], warm, use_tqdm=False)
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    one = SamplingParams(max_tokens=1, ignore_eos=True)
    rates = []  # as llama-bench reports: the mean of the repetitions' tokens/s
    for _ in range(args.decode_reps):
        # The first token's time taken again in each repetition, right before it: on a loaded
        # host one stalled measurement, subtracted from every repetition, skews them all.
        t = time.perf_counter()
        llm.generate([{"prompt_token_ids": prompts[0]}], one, use_tqdm=False)
        t_first = time.perf_counter() - t
        t = time.perf_counter()
        llm.generate([{"prompt_token_ids": prompts[0]}], params, use_tqdm=False)
        rates.append((args.output_len - 1) / (time.perf_counter() - t - t_first))
    decode = sum(rates) / len(rates)
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - t
    num_out = sum(len(o.outputs[0].token_ids) for o in outs)
    result = {
        "dtype": str(llm.engine.dtype),
        "quantization": quant,
        "experts": "loop" if loop else "grouped",
        **offload,
        "single_stream_decode_tok_s": decode,
        "decode_reps_tok_s": rates,
        f"batch{args.batch}_tok_s": num_out / elapsed,
    }
    # Memory: after the load, and the peak over the load and the runs.
    result["memory_loaded"] = loaded
    result["memory"] = moe_offload.memory_figures()
    if probe is not None:
        result["probe"] = probe(llm.engine.runner.model)
    cache = llm.engine.runner.expert_cache
    if cache is None:  # resident: the bytes of all experts, which the fractions are of
        blocks = [m for m in llm.engine.runner.model.modules() if isinstance(m, SparseMoeBlock)]
        refs = [r for b in blocks for e in b.experts for r in expert_tensor_refs(e)]
        sizes = [get_ref(r).numel() * get_ref(r).element_size() for r in refs]
        result["all_expert_bytes"] = sum(sizes)
        result["num_experts"] = sum(len(b.experts) for b in blocks)
    else:  # counts over all the runs above (warm-up included)
        result.update(moe_offload.cache_figures(llm))
    return result


def bench_transformers(args, folder: Path | Any, prompts: list[list[int]]) -> dict:
    """`folder`: an HF folder (loaded in --hf-dtype), or a model already built."""
    import transformers

    model = folder
    if isinstance(folder, Path):
        dtype = getattr(torch, args.hf_dtype)
        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
        model.eval()
    pad = model.config.pad_token_id or 0
    hf_generate(model, prompts[:2], 2, pad)  # warm-up
    t = time.perf_counter()
    hf_generate(model, prompts[:1], 1, pad)
    t_first = time.perf_counter() - t
    t = time.perf_counter()
    hf_generate(model, prompts[:1], args.output_len, pad)
    decode = (args.output_len - 1) / (time.perf_counter() - t - t_first)
    t = time.perf_counter()
    num_out = hf_generate(model, prompts, args.output_len, pad).numel()
    return {
        "dtype": str(next(model.parameters()).dtype),
        "single_stream_decode_tok_s": decode,
        f"batch{args.batch}_tok_s": num_out / (time.perf_counter() - t),
    }


def bench_olmoe(args, root: Path, results: dict) -> None:
    """tokenmill (grouped kernel, per-expert loop), llama.cpp and transformers on one GGUF."""
    import moe_gguf

    from tokenmill.engine.tokenizer import Tokenizer

    path = root / "olmoe.gguf"
    t = time.perf_counter()
    results["olmoe_shape"] = shape = moe_gguf.write_olmoe_gguf(
        path, default_model_path(), args.layers
    )
    results["olmoe_gguf_bytes"] = path.stat().st_size
    print(f"wrote {path.stat().st_size / 2**30:.2f} GiB in {time.perf_counter() - t:.0f} s")
    prompts = make_prompts(Tokenizer.from_gguf(path), args.batch, args.prompt_len)
    threads = torch.get_num_threads()
    for loop in (False, True):
        if loop and args.skip_loop:
            break
        name = "tokenmill_loop" if loop else "tokenmill_grouped"
        probe = None if loop else moe_gguf.expert_path_ab
        results[name] = bench_tokenmill(args, path, prompts, None, loop=loop, probe=probe)
        print(name, json.dumps(results[name], indent=1))
    moe_offload.sweep(
        args, bench_tokenmill, path, prompts, None, "tokenmill", results["tokenmill_grouped"],
        results,
    )  # fmt: skip
    if args.llama_bin:
        bin_dir = Path(args.llama_bin)
        results["llama.cpp"] = {
            "single_stream_decode_tok_s": moe_gguf.llama_bench_decode(bin_dir, path, 64, threads),
            f"batch{args.batch}_tok_s": moe_gguf.llama_batched(
                bin_dir, path, args.batch, args.prompt_len, args.output_len, threads
            )["gen_tok_s"],
        }  # fmt: skip
        print("llama.cpp", json.dumps(results["llama.cpp"], indent=1))
    if not args.skip_hf:
        model = moe_gguf.transformers_twin(shape, path)
        results["transformers"] = bench_transformers(args, model, prompts)
        print("transformers", json.dumps(results["transformers"], indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--quantization", nargs="+", default=["none", "int4"])
    ap.add_argument(
        "--expert-fractions", type=float, nargs="*", default=[],
        help="fractions of the experts resident to sweep (expert offloading)",
    )  # fmt: skip
    configs = ["lru", "hobbit", "hobbit+prefetch", "hobbit+prefetch+int4"]
    ap.add_argument(
        "--policies", nargs="+", default=configs,
        help="offloading configurations: policy[+prefetch][+int4|+int2] (see moe_offload.py)",
    )  # fmt: skip
    ap.add_argument("--miss-threshold", type=float, default=0.2, help="expert_miss_threshold")
    ap.add_argument(
        "--ppl-tokens", type=int, default=256,
        help="perplexity of +int4/+int2 configurations vs lossless on this many tokens (0: off)",
    )  # fmt: skip
    ap.add_argument("--ppl-window", type=int, default=256, help="perplexity window (tokens)")
    ap.add_argument("--ppl-chunk", type=int, default=1, help="perplexity tokens per forward pass")
    ap.add_argument("--skip-loop", action="store_true", help="OLMoE: no per-expert-loop run")
    ap.add_argument("--hf-dtype", default="float32")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--decode-reps", type=int, default=1, help="single-stream repetitions")
    ap.add_argument("--olmoe-gguf", action="store_true", help="the llama.cpp comparison")
    ap.add_argument("--layers", type=int, default=4, help="OLMoE layers written (of 16)")
    ap.add_argument("--llama-bin", default=None, help="folder of llama-bench, llama-batched-bench")
    ap.add_argument("--out", default="benchmarks/results/moe.json")
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    root = Path(tempfile.mkdtemp(prefix="tokenmill-moe-bench-"))
    try:
        results: dict = {"config": vars(args), "host": host_info()}
        results["torch_threads"] = torch.get_num_threads()
        if args.olmoe_gguf:
            bench_olmoe(args, root, results)
            return
        folder = make_folder(root)
        from tokenmill.engine.tokenizer import Tokenizer

        tok = Tokenizer.from_gguf(default_model_path())
        prompts = make_prompts(tok, args.batch, args.prompt_len)
        results["shape"] = SHAPE
        for quant in args.quantization:
            results[f"tokenmill_{quant}"] = bench_tokenmill(args, folder, prompts, quant)
            print(f"tokenmill {quant}", json.dumps(results[f"tokenmill_{quant}"], indent=1))
            resident = results[f"tokenmill_{quant}"]
            moe_offload.sweep(
                args, bench_tokenmill, folder, prompts, quant, f"tokenmill_{quant}", resident,
                results,
            )  # fmt: skip
        if not args.skip_hf:
            results["transformers"] = bench_transformers(args, folder, prompts)
            print("transformers", json.dumps(results["transformers"], indent=1))
    finally:
        shutil.rmtree(root, ignore_errors=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""The OLMoE-shaped GGUF of benchmarks/moe.py (`--olmoe-gguf`) and the llama.cpp and transformers
runs on it.

The file: OLMoE-1B-7B's shape (hidden 2048, 16 heads without GQA, 64 experts, top 8, expert
FFN 1024, vocabulary of the default model's tokenizer, whose `tokenizer.*` metadata is copied in)
with `layers` of its 16 layers. Every matrix is random Q4_0 blocks written directly (uniform
4-bit values, scales around 0.005, so weights of std ~0.02), which costs no quantization time;
the token embedding is F16, the norms 1 and the routers F32, as llama.cpp's converter leaves them.

Synthetic routing: trained routers prefer some experts. Here every router row is
`log p_e * u / sqrt(hidden) + noise`, p a Zipf(1) law over the experts (in a random order per
layer) and u a unit direction that every token embedding carries, so each token's router
logits are about log p_e plus unit Gaussian noise: a few experts take most tokens, and a batch
activates fewer distinct experts than uniform routing would. The speed of a MoE decode depends
on that number, so a benchmark with uniform routing would flatter no one realistically.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from tokenmill.testing.gguf_files import Q4_0_BLOCK, copy_tokenizer, random_q4_0

WEIGHT_SCALE = 0.005  # Q4_0 block scales: weights of std ~0.02

SHAPE = dict(hidden=2048, heads=16, experts=64, top_k=8, expert_ffn=1024, layers=16)


def zipf_router(rng: np.random.Generator, u: np.ndarray, experts: int) -> np.ndarray:
    """[experts, hidden] float32: logits ~ log p_e + N(0, 1) on inputs of norm sqrt(hidden)
    that point along u (RMSNorm output with a unit weight)."""
    hidden = u.shape[0]
    p = 1.0 / np.arange(1, experts + 1)
    log_p = np.log(p / p.sum())[rng.permutation(experts)]
    noise = rng.standard_normal((experts, hidden)) / np.sqrt(hidden)
    return (np.outer(log_p, u) / np.sqrt(hidden) * 1.4 + noise).astype(np.float32)


def write_olmoe_gguf(path: Path, tokenizer_gguf: Path, layers: int, seed: int = 0) -> dict:
    """Writes the file; returns the shape written (SHAPE with `layers`, and the vocabulary)."""
    rng = np.random.default_rng(seed)
    s = {**SHAPE, "layers": layers}
    h, e, ff = s["hidden"], s["experts"], s["expert_ffn"]
    w = gguf.GGUFWriter(path, "olmoe")
    vocab = copy_tokenizer(w, gguf.GGUFReader(tokenizer_gguf))
    s["vocab"] = vocab
    w.add_block_count(layers)
    w.add_context_length(4096)
    w.add_embedding_length(h)
    w.add_feed_forward_length(ff)
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["heads"])
    w.add_rope_dimension_count(h // s["heads"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_expert_count(e)
    w.add_expert_used_count(s["top_k"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    u = rng.standard_normal(h)
    u /= np.linalg.norm(u)
    q4 = gguf.GGMLQuantizationType.Q4_0
    # (name, shape of the array written, its dtype, GGUF type of raw bytes, maker): the makers
    # draw from rng in this order, one tensor at a time as it is written, so the file streams
    # out (the whole 16-layer model is 4 GB) and its bytes do not depend on the streaming.
    tensors: list[tuple[str, tuple[int, ...], Any, Any, Any]] = []

    def add(name: str, shape: tuple[int, ...], dtype: Any, make: Any, raw: Any = None) -> None:
        tensors.append((name, shape, np.dtype(dtype), raw, make))

    def q4_shape(*shape: int) -> tuple[int, ...]:
        *lead, cols = shape
        return (*lead, cols // 32 * Q4_0_BLOCK)

    def q4_random(*shape: int) -> np.ndarray:
        return random_q4_0(rng, *shape, scale=WEIGHT_SCALE)

    # Embeddings of norm ~0.9 plus a unit-norm u: RMSNorm makes every router input lean on u.
    add(
        "token_embd.weight",
        (vocab, h),
        np.float16,
        lambda: (rng.standard_normal((vocab, h)) * 0.02 + u).astype(np.float16),
    )
    add("output_norm.weight", (h,), np.float32, lambda: np.ones(h, np.float32))
    add("output.weight", q4_shape(vocab, h), np.uint8, lambda: q4_random(vocab, h), q4)
    for i in range(layers):
        b = f"blk.{i}."
        for name in ("attn_norm", "ffn_norm", "attn_q_norm", "attn_k_norm"):
            add(b + name + ".weight", (h,), np.float32, lambda: np.ones(h, np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            add(b + name + ".weight", q4_shape(h, h), np.uint8, lambda: q4_random(h, h), q4)
        add(b + "ffn_gate_inp.weight", (e, h), np.float32, lambda: zipf_router(rng, u, e))
        for name in ("ffn_gate_exps", "ffn_up_exps"):
            add(
                b + name + ".weight",
                q4_shape(e, ff, h),
                np.uint8,
                lambda: q4_random(e, ff, h),
                q4,
            )
        add(
            b + "ffn_down_exps.weight",
            q4_shape(e, h, ff),
            np.uint8,
            lambda: q4_random(e, h, ff),
            q4,
        )
    for name, shape, dtype, raw, _ in tensors:
        w.add_tensor_info(name, shape, dtype, int(np.prod(shape)) * dtype.itemsize, raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _, shape, dtype, _, make in tensors:
        array = make()
        assert array.shape == shape and array.dtype == dtype
        w.write_tensor_data(array)
    w.close()
    return s


def llama_bench_decode(bin_dir: Path, model: Path, n: int, threads: int) -> float:
    """llama-bench's text-generation tokens/s (`-p 0 -n n`, one sequence, its default 5
    repetitions)."""
    cmd = [str(bin_dir / "llama-bench"), "-m", str(model), "-p", "0", "-n", str(n)]
    out = subprocess.run(
        [*cmd, "-t", str(threads), "-o", "json"], capture_output=True, text=True, check=True
    )
    return float(json.loads(out.stdout)[0]["avg_ts"])


def llama_batched(
    bin_dir: Path, model: Path, batch: int, prompt: int, n: int, threads: int
) -> dict[str, float]:
    """llama-batched-bench with `batch` sequences of a `prompt`-token prompt each generating
    `n` tokens: the generation throughput S_TG (tokens/s over all sequences) and the whole
    run's S (prompts included)."""
    cmd = [str(bin_dir / "llama-batched-bench"), "-m", str(model), "-c", str(batch * (prompt + n))]
    cmd += ["-npp", str(prompt), "-ntg", str(n), "-npl", str(batch), "-t", str(threads)]
    cmd += ["-tb", str(threads), "-b", "512", "-ub", "512"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    # | PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 10 and re.fullmatch(r"\d+", cells[0]):
            return {"gen_tok_s": float(cells[7]), "all_tok_s": float(cells[9])}
    raise RuntimeError("no result row in llama-batched-bench's output:\n" + out[-2000:])


def transformers_twin(shape: dict, model_path: Path) -> Any:
    """transformers' OlmoeForCausalLM of the same shape in bfloat16: random experts and
    attention (it cannot take this GGUF's random blocks as they are), but the file's embedding
    and routers, so it routes as the file does."""
    import torch
    import transformers

    reader = gguf.GGUFReader(model_path)
    tensors = {t.name: t for t in reader.tensors}
    cfg = transformers.OlmoeConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"],
        intermediate_size=shape["expert_ffn"], num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"], num_key_value_heads=shape["heads"],
        num_experts=shape["experts"], num_experts_per_tok=shape["top_k"],
        max_position_embeddings=4096, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = transformers.OlmoeForCausalLM(cfg).to(torch.bfloat16).eval()
    with torch.no_grad():
        embd = np.asarray(tensors["token_embd.weight"].data, dtype=np.float32)
        model.model.embed_tokens.weight.copy_(torch.from_numpy(embd))
        for i, layer in enumerate(model.model.layers):
            router = np.asarray(tensors[f"blk.{i}.ffn_gate_inp.weight"].data)
            layer.mlp.gate.weight.copy_(torch.from_numpy(router.copy()))
    return model


def expert_path_ab(model: Any, rows: tuple[int, ...] = (1, 16), reps: int = 40) -> dict:
    """The first MoE layer's forward alone, the grouped kernel against the per-expert loop,
    interleaved call by call (so that the host's load hits both alike), on `rows` token rows
    taken from the embedding (which carries the routing direction); median and min ms, and
    how many distinct experts those rows activate."""
    import statistics
    import time

    import torch

    from tokenmill.layers.moe import SparseMoeBlock

    block = next(m for m in model.modules() if isinstance(m, SparseMoeBlock))
    embed = next(m for name, m in model.named_modules() if name.endswith("embed_tokens"))
    out: dict = {}
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for n in rows:
            x = embed.weight[torch.randint(0, embed.weight.shape[0], (n,), generator=g)]
            times: dict[bool, list[float]] = {True: [], False: []}
            for _ in range(reps):
                for grouped in (True, False):
                    block.experts.grouped = grouped
                    t = time.perf_counter()
                    block(x)
                    times[grouped].append((time.perf_counter() - t) * 1e3)
            block.experts.grouped = True
            out[f"rows{n}"] = {
                "active_experts": int(block.routing(x)[1].unique().numel()),
                **{
                    f"{'grouped' if k else 'loop'}_ms": {
                        "median": statistics.median(v), "min": min(v)
                    }
                    for k, v in times.items()
                },
            }  # fmt: skip
    return out

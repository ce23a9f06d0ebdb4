"""Mixture-of-experts families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) on tiny random-weight
models (fp32) against transformers: logits through the paged cache with chunked prompts, GGUF
files written from the same weights (F32, and Q8_0 / Q4_0 / Q4_1 experts kept in their blocks),
greedy tokens through `LLM`, the engine's invariances and a Q4_0 GGUF at TP=2 with expert
parallelism. The fused MoE layer is checked against its dense all-experts reference and for
batch invariance."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import test_families as families  # the dense families' helpers (tests/models)
import torch

from tokenmill.layers.linear import Linear
from tokenmill.layers.moe import SparseMoeBlock
from tokenmill.loader.gguf import read_gguf
from tokenmill.models.registry import SUPPORTED_ARCHITECTURES
from tokenmill.quant.packing import quantize_rtn
from tokenmill.testing.parity import (
    assert_logits_close,
    assert_prefill_matches_hf,
    engine_prefill_logits,
)
from utils_tiny import MOE_TINY, make_tiny_hf_folder, perturb_moe

transformers = pytest.importorskip("transformers")

BLOCK, TINY = families.BLOCK, families.TINY
load_ours, random_prompts, tables = families.load_ours, families.random_prompts, families.tables

CONFIG_CLASS = {
    "MixtralForCausalLM": "MixtralConfig",
    "Qwen2MoeForCausalLM": "Qwen2MoeConfig",
    "Qwen3MoeForCausalLM": "Qwen3MoeConfig",
    "OlmoeForCausalLM": "OlmoeConfig",
}
# name -> (architecture, config overrides beyond MOE_TINY)
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral": ("MixtralForCausalLM", {}),
    "qwen2moe": ("Qwen2MoeForCausalLM", {}),  # shared expert; layer 1 dense
    "qwen2moe-norm": ("Qwen2MoeForCausalLM", dict(norm_topk_prob=True, mlp_only_layers=[])),
    "qwen3moe": ("Qwen3MoeForCausalLM", {}),
    "qwen3moe-step2": ("Qwen3MoeForCausalLM", dict(decoder_sparse_step=2, norm_topk_prob=False)),
    "olmoe": ("OlmoeForCausalLM", {}),
    "olmoe-clip": ("OlmoeForCausalLM", dict(clip_qkv=0.5, norm_topk_prob=True)),
}
MOE_ARCHS = list(CONFIG_CLASS)
GGUF_ARCH = {
    "MixtralForCausalLM": "llama",  # llama.cpp writes Mixtral as llama with experts
    "Qwen2MoeForCausalLM": "qwen2moe",
    "Qwen3MoeForCausalLM": "qwen3moe",
    "OlmoeForCausalLM": "olmoe",
}


def make_hf(name: str) -> tuple[Any, Any]:
    arch, extra = FAMILIES[name]
    torch.manual_seed(0)
    cfg = getattr(transformers, CONFIG_CLASS[arch])(**{**TINY, **MOE_TINY[arch], **extra})
    cfg.architectures = [arch]
    hf = getattr(transformers, arch)(cfg).eval()
    perturb_moe(hf)
    return cfg, hf


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("chunk", [1000, 3])
def test_logits_match_transformers(name: str, chunk: int) -> None:
    cfg, hf = make_hf(name)
    model = load_ours(cfg.to_dict(), hf.state_dict().items())
    assert_prefill_matches_hf(model, hf, random_prompts(), BLOCK, chunk=chunk)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_router_matches_transformers(arch: str) -> None:
    """On transformers' own router logits (bf16): the same experts and the same weights, bit
    for bit, in the same dtype (Mixtral keeps them float32, the others round them to bf16)."""
    cfg = getattr(transformers, CONFIG_CLASS[arch])(**{**TINY, **MOE_TINY[arch]})
    torch.manual_seed(0)
    hf = getattr(transformers, arch)(cfg).model.layers[0].mlp.to(torch.bfloat16)
    perturb = torch.nn.init.normal_
    perturb(hf.gate.weight, std=0.5)
    mixtral = arch == "MixtralForCausalLM"  # renormalises always, keeps float32 weights
    renormalize = mixtral or bool(cfg.norm_topk_prob)
    block = SparseMoeBlock(
        64, 8, 2, 32, renormalize, torch.bfloat16, None, weights_in_act_dtype=not mixtral
    )
    x = torch.randn(29, 64).to(torch.bfloat16)
    with torch.no_grad():
        logits, hf_weights, hf_ids = hf.gate(x)
    block.gate.forward = lambda _: logits  # the same logits on both sides: the rest is compared
    weights, ids = block.routing(x)
    assert torch.equal(ids, hf_ids)
    assert weights.dtype == hf_weights.dtype
    assert torch.equal(weights, hf_weights)


def random_block(
    shared: bool, dtype: torch.dtype, renormalize: bool = True, quant: str | None = None
) -> SparseMoeBlock:
    torch.manual_seed(0)
    block = SparseMoeBlock(
        64, 8, 2, 32, renormalize, dtype, quant, shared_intermediate_size=64 if shared else None
    )
    for name, p in block.named_parameters():
        p.data.copy_(torch.randn(p.shape) * (0.5 if "gate.weight" in name else 0.1))
    for m in block.modules():
        if isinstance(m, Linear):
            if quant == "blocks" and m is not block.gate:  # int4 blocks of the dense weights
                m.load_quantized(quantize_rtn(m.weight.float(), 4))
            m.quant_method.process_after_loading(m)
    return block


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_moe_matches_dense_reference(shared: bool, dtype: torch.dtype) -> None:
    """Tokens grouped by expert give what every expert on every token, weighted by a dense
    [T, E] routing matrix, gives; each expert's view shares the stacked weights."""
    block = random_block(shared, dtype)
    e = block.experts
    assert e[3].gate_up_proj.weight.data_ptr() == e.gate_up_proj[3].data_ptr()
    assert e[5].down_proj.weight.data_ptr() == e.down_proj[5].data_ptr()
    x = torch.randn(37, 64).to(dtype)
    rows: dict[int, int] = {}  # expert -> rows it ran on
    for i, expert in enumerate(e):
        expert.register_forward_hook(lambda m, a, y, i=i: rows.__setitem__(i, a[0].shape[0]))
    with torch.inference_mode():
        got = block(x)
        _, ids = block.routing(x)
    # one call per active expert, on exactly the tokens routed to it
    assert rows == {i: int((ids == i).sum()) for i in ids.unique().tolist()}
    assert ids.unique().numel() > 4  # many experts are really used
    with torch.inference_mode():
        ref = block(x, dense_reference=True)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got, ref, atol=tol, rtol=tol)


def test_every_expert_path_equals_grouped() -> None:
    """The path CUDA graphs capture (every expert on every row, no host sync) gives the grouped
    path's result bit for bit in batch-invariant mode."""
    block = random_block(False, torch.float32)
    for m in block.modules():
        if isinstance(m, Linear):
            m.batch_invariant = True
    x = torch.randn(19, 64)
    with torch.inference_mode():
        weights, ids = block.routing(x)
        grouped = block.experts(x, weights, ids)
        assert torch.equal(block.experts.every_expert(x, weights, ids), grouped)


@pytest.mark.parametrize("quant", [None, "blocks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_moe_batch_invariant(dtype: torch.dtype, quant: str | None) -> None:
    """In batch-invariant mode a token's output is bit-identical alone, in any batch, at any
    position of it: the same experts, the same per-row matmuls, the same order of addition."""
    block = random_block(True, dtype, quant=quant)
    if quant == "blocks":
        lin = block.experts[2].down_proj
        assert lin.quant_method.describe(lin) == "int4"
    for m in block.modules():
        if isinstance(m, Linear):
            m.batch_invariant = True
    x = torch.randn(41, 64).to(dtype)
    with torch.inference_mode():
        whole = block(x)
        for i in (0, 17, 40):
            assert torch.equal(block(x[i : i + 1]), whole[i : i + 1])
        perm = torch.randperm(41, generator=torch.Generator().manual_seed(0))
        assert torch.equal(block(x[perm]), whole[perm])
        assert torch.equal(block(x[5:12]), whole[5:12])


# GGUF files, named and shaped as llama.cpp's converter writes them.


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def gguf_tensors(cfg: Any, state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The HF state (transformers' stacked experts) under llama.cpp's tensor names."""
    arch = GGUF_ARCH[cfg.architectures[0]]
    top = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    sub = {
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
        "self_attn.k_norm": "attn_k_norm", "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm", "mlp.gate": "ffn_gate_inp",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
        "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
        "mlp.shared_expert.up_proj": "ffn_up_shexp",
        "mlp.shared_expert.down_proj": "ffn_down_shexp",
        "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
    }  # fmt: skip
    out: dict[str, np.ndarray] = {}
    for name, t in state.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        arr = t.float().numpy()
        base, _, kind = name.rpartition(".")
        if base in top:
            out[f"{top[base]}.{kind}"] = arr
            continue
        _, _, i, rest = name.split(".", 3)  # model.layers.{i}.{rest}
        if rest == "mlp.experts.gate_up_proj":  # [E, 2 I, hidden]: gate rows, then up rows
            gate, up = np.split(arr, 2, axis=1)
            out[f"blk.{i}.ffn_gate_exps.weight"] = np.ascontiguousarray(gate)
            out[f"blk.{i}.ffn_up_exps.weight"] = np.ascontiguousarray(up)
            continue
        if rest == "mlp.experts.down_proj":
            out[f"blk.{i}.ffn_down_exps.weight"] = arr
            continue
        base, _, kind = rest.rpartition(".")
        if arch == "llama" and base in ("self_attn.q_proj", "self_attn.k_proj"):
            heads = cfg.num_attention_heads if "q_proj" in base else cfg.num_key_value_heads
            arr = _llamacpp_permute(arr, heads)
        if base == "mlp.shared_expert_gate":
            arr = arr.reshape(-1)  # llama.cpp's tensor is {n_embd}
        out[f"blk.{i}.{sub[base]}.{kind}"] = arr
    return out


def write_moe_gguf(
    path: Path,
    cfg: Any,
    state: dict[str, torch.Tensor],
    qtype: Any = None,
    legacy_experts: bool = False,
) -> Path:
    """`state` as a GGUF file; attention and expert matrices in `qtype` (F32 when None), the
    routers, norms and embeddings in F32 (llama.cpp keeps ffn_gate_inp unquantized).
    `legacy_experts`: one 2-D tensor per expert (`blk.N.ffn_gate.E.weight`), as llama.cpp
    wrote Mixtral before it stacked them."""
    arch = GGUF_ARCH[cfg.architectures[0]]
    w = gguf.GGUFWriter(path, arch)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_expert_count(getattr(cfg, "num_local_experts", None) or cfg.num_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    if arch in ("qwen2moe", "qwen3moe"):
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    # where absent, the reader takes llama.cpp's choice for the architecture (OLMoE: off)
    if arch != "llama" and (arch != "olmoe" or cfg.norm_topk_prob):
        w.add_expert_weights_norm(cfg.norm_topk_prob)
    if arch == "qwen2moe":
        w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    if getattr(cfg, "clip_qkv", None) is not None:
        w.add_clamp_kqv(cfg.clip_qkv)
    w.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    w.add_bos_token_id(cfg.bos_token_id or 1)
    w.add_eos_token_id(cfg.eos_token_id or 2)
    tensors = gguf_tensors(cfg, state)
    if legacy_experts:
        for name in [n for n in tensors if "_exps." in n]:
            stacked = tensors.pop(name)
            blk, proj = name.removesuffix("_exps.weight").split(".ffn_")
            for e, matrix in enumerate(stacked):
                tensors[f"{blk}.ffn_{proj}.{e}.weight"] = matrix
    for name, arr in tensors.items():
        matrix = arr.ndim >= 2 and "ffn_gate_inp" not in name and "token_embd" not in name
        if qtype is None or not matrix:
            w.add_tensor(name, arr)
        else:
            w.add_tensor(name, gguf.quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("name", list(FAMILIES))
def test_gguf_f32_matches_transformers(tmp_path: Path, name: str) -> None:
    cfg, hf = make_hf(name)
    f = read_gguf(write_moe_gguf(tmp_path / f"{name}.gguf", cfg, hf.state_dict()))
    got_cfg = f.hf_config()
    assert got_cfg["architectures"] == cfg.architectures
    assert got_cfg["num_experts_per_tok"] == 2
    names = {n for n, _ in f.iter_tensors()}
    assert "model.layers.0.mlp.experts.7.down_proj.weight" in names or name.endswith("step2")
    model = load_ours(got_cfg, f.iter_tensors())
    assert_prefill_matches_hf(model, hf, random_prompts(), BLOCK, chunk=5)


def test_gguf_legacy_per_expert_tensors(tmp_path: Path) -> None:
    """Mixtral with one tensor per expert (older llama.cpp files) loads as the stacked one."""
    cfg, hf = make_hf("mixtral")
    f = read_gguf(write_moe_gguf(tmp_path / "m.gguf", cfg, hf.state_dict(), legacy_experts=True))
    assert f.has_tensor("blk.1.ffn_down.7.weight") and not f.has_tensor(
        "blk.1.ffn_down_exps.weight"
    )
    model = load_ours(f.hf_config(), f.iter_tensors())
    assert_prefill_matches_hf(model, hf, random_prompts(), BLOCK, chunk=5)


@pytest.mark.parametrize(("name", "qtype"), [("qwen2moe", "Q8_0"), ("mixtral", "Q4_0"),
                                             ("olmoe", "Q4_1")])  # fmt: skip
def test_gguf_quantized_experts_stay_quantized(tmp_path: Path, name: str, qtype: str) -> None:
    """Each expert's blocks reach its linear layer as stored (a view of the stacked tensor's
    blocks) and give the logits of the same blocks dequantized, up to the kernel's int8
    activations."""
    cfg, hf = make_hf(name)
    q = getattr(gguf.GGMLQuantizationType, qtype)
    f = read_gguf(write_moe_gguf(tmp_path / f"{name}.gguf", cfg, hf.state_dict(), q))
    assert f.tensor_type("blk.0.ffn_up_exps.weight") == qtype
    blocks = load_ours(f.hf_config(), f.iter_tensors(keep_quantized=True), quant="blocks")
    dense = load_ours(f.hf_config(), f.iter_tensors())
    moe = blocks.model.layers[0].mlp
    for expert in (moe.experts[0], moe.experts[7]):
        for lin in (expert.gate_up_proj, expert.down_proj):
            assert lin.quant_method.describe(lin) == qtype
    assert moe.gate.quant_method.describe(moe.gate) == "float32"  # the router stays dense
    assert moe.experts.gate_up_proj is None  # no dense stack beside the blocks
    families.assert_close_to_dequantized(blocks, dense)


# Through the engine: HF folders (as save_pretrained writes them) with the default tokenizer.

NUM_TOKENS = 12


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-moe")
    return {arch: make_tiny_hf_folder(root, arch) for arch in MOE_ARCHS}


prompt_ids = families.prompt_ids


@pytest.mark.slow
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_greedy_matches_transformers(folders, make_llm, arch: str) -> None:
    assert arch in SUPPORTED_ARCHITECTURES
    families.check_greedy_matches_transformers(make_llm, folders[arch], arch, NUM_TOKENS)


@pytest.mark.parametrize("arch", ["MixtralForCausalLM", "Qwen2MoeForCausalLM"])
def test_engine_invariances(folders, make_llm, arch: str) -> None:
    families.check_engine_invariances(make_llm, folders[arch], NUM_TOKENS, max_model_len=28)


def test_gguf_matches_safetensors_twin(tmp_path: Path, folders, make_llm) -> None:
    """The Qwen2-MoE folder (shared expert, a dense layer) as an F32 GGUF gives its logits."""
    folder = folders["Qwen2MoeForCausalLM"]
    cfg = transformers.AutoConfig.from_pretrained(str(folder))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    path = write_moe_gguf(tmp_path / "twin.gguf", cfg, hf.state_dict())
    small = dict(dtype="float32", kv_cache_memory_gb=0.02)
    twin = make_llm(model=str(folder), **small)
    ours = make_llm(model=str(path), tokenizer=str(folder), **small)
    prompts = prompt_ids(folder)
    got = engine_prefill_logits(ours, prompts, chunk=3)
    for g, r in zip(got, engine_prefill_logits(twin, prompts), strict=True):
        assert_logits_close(g, r, atol=1e-4, rtol=1e-4)


def test_int8_at_load_quantizes_experts(folders, make_llm) -> None:
    """quantization="int8" takes Mixtral's w1 / w2 / w3 experts (the router stays dense) and
    gives the dense model's logits up to the rounding."""
    folder = str(folders["MixtralForCausalLM"])
    small = dict(dtype="float32", kv_cache_memory_gb=0.02)
    int8 = make_llm(model=folder, quantization="int8", **small)
    moe = int8.engine.runner.model.model.layers[1].mlp
    for lin in (moe.experts[0].gate_up_proj, moe.experts[7].down_proj):
        assert lin.quant_method.describe(lin) == "int8"
    assert moe.gate.quant_method.describe(moe.gate) == "float32"
    dense = make_llm(model=folder, **small)
    prompts = prompt_ids(folders["MixtralForCausalLM"])
    got = torch.cat(engine_prefill_logits(int8, prompts))  # [positions, vocab]
    ref = torch.cat(engine_prefill_logits(dense, prompts))
    assert (got - ref).abs().max().item() < 0.05 * ref.abs().max().item()
    # Random tiny weights give near-flat logits over 49k tokens, whose argmax near-ties flip
    # under any rounding: compare each position's whole logit vector instead.
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1)
    assert cos.min().item() > 0.99, cos


def test_gguf_q4_0_expert_parallel_matches_tp1(tmp_path: Path, folders) -> None:
    """Tiny Mixtral as a Q4_0 GGUF at TP=2 with expert parallelism: each rank keeps 4 whole
    experts in their blocks (views of the stacked tensors); the logits are TP=1's bit for
    bit (o_proj gathers, top-2 partials over 2 ranks sum exactly) and so are the tokens."""
    from tokenmill import LLM, SamplingParams

    folder = folders["MixtralForCausalLM"]
    cfg = transformers.AutoConfig.from_pretrained(str(folder))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    q4 = gguf.GGMLQuantizationType.Q4_0
    path = write_moe_gguf(tmp_path / "mixtral-q4_0.gguf", cfg, hf.state_dict(), q4)
    kw: dict[str, Any] = dict(model=str(path), tokenizer=str(folder), dtype="float32")
    one = LLM(**kw)
    two = LLM(**kw, tensor_parallel_size=2, enable_expert_parallel=True)
    try:
        moe = two.engine.runner.model.model.layers[0].mlp
        assert len(moe.experts) == 4
        down = moe.experts[3].down_proj
        assert down.quant_method.describe(down) == "Q4_0"
        seen: list[list[torch.Tensor]] = [[], []]

        def recording(inner: Any, out: list[torch.Tensor]) -> Any:
            def record(hidden: torch.Tensor) -> torch.Tensor:
                out.append(inner(hidden))
                return out[-1]

            return record

        for llm, out in zip((one, two), seen, strict=True):
            model = llm.engine.runner.model
            model.compute_logits = recording(model.compute_logits, out)
        params = SamplingParams(max_tokens=6, temperature=0)
        prompts = ["The capital of France is", "1, 2, 3,"]
        tokens = [
            [o.outputs[0].token_ids for o in llm.generate(prompts, params)] for llm in (one, two)
        ]
        assert tokens[0] == tokens[1]
        assert len(seen[0]) == len(seen[1]) == 6
        for a, b in zip(*seen, strict=True):
            assert torch.equal(a, b)
    finally:
        two.engine.shutdown()

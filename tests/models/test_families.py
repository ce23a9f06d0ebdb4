"""Qwen3 and Phi-3/Phi-4 on tiny random-weight models (fp32) against transformers' own models:
logits through the paged cache with chunked prompts, greedy tokens through `LLM`, GGUF files
written from the same weights, and the engine's invariances (batch, preemption, prefix cache)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.cli import main as cli_main
from tokenmill.config import ModelConfig
from tokenmill.errors import ModelLoadError
from tokenmill.layers.linear import Linear
from tokenmill.loader.gguf import read_gguf
from tokenmill.models.registry import SUPPORTED_ARCHITECTURES, build_model
from tokenmill.testing.parity import (
    assert_logits_close,
    assert_prefill_matches_hf,
    bind_kv_cache,
    engine_prefill_logits,
    greedy_tokens,
    hf_greedy,
    prefill_logits,
)
from utils_tiny import make_tiny_hf_folder

transformers = pytest.importorskip("transformers")

BLOCK = 4
VOCAB = 256
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    # Phi3Config's default pad and end ids (32000) are outside the tiny vocabulary
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
# name -> (config class, architecture, config overrides)
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    # head_dim 32 given explicitly: q is 128 wide where hidden is 64
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32, tie_word_embeddings=True)),
    "qwen3-bias": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        dict(head_dim=16, attention_bias=True, tie_word_embeddings=False),
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(tie_word_embeddings=False)),
    "phi3-tied": ("Phi3Config", "Phi3ForCausalLM", dict(tie_word_embeddings=True)),
    # Phi-4-mini: RoPE over the first 3/4 of each head
    "phi4-mini-partial": ("Phi3Config", "Phi3ForCausalLM", dict(partial_rotary_factor=0.75)),
    # Phi-3 128k: longrope factors. Our tables use the long ones (the context exceeds the
    # original max); transformers does for prompts longer than it: every prompt here (> 6)
    "phi3-longrope": (
        "Phi3Config",
        "Phi3ForCausalLM",
        dict(
            original_max_position_embeddings=6,
            rope_scaling={
                "type": "longrope",
                "short_factor": [1.0 + 0.25 * i for i in range(8)],
                "long_factor": [1.0 + 2.0 * i for i in range(8)],
            },
        ),
    ),
    # windows shorter than the prompts: Phi-3 windows every layer, Qwen3 the layers from
    # max_window_layers on
    "phi3-window": ("Phi3Config", "Phi3ForCausalLM", dict(sliding_window=8)),
    "qwen3-window": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        dict(head_dim=16, use_sliding_window=True, sliding_window=8, max_window_layers=1),
    ),
}
ARCHS = ["Qwen3ForCausalLM", "Phi3ForCausalLM"]
GGUF_ARCH = {"Qwen3ForCausalLM": "qwen3", "Phi3ForCausalLM": "phi3"}


def make_hf(name: str) -> tuple[Any, Any]:
    cfg_cls, arch, extra = FAMILIES[name]
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_cls)(**TINY, **extra)
    cfg.architectures = [arch]
    hf = getattr(transformers, arch)(cfg).eval()
    with torch.no_grad():  # away from their init (ones, zeros), so these weights really count
        for layer in hf.model.layers:
            attn = layer.self_attn
            for norm in (getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)):
                if norm is not None:
                    torch.nn.init.normal_(norm.weight, mean=1.0, std=0.3)
            for proj in (getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
                if proj is not None and proj.bias is not None:
                    torch.nn.init.normal_(proj.bias, std=0.5)
    return cfg, hf


def load_ours(hf_cfg: dict[str, Any], weights: Any, quant: str | None = None) -> torch.nn.Module:
    mcfg = ModelConfig.from_hf_dict(hf_cfg)
    model = build_model(mcfg, torch.float32, 256, quant)
    model.load_weights(weights)
    for m in model.modules():
        if isinstance(m, Linear):
            m.quant_method.process_after_loading(m)
    bind_kv_cache(model, mcfg, BLOCK)
    return model


def random_prompts(lengths: tuple[int, ...] = (23, 7, 40)) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def tables(n: int) -> list[list[int]]:
    return [list(range(i * 16, (i + 1) * 16)) for i in range(n)]  # 16 blocks per prompt


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("chunk", [1000, 5, 1])
def test_logits_match_transformers(name: str, chunk: int) -> None:
    cfg, hf = make_hf(name)
    model = load_ours(cfg.to_dict(), hf.state_dict().items())
    assert_prefill_matches_hf(model, hf, random_prompts(), BLOCK, chunk=chunk)


def test_phi3_loads_fused_weights_as_stored() -> None:
    cfg, hf = make_hf("phi3")
    names = set(hf.state_dict())
    assert "model.layers.0.self_attn.qkv_proj.weight" in names
    assert "model.layers.0.mlp.gate_up_proj.weight" in names
    assert not any("q_proj" in n or "gate_proj" in n for n in names)
    model = load_ours(cfg.to_dict(), hf.state_dict().items())
    ours = dict(model.named_parameters())
    for n in ("self_attn.qkv_proj.weight", "mlp.gate_up_proj.weight"):
        key = f"model.layers.1.{n}"
        assert torch.equal(ours[key], hf.state_dict()[key])
    # a checkpoint missing one of them is refused, not left at its random init
    partial = [(n, t) for n, t in hf.state_dict().items() if "layers.1.mlp.gate_up" not in n]
    with pytest.raises(ModelLoadError, match="missing"):
        load_ours(cfg.to_dict(), partial)


# GGUF files written from the tiny models, as llama.cpp's converter names and shapes them.


def write_gguf(path: Path, cfg: Any, state: dict[str, torch.Tensor], qtype: Any = None) -> Path:
    """`state` (HF names) as a GGUF file of `cfg`'s architecture; 2-D weights in `qtype` (F32
    when None), norms in F32. Qwen3 and Phi-3 q/k rows are stored unpermuted (NeoX RoPE)."""
    arch = GGUF_ARCH[cfg.architectures[0]]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)
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
    rope = cfg.rope_parameters
    w.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    if rope.get("rope_type") == "longrope":  # llama.cpp's phi3: the factors as two tensors
        w.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], np.float32))
        w.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], np.float32))
        w.add_rope_scaling_orig_ctx_len(cfg.original_max_position_embeddings)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    if arch == "phi3" and cfg.sliding_window is not None:
        w.add_sliding_window(cfg.sliding_window)
    w.add_bos_token_id(cfg.bos_token_id or 1)
    w.add_eos_token_id(cfg.eos_token_id or 2)
    for name, t in state.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        base, _, kind = name.rpartition(".")
        arr = t.float().numpy()
        gname = f"{names.get_name(base)}.{kind}"
        if qtype is None or arr.ndim != 2:
            w.add_tensor(gname, arr)
        else:
            w.add_tensor(gname, gguf.quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# llama.cpp's qwen3 has no sliding-window metadata
@pytest.mark.parametrize("name", [n for n in FAMILIES if n != "qwen3-window"])
def test_gguf_f32_matches_transformers(tmp_path: Path, name: str) -> None:
    cfg, hf = make_hf(name)
    f = read_gguf(write_gguf(tmp_path / f"{name}.gguf", cfg, hf.state_dict()))
    got_cfg = f.hf_config()
    assert got_cfg["architectures"] == cfg.architectures
    assert got_cfg["head_dim"] == getattr(cfg, "head_dim", 16)
    assert got_cfg["tie_word_embeddings"] == cfg.tie_word_embeddings
    if name == "phi3-longrope":  # the factor tensors back as HF's lists
        rope = cfg.rope_parameters
        assert got_cfg["rope_scaling"]["rope_type"] == "longrope"
        assert got_cfg["rope_scaling"]["long_factor"] == rope["long_factor"]
        assert got_cfg["rope_scaling"]["short_factor"] == rope["short_factor"]
    if name == "phi4-mini-partial":
        assert got_cfg["partial_rotary_factor"] == 0.75
    names = {f.hf_name(n) for n in f._tensors}
    if cfg.architectures == ["Phi3ForCausalLM"]:  # fused, as stored: ffn_up holds gate and up
        assert "model.layers.0.self_attn.qkv_proj.weight" in names
        assert "model.layers.0.mlp.gate_up_proj.weight" in names
    else:
        assert "model.layers.0.self_attn.q_norm.weight" in names
    model = load_ours(got_cfg, f.iter_tensors())
    assert_prefill_matches_hf(model, hf, random_prompts(), BLOCK, chunk=5)


@pytest.mark.parametrize("name", ["qwen3", "phi3"])
def test_gguf_q8_0_stays_quantized(tmp_path: Path, name: str) -> None:
    """Q8_0 blocks reach the fused layers as stored (no dequantize, no re-split) and give the
    logits of the same blocks dequantized, up to the kernel's int8 activations."""
    cfg, hf = make_hf(name)
    q8_0 = gguf.GGMLQuantizationType.Q8_0
    f = read_gguf(write_gguf(tmp_path / f"{name}.gguf", cfg, hf.state_dict(), q8_0))
    blocks = load_ours(f.hf_config(), f.iter_tensors(keep_quantized=True), quant="blocks")
    dense = load_ours(f.hf_config(), f.iter_tensors())
    layer = blocks.model.layers[0]
    for lin in (layer.self_attn.qkv_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
        assert lin.quant_method.describe(lin) == "Q8_0"
    assert_close_to_dequantized(blocks, dense)


def assert_close_to_dequantized(blocks: torch.nn.Module, dense: torch.nn.Module) -> None:
    """The model on quantized blocks gives the logits of the same blocks dequantized, up to the
    kernel's int8 activations."""
    prompts = random_prompts()
    got = prefill_logits(blocks, prompts, tables(len(prompts)), BLOCK, chunk=5)
    ref = prefill_logits(dense, prompts, tables(len(prompts)), BLOCK, chunk=5)
    for g, r in zip(got, ref, strict=True):
        scale = r.abs().max().item()
        assert (g - r).abs().max().item() < 0.05 * scale
        assert (g.argmax(-1) == r.argmax(-1)).float().mean().item() >= 0.9


# Through the engine: HF folders with the default tokenizer.

PROMPT_TEXTS = ["The capital of France is", "def fibonacci(n):", "1, 2, 3,"]
NUM_TOKENS = 16


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-families")
    return {arch: make_tiny_hf_folder(root, arch) for arch in ARCHS}


def prompt_ids(folder: Path) -> list[list[int]]:
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    return [tok(p)["input_ids"] for p in PROMPT_TEXTS]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers(folders, make_llm, arch: str) -> None:
    check_greedy_matches_transformers(make_llm, folders[arch], arch, NUM_TOKENS)


def check_greedy_matches_transformers(make_llm, folder: Path, arch: str, num_tokens: int) -> None:
    """The engine on the folder loads as `arch` and gives transformers' greedy tokens."""
    llm = make_llm(model=str(folder), dtype="float32", kv_cache_memory_gb=0.02)
    assert llm.engine.model_config.architecture == arch
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    prompts = prompt_ids(folder)
    got = greedy_tokens(llm, prompts, num_tokens)
    for p, ours in zip(prompts, got, strict=True):
        assert ours == hf_greedy(hf.eval(), p, num_tokens)


@pytest.mark.parametrize("arch", ARCHS)
def test_engine_invariances(folders, make_llm, arch: str) -> None:
    check_engine_invariances(make_llm, folders[arch], NUM_TOKENS, max_model_len=32)


def check_engine_invariances(make_llm, folder: Path, num_tokens: int, max_model_len: int) -> None:
    """Alone or in a batch (batch_invariant), preempted for want of KV blocks, or resumed from
    the prefix cache: the same greedy tokens."""
    prompts = prompt_ids(folder)
    kw = dict(model=str(folder), dtype="float32", batch_invariant=True, block_size=4)
    llm = make_llm(**kw, kv_cache_memory_gb=0.02)
    together = greedy_tokens(llm, prompts, num_tokens)
    alone = [greedy_tokens(llm, [p], num_tokens)[0] for p in prompts]
    assert together == alone
    # Prefix cache: the same prompts again start from their cached blocks.
    hits = llm.engine.scheduler.kv_cache_manager.prefix_hits
    assert greedy_tokens(llm, prompts, num_tokens) == together
    assert llm.engine.scheduler.kv_cache_manager.prefix_hits > hits
    # Preemption: 8 blocks of 4 tokens cannot hold the three requests at once.
    small = make_llm(
        **kw, num_kv_blocks=8, max_model_len=max_model_len, enable_prefix_caching=False
    )
    assert greedy_tokens(small, prompts, num_tokens) == together
    assert small.engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_gguf_matches_safetensors_twin(tmp_path: Path, folders, make_llm, arch: str) -> None:
    """The tiny folder written as an F32 GGUF (tokenizer from the folder) gives its logits."""
    folder = folders[arch]
    cfg = transformers.AutoConfig.from_pretrained(str(folder))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    path = write_gguf(tmp_path / "twin.gguf", cfg, hf.state_dict())
    small = dict(dtype="float32", kv_cache_memory_gb=0.02)
    twin = make_llm(model=str(folder), **small)
    ours = make_llm(model=str(path), tokenizer=str(folder), **small)
    prompts = prompt_ids(folder)
    got = engine_prefill_logits(ours, prompts, chunk=3)
    for g, r in zip(got, engine_prefill_logits(twin, prompts), strict=True):
        assert_logits_close(g, r, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("arch", "window"), [(a, None) for a in ARCHS] + [("MistralForCausalLM", 6)]
)
def test_bf16_fused_decode(tmp_path: Path, monkeypatch, arch: str, window: int | None) -> None:
    """bf16 int4: the whole-layer C++ decode takes Phi-3's and Qwen3's layers (with its
    q/k norms) and Mistral's with a sliding window shorter than the prompts, and the tokens
    are those of the plain PyTorch code."""
    from tokenmill.kernels.cpu_fused import load_cpu_fused

    if load_cpu_fused() is None:
        pytest.skip("the fused CPU ops cannot be built here")
    extra: dict[str, Any] = {"head_dim": 64} if arch == "Qwen3ForCausalLM" else {}
    if window is not None:
        extra["sliding_window"] = window
    folder = make_tiny_hf_folder(tmp_path, arch, hidden_size=256, intermediate_size=512, **extra)
    kwargs = dict(
        model=str(folder), dtype="bfloat16", quantization="int4", max_num_batched_tokens=8,
        kv_cache_memory_gb=0.05,
    )  # fmt: skip
    prompts = [{"prompt_token_ids": p} for p in ([1, 5, 9, 200, 31, 7], list(range(3, 14)))]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    fused_llm = LLM(**kwargs)
    fused_out = fused_llm.generate(prompts, params, use_tqdm=False)
    active = [layer.fused_decode.active for layer in fused_llm.engine.runner.model.model.layers]
    assert active and all(active)
    for module in ("layers.fused_decode", "layers.norm", "models.llama"):  # Qwen3 uses llama.py's
        monkeypatch.setattr(f"tokenmill.{module}.fused_ops", lambda x: None)
    plain_out = LLM(**kwargs).generate(prompts, params, use_tqdm=False)
    for a, b in zip(fused_out, plain_out, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids


def test_list_architectures(capsys) -> None:
    assert {"Qwen3ForCausalLM", "Phi3ForCausalLM"} <= set(SUPPORTED_ARCHITECTURES)
    with pytest.raises(SystemExit) as exit_info:  # like --version: print, then exit
        cli_main(["--list-architectures"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for arch in SUPPORTED_ARCHITECTURES:
        assert arch in out
    assert "qwen3" in out and "phi3" in out  # the GGUF architectures


# Sliding windows through the engine: uniform (Mistral: the KV behind the window is released)
# and interleaved with global layers (Gemma 2 and 3: released in the windowed layers' KV group,
# every block kept in the global layers' group).
WINDOWED_ENGINES = {
    "mistral": ("MistralForCausalLM", dict(sliding_window=8)),
    "gemma2": ("Gemma2ForCausalLM", dict(sliding_window=8, head_dim=16, query_pre_attn_scalar=16)),
    "gemma3": (
        "Gemma3ForCausalLM",
        dict(sliding_window=8, head_dim=16, query_pre_attn_scalar=16, num_hidden_layers=3,
             sliding_window_pattern=3),
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(WINDOWED_ENGINES))
def test_windowed_engine_invariances(tmp_path: Path, make_llm, name: str) -> None:
    """Prompts and outputs past the window: alone or in a batch (batch_invariant), preempted
    for want of KV blocks, or resumed from the prefix cache, the same greedy tokens."""
    arch, overrides = WINDOWED_ENGINES[name]
    folder = make_tiny_hf_folder(tmp_path, arch, **overrides)
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    texts = [
        "A long road winds past the mill and the river, then",
        "def fibonacci(n):",
        "Seven bridges cross the old town's canals, and each of them",
    ]
    prompts = [tok(t)["input_ids"] for t in texts]
    kw = dict(model=str(folder), dtype="float32", batch_invariant=True, block_size=4)
    llm = make_llm(**kw, kv_cache_memory_gb=0.02)
    windows = [g.sliding_window for g in llm.engine.runner.kv_groups]
    assert windows == ([8] if name == "mistral" else [None, 8])
    together = greedy_tokens(llm, prompts, NUM_TOKENS)
    assert together == [greedy_tokens(llm, [p], NUM_TOKENS)[0] for p in prompts]
    kv = llm.engine.scheduler.kv_cache_manager
    hits = kv.prefix_hits
    assert greedy_tokens(llm, prompts, NUM_TOKENS) == together
    assert kv.prefix_hits > hits
    small = make_llm(**kw, num_kv_blocks=10, max_model_len=40, enable_prefix_caching=False)
    assert greedy_tokens(small, prompts, NUM_TOKENS) == together
    # Gemma's global layers keep every block, so their group's 10 cannot hold the three requests
    # at once; with Mistral's blocks released behind the window they run side by side.
    assert (small.engine.scheduler.num_preemptions > 0) == (name != "mistral")

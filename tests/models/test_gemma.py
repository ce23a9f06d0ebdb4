"""Gemma 2 and Gemma 3 (text) against transformers' own models on tiny random configs (fp32):
logits through the paged cache with prompts several windows long, whole and chunked, on the
PyTorch backends; greedy tokens through the engine (`LLM`) from a saved HF folder."""

from __future__ import annotations

import copy

import pytest
import torch

from tokenmill import LLM
from tokenmill.config import ModelConfig
from tokenmill.layers.attn_backends.sdpa import SdpaBackend
from tokenmill.layers.attn_backends.unified import UnifiedRefBackend
from tokenmill.models.gemma import GemmaRMSNorm
from tokenmill.models.registry import build_model
from tokenmill.testing.parity import (
    assert_logits_close,
    assert_prefill_matches_hf,
    bind_kv_cache,
    greedy_tokens,
    hf_greedy,
    hf_logits,
    prefill_logits,
)
from utils_tiny import make_tiny_hf_folder

transformers = pytest.importorskip("transformers")

BLOCK = 4
WINDOW = 6

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    sliding_window=WINDOW,
    query_pre_attn_scalar=24,  # not head_dim: the scale is really query_pre_attn_scalar ** -0.5
)

CONFIGS = {
    # alternating local/global; caps small enough to bite on random weights
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(attn_logit_softcapping=1.5, final_logit_softcapping=2.0),
    ),
    "gemma2-default-caps": ("Gemma2Config", "Gemma2ForCausalLM", {}),
    # one global layer in three; local RoPE base apart from the global one, which is scaled
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(
            layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
            num_hidden_layers=6,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            },
        ),
    ),
}


def randomize_norms(hf) -> None:
    """HF initialises Gemma norms to 0 (a (1 + 0) scale); random offsets test the (1 + w)."""
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                torch.nn.init.normal_(p, std=0.3)


def make_hf(name: str, **overrides):
    cfg_cls, model_cls, extra = CONFIGS[name]
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_cls)(**{**TINY, **copy.deepcopy(extra), **overrides})
    cfg.architectures = [model_cls]
    cfg._attn_implementation = "eager"  # transformers' SDPA path has no soft-cap
    hf = getattr(transformers, model_cls)(cfg).eval()
    randomize_norms(hf)
    return cfg, hf


def make_ours(cfg, hf, backend):
    mcfg = ModelConfig.from_hf_dict(cfg.to_dict())
    model = build_model(mcfg, torch.float32, 256)
    model.load_weights(hf.state_dict().items())
    bind_kv_cache(model, mcfg, BLOCK, backend)
    return model


def test_layer_types_windows_scales_and_caps() -> None:
    cfg, hf = make_hf("gemma3")
    model = make_ours(cfg, hf, SdpaBackend())
    attns = [layer.self_attn.attn for layer in model.model.layers]
    assert [a.sliding_window for a in attns] == [WINDOW, WINDOW, None] * 2
    assert all(a.scale == 24**-0.5 and a.softcap is None for a in attns)
    local, glob = model.model.layers[0].self_attn.rotary, model.model.layers[2].self_attn.rotary
    assert local is model.model.layers[1].self_attn.rotary and local is not glob
    cfg2, hf2 = make_hf("gemma2")
    model2 = make_ours(cfg2, hf2, SdpaBackend())
    attns2 = [layer.self_attn.attn for layer in model2.model.layers]
    assert [a.sliding_window for a in attns2] == [WINDOW, None, WINDOW, None]
    assert all(a.softcap == 1.5 for a in attns2) and model2.final_logit_softcapping == 2.0
    assert model2.model.layers[0].self_attn.q_norm is None
    assert model.model.layers[0].self_attn.q_norm is not None


@pytest.mark.parametrize("backend", ["sdpa", "unified-ref"])
@pytest.mark.parametrize("chunk", [1000, 5, 1])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name: str, chunk: int, backend: str) -> None:
    """Prompts of up to 5 windows, `chunk` tokens a step, each chunk reading the earlier ones
    (and the window's keys) through the paged cache."""
    cfg, hf = make_hf(name)
    model = make_ours(cfg, hf, SdpaBackend() if backend == "sdpa" else UnifiedRefBackend())
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (30, 5, 19)]
    assert_prefill_matches_hf(model, hf, prompts, BLOCK, chunk)


def test_norm_multiplies_by_one_plus_weight_in_fp32() -> None:
    """bf16 input: normalized and scaled by (1 + w) in fp32, rounded once at the end (HF)."""
    norm = GemmaRMSNorm(8, 1e-6, torch.bfloat16)
    norm.weight.data = torch.linspace(-0.5, 0.5, 8).to(torch.bfloat16)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    xf = x.float()
    expected = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
    expected = (expected * (1.0 + norm.weight.float())).to(torch.bfloat16)
    torch.testing.assert_close(norm(x), expected, atol=0, rtol=2**-8)


@pytest.mark.parametrize("arch", ["Gemma2ForCausalLM", "Gemma3ForCausalLM"])
def test_greedy_tokens_match_transformers(tmp_path, arch: str) -> None:
    """The engine end to end (default CPU backend, chunked prefill) on prompts longer than the
    window: the same greedy tokens as transformers' generate."""
    extra = dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=16, vocab_size=49152)
    if arch == "Gemma2ForCausalLM":
        extra |= dict(attn_logit_softcapping=5.0, final_logit_softcapping=10.0)
    else:
        extra |= dict(num_hidden_layers=3, sliding_window_pattern=3)
    folder = make_tiny_hf_folder(tmp_path, arch, **extra)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 49152, (n,), generator=g).tolist() for n in (27, 5, 40)]
    llm = LLM(model=str(folder), dtype="float32", max_num_batched_tokens=16, block_size=4)
    ours = greedy_tokens(llm, prompts, 12)
    for p, got in zip(prompts, ours, strict=True):
        assert got == hf_greedy(hf, p, 12)


# HF parameter (after "model.layers.N.") -> llama.cpp tensor name, as its converter writes them
_GGUF_LAYER = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
}  # fmt: skip


def write_gemma_gguf(path, cfg, hf) -> None:
    """The tiny model as llama.cpp's converter writes it: its tensor names, norms stored as
    1 + w, tied embeddings without output.weight, the metadata it writes (no
    query_pre_attn_scalar)."""
    import gguf

    arch = "gemma2" if cfg.model_type == "gemma2" else "gemma3"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_sliding_window(cfg.sliding_window)
    if arch == "gemma2":
        w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    else:
        full = cfg.rope_parameters["full_attention"]
        w.add_rope_freq_base(full["rope_theta"])
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(full["factor"])
        w.add_sliding_window_pattern([t == "sliding_attention" for t in cfg.layer_types])
    w.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight":
            continue
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        else:
            _, _, i, rest = name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            gname = f"blk.{i}.{_GGUF_LAYER[module]}.{kind}"
        arr = t.float().numpy()
        w.add_tensor(gname, arr + 1.0 if name.endswith("norm.weight") else arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_gguf_matches_the_safetensors_twin(tmp_path, name: str) -> None:
    """A GGUF written from the tiny model loads to the same config and weights (norms back to
    w, up to the fp32 rounding of 1 + w) and gives the same logits."""
    from tokenmill.loader.gguf import read_gguf

    # llama.cpp assumes query_pre_attn_scalar = head_dim below the 27B sizes, and a local
    # RoPE base of 10000 for Gemma 3
    overrides: dict = dict(query_pre_attn_scalar=TINY["head_dim"])
    if name == "gemma3":
        rope = copy.deepcopy(CONFIGS[name][2]["rope_parameters"])
        rope["sliding_attention"]["rope_theta"] = 10000.0
        overrides["rope_parameters"] = rope
    cfg, hf = make_hf(name, **overrides)
    path = tmp_path / f"{name}.gguf"
    write_gemma_gguf(path, cfg, hf)
    f = read_gguf(path)
    mcfg = ModelConfig.from_hf_dict(f.hf_config())
    assert mcfg.architecture == type(hf).__name__ and mcfg.tie_word_embeddings
    model = build_model(mcfg, torch.float32, 256)
    model.load_weights(f.iter_tensors())
    twin = make_ours(cfg, hf, SdpaBackend())
    bind_kv_cache(model, mcfg, BLOCK)
    for i, layer in enumerate(model.model.layers):
        theirs = twin.model.layers[i].self_attn.attn
        ours = layer.self_attn.attn
        assert (ours.sliding_window, ours.scale, ours.softcap) == (
            theirs.sliding_window, theirs.scale, theirs.softcap
        )  # fmt: skip
        assert torch.equal(layer.self_attn.rotary.cos, twin.model.layers[i].self_attn.rotary.cos)
    assert model.final_logit_softcapping == twin.final_logit_softcapping
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (25, 9)]
    tables = [list(range(i * 16, (i + 1) * 16)) for i in range(len(prompts))]
    got = prefill_logits(model, prompts, tables, BLOCK, chunk=7)
    want = prefill_logits(twin, prompts, tables, BLOCK, chunk=7)
    for a, b, p in zip(got, want, prompts, strict=True):
        assert_logits_close(a, b, atol=1e-5, rtol=1e-5)
        assert_logits_close(a, hf_logits(hf, p), atol=1e-4, rtol=1e-4)

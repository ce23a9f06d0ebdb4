"""Tiny random-weight Hugging Face model folders for loader and end-to-end tests.

`make_tiny_hf_folder(tmp_path)` writes config.json, safetensors weights (optionally sharded with
an index) and the default model's tokenizer (SmolLM2's, vocabulary 49152), so a folder loads
through `LLM(model=folder)` and through transformers' `from_pretrained` alike.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

TINY_VOCAB = 49152  # the default model's tokenizer

TINY = dict(
    vocab_size=TINY_VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
)

_CONFIG_CLASSES = {  # architecture -> (config class, weight seed)
    "LlamaForCausalLM": ("LlamaConfig", 0),
    "Qwen2ForCausalLM": ("Qwen2Config", 1),
    "MistralForCausalLM": ("MistralConfig", 2),
    "Gemma2ForCausalLM": ("Gemma2Config", 3),
    "Gemma3ForCausalLM": ("Gemma3TextConfig", 4),
    "Qwen3ForCausalLM": ("Qwen3Config", 5),
    "Phi3ForCausalLM": ("Phi3Config", 6),
    "MixtralForCausalLM": ("MixtralConfig", 7),
    "Qwen2MoeForCausalLM": ("Qwen2MoeConfig", 8),
    "Qwen3MoeForCausalLM": ("Qwen3MoeConfig", 9),
    "OlmoeForCausalLM": ("OlmoeConfig", 10),
}
# Mixture-of-experts sizes: 8 experts, top 2, experts narrower than the dense MLP would be.
# Qwen2-MoE: a shared expert and one dense layer (mlp_only_layers); Qwen3-MoE renormalises.
MOE_TINY: dict[str, dict[str, Any]] = {
    "MixtralForCausalLM": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=64),
    "Qwen2MoeForCausalLM": dict(
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=96, mlp_only_layers=[1],
    ),
    "Qwen3MoeForCausalLM": dict(
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=32,
        norm_topk_prob=True,
    ),
    "OlmoeForCausalLM": dict(num_experts=8, num_experts_per_tok=2, intermediate_size=32),
}  # fmt: skip


def perturb_moe(model: Any) -> None:
    """Routers with clear preferences (transformers' init leaves every expert's logit near 0,
    so any rounding could flip the top k), random q/k norm weights and q/k/v biases where the
    family has them, so that every one of them is really tested."""
    with torch.no_grad():
        for layer in model.model.layers:
            mlp, attn = layer.mlp, layer.self_attn
            for name in ("gate", "shared_expert_gate"):
                if hasattr(mlp, name):
                    torch.nn.init.normal_(getattr(mlp, name).weight, std=0.5)
            for norm in (getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)):
                if norm is not None:
                    torch.nn.init.normal_(norm.weight, mean=1.0, std=0.3)
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                if proj.bias is not None:
                    torch.nn.init.normal_(proj.bias, std=0.3)


_TOKENIZER_DIR: Path | None = None  # the default tokenizer, saved once per process


def tokenizer_dir() -> Path:
    """A folder holding the default model's tokenizer in HF format (built once, ~5 s)."""
    global _TOKENIZER_DIR
    if _TOKENIZER_DIR is None or not _TOKENIZER_DIR.is_dir():
        import transformers

        from tokenmill.loader.model_source import default_model_path

        gguf = default_model_path()
        tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        folder = Path(tempfile.mkdtemp(prefix="tokenmill-tiny-tok-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        tok.save_pretrained(str(folder))
        _TOKENIZER_DIR = folder
    return _TOKENIZER_DIR


def make_tiny_hf_folder(
    tmp_path: Path, arch: str = "LlamaForCausalLM", sharded: bool = False, **overrides: Any
) -> Path:
    """Saves a tiny random-weight `arch` model plus the default tokenizer; returns the folder.

    `overrides` replace entries of the transformers config (e.g. tie_word_embeddings=True).
    """
    import transformers

    if arch not in _CONFIG_CLASSES:
        raise ValueError(f"no tiny config for {arch}; known: {sorted(_CONFIG_CLASSES)}")
    kwargs: dict[str, Any] = dict(TINY)
    if arch == "MistralForCausalLM":
        kwargs["sliding_window"] = 4096  # wider than the context: the window never applies
    kwargs.update(MOE_TINY.get(arch, {}))
    kwargs.update(overrides)
    config_cls, seed = _CONFIG_CLASSES[arch]
    torch.manual_seed(seed)
    cfg = getattr(transformers, config_cls)(**kwargs)
    cfg.architectures = [arch]
    tok_dir = tokenizer_dir()
    tok = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    cfg.bos_token_id = tok.bos_token_id
    cfg.eos_token_id = tok.eos_token_id
    cfg.pad_token_id = tok.pad_token_id
    model = getattr(transformers, arch)(cfg).eval()
    if arch == "Qwen2ForCausalLM":  # random q/k/v biases, so the bias path is really used
        with torch.no_grad():
            for layer in model.model.layers:
                attn = layer.self_attn
                for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                    torch.nn.init.normal_(proj.bias, std=0.05)
    if arch.startswith("Gemma"):  # norms start at 0 (a scale of 1 + 0): random offsets instead
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    torch.nn.init.normal_(p, std=0.3)
    if arch == "Qwen3ForCausalLM":  # q/k norm weights away from ones, so they really count
        with torch.no_grad():
            for layer in model.model.layers:
                for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                    torch.nn.init.normal_(norm.weight, mean=1.0, std=0.3)
    if arch in MOE_TINY:
        perturb_moe(model)
    folder = Path(tmp_path) / f"tiny-{arch}{'-sharded' if sharded else ''}"
    folder.mkdir(parents=True, exist_ok=True)
    save_kw: dict[str, Any] = {"safe_serialization": True}
    if sharded:
        save_kw["max_shard_size"] = "100KB"  # every big tensor in a shard of its own
    model.save_pretrained(str(folder), **save_kw)
    for f in tok_dir.iterdir():
        if f.is_file():
            shutil.copy(f, folder / f.name)
    return folder

"""Llama-family decoder (Llama 2/3.x, SmolLM2, Mistral; Qwen2 adds q/k/v bias).

Reads like the paper: x -> [RMSNorm -> GQA attention with RoPE -> +] -> [RMSNorm -> SwiGLU -> +].
The batch is ragged and packed: every activation is [num_tokens, ...] with no padding.
Mistral and Qwen2 may attend over a sliding window (`sliding_windows`), which the attention
backend applies per layer.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.config import ModelConfig
from tokenmill.errors import ModelLoadError
from tokenmill.kernels.cpu_fused import fused_ops
from tokenmill.layers.attention import PagedAttention
from tokenmill.layers.forward_context import ForwardContext
from tokenmill.layers.fused_decode import FusedDecodeLayer
from tokenmill.layers.linear import Linear, MergedLinear
from tokenmill.layers.norm import RMSNorm
from tokenmill.layers.rotary import RotaryEmbedding
from tokenmill.quant.base import QuantScheme
from tokenmill.quant.packing import BlockWeights, QuantizedTensor
from tokenmill.quant.squeezellm import SqueezeLLMWeights


def sliding_windows(cfg: ModelConfig) -> list[int | None]:
    """Each layer's sliding window (None: it attends to the whole context), by transformers'
    rule: Mistral, Mixtral and Phi-3 window every layer when `sliding_window` is set; Qwen2
    and Qwen3 only with `use_sliding_window`, the layers `layer_types` names
    "sliding_attention" (by default those from `max_window_layers` on)."""
    hf, n = cfg.hf_config, cfg.num_hidden_layers
    window = hf.get("sliding_window")
    if cfg.architecture in ("MistralForCausalLM", "Phi3ForCausalLM", "MixtralForCausalLM"):
        return [window or None] * n
    qwen = cfg.architecture in ("Qwen2ForCausalLM", "Qwen3ForCausalLM")
    if not qwen or not hf.get("use_sliding_window") or not window:
        return [None] * n
    first = hf.get("max_window_layers", 28)
    types = hf.get("layer_types") or [
        "sliding_attention" if i >= first else "full_attention" for i in range(n)
    ]
    return [window if t == "sliding_attention" else None for t in types]


class LlamaAttention(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        rotary: RotaryEmbedding,
        dtype: torch.dtype,
        quant: QuantScheme,
        sliding_window: int | None = None,
        *,
        scale: float | None = None,
        softcap: float | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = MergedLinear(
            cfg.hidden_size,
            [q_size, kv_size, kv_size],
            ("q_proj", "k_proj", "v_proj"),
            bias=cfg.attention_bias,
            dtype=dtype,
            quant=quant,
        )
        self.o_proj = Linear(q_size, cfg.hidden_size, dtype=dtype, quant=quant)
        self.rotary = rotary
        self.attn = PagedAttention(
            self.num_heads, self.num_kv_heads, self.head_dim, scale=scale,
            sliding_window=sliding_window, softcap=softcap,
        )  # fmt: skip
        self.split = [q_size, kv_size, kv_size]

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        """q, k and v of x [T, hidden], packed as [T, (H + 2 H_kv) D], before RoPE (a family
        that transforms q or k first, such as Qwen3's per-head norms, overrides this)."""
        return self.qkv_proj(x)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        num_tokens = x.shape[0]  # x: [T, hidden]
        qkv = self.qkv(x)  # [T, (H + 2 H_kv) D]
        ops = fused_ops(qkv)
        # the fused op's cos/sin span the whole head: partial rotary takes the unfused path
        if (
            ops is not None
            and self.attn.k_cache is not None
            and self.rotary.rotary_dim == self.head_dim
        ):
            # RoPE on q and k, k and v written to the cache, in one call
            q = ops.rope_cache.default(
                qkv, positions, self.rotary.cos, self.rotary.sin, self.attn.k_cache,
                self.attn.v_cache, ctx.slot_mappings[self.attn.kv_group], self.num_heads,
                self.num_kv_heads,
            )  # fmt: skip
            out = self.attn(q, None, None, ctx)
            return self.o_proj(out.reshape(num_tokens, -1))
        q, k, v = qkv.split(self.split, dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)  # [T, H, D]
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, H_kv, D]
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(positions, q, k)
        out = self.attn(q, k, v, ctx)  # [T, H, D]
        return self.o_proj(out.reshape(num_tokens, -1))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, quant: QuantScheme) -> None:
        super().__init__()
        inter = cfg.intermediate_size
        self.gate_up_proj = MergedLinear(
            cfg.hidden_size, [inter, inter], ("gate_proj", "up_proj"), dtype=dtype, quant=quant
        )
        self.down_proj = Linear(inter, cfg.hidden_size, dtype=dtype, quant=quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # [T, 2 * inter]
        ops = fused_ops(gate_up)
        if ops is not None:
            return self.down_proj(ops.silu_mul.default(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)  # SwiGLU
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    attention_cls: type[LlamaAttention] = LlamaAttention  # a family swaps its attention in

    def __init__(
        self,
        cfg: ModelConfig,
        rotary: RotaryEmbedding,
        dtype: torch.dtype,
        quant: QuantScheme,
        sliding_window: int | None = None,
    ) -> None:
        super().__init__()
        self.self_attn = self.attention_cls(cfg, rotary, dtype, quant, sliding_window)
        self.mlp = LlamaMLP(cfg, dtype, quant)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.fused_decode = FusedDecodeLayer(self)  # the whole layer in one C++ call, if it can

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        ctx: ForwardContext,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        fused = self.fused_decode(positions, x, residual, ctx)
        if fused is not None:
            return fused
        h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(positions, h, ctx)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    decoder_layer_cls: type[LlamaDecoderLayer] = LlamaDecoderLayer

    def __init__(
        self, cfg: ModelConfig, dtype: torch.dtype, max_positions: int, quant: QuantScheme
    ) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.embed_tokens.weight.requires_grad_(False)
        rotary = RotaryEmbedding.from_config(cfg, max_positions, dtype)
        self.layers = nn.ModuleList(
            self.decoder_layer_cls(cfg, rotary, dtype, quant, window)
            for window in sliding_windows(cfg)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [T, hidden]
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, ctx)
        x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(nn.Module):
    model_cls: type[LlamaModel] = LlamaModel

    def __init__(
        self,
        cfg: ModelConfig,
        dtype: torch.dtype,
        max_positions: int,
        quant: QuantScheme = None,
    ) -> None:
        super().__init__()
        self.config = cfg
        self.model = self.model_cls(cfg, dtype, max_positions, quant)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, dtype=dtype, quant=quant)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        """Returns final hidden states [T, hidden]; call `compute_logits` on the rows needed."""
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()  # [rows, vocab]

    def _load_quantized(
        self,
        name: str,
        tensor: QuantizedTensor | BlockWeights | SqueezeLLMWeights,
        fused: dict[str, tuple[str, MergedLinear, str]],
    ) -> torch.Tensor | None:
        """Hands a quantized matrix to its Linear (None), or dequantizes it where the parameter
        is not a Linear's weight (the embedding) and returns the dense tensor to copy."""
        prefix, _, kind = name.rpartition(".")
        if kind == "weight" and prefix in fused:
            _, module, shard = fused[prefix]
            start, end = module.shard_offset(shard)
            _check_shape((end - start, module.in_features), tensor.shape, name)
            module.load_quantized(tensor, shard)
            return None
        module = self.get_submodule(prefix) if kind == "weight" else None
        if isinstance(module, Linear):
            _check_shape((module.out_features, module.in_features), tensor.shape, name)
            module.load_quantized(tensor)
            return None
        if name == "model.embed_tokens.weight" and self.config.tie_word_embeddings:
            self.lm_head.load_quantized(tensor)  # the tied head reads the quantized blocks
        return tensor.dequantize()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Loads HF-named tensors, routing q/k/v and gate/up into their fused matmuls."""
        params = dict(self.named_parameters())
        fused = {}  # "layers.0.self_attn.q_proj" -> (merged module, shard name)
        for name, module in self.named_modules():
            if isinstance(module, MergedLinear):
                parent = name.rsplit(".", 1)[0]
                for shard in module.shard_names:
                    fused[f"{parent}.{shard}"] = (name, module, shard)
        # A fused weight may also arrive whole, as stored (Phi-3's qkv_proj and gate_up_proj):
        # it fills every shard of its MergedLinear.
        whole = {
            f"{name}.{kind}": [f"{name}.{kind}:{shard}" for shard in module.shard_names]
            for name, module in self.named_modules()
            if isinstance(module, MergedLinear)
            for kind in ("weight", "bias")
        }
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            prefix, _, kind = name.rpartition(".")  # kind: weight | bias
            if isinstance(tensor, QuantizedTensor | BlockWeights | SqueezeLLMWeights):
                tensor = self._load_quantized(name, tensor, fused)
                if tensor is None:
                    if prefix in fused:
                        loaded.add(f"{fused[prefix][0]}.weight:{fused[prefix][2]}")
                    else:
                        loaded.update(whole.get(name, [name]))
                    continue
            if prefix in fused:
                merged_name, module, shard = fused[prefix]
                start, end = module.shard_offset(shard)
                target = getattr(module, kind)
                _copy(target[start:end], tensor, name)
                loaded.add(f"{merged_name}.{kind}:{shard}")
                continue
            if name not in params:
                raise ModelLoadError(f"checkpoint tensor {name!r} has no matching parameter")
            _copy(params[name].data, tensor, name)
            loaded.update(whole.get(name, [name]))
        expected = set()
        for name, p in self.named_parameters():
            module_name, _, kind = name.rpartition(".")
            module = self.get_submodule(module_name)
            if isinstance(module, MergedLinear):
                expected.update(f"{name}:{s}" for s in module.shard_names)
            elif not (name == "lm_head.weight" and self.config.tie_word_embeddings):
                expected.add(name)
            del p
        missing = sorted(expected - loaded)
        if missing:
            shown = ", ".join(missing[:5])
            raise ModelLoadError(f"checkpoint is missing {len(missing)} tensors, e.g. {shown}")


def _check_shape(expected: tuple[int, ...], got: tuple[int, ...], name: str) -> None:
    if tuple(expected) != tuple(got):
        raise ModelLoadError(f"tensor {name!r} has shape {tuple(got)}, expected {tuple(expected)}")


def _copy(target: torch.Tensor, tensor: torch.Tensor, name: str) -> None:
    if tuple(target.shape) != tuple(tensor.shape):
        raise ModelLoadError(
            f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}"
        )
    target.copy_(tensor)

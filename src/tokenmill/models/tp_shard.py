"""Splits a loaded Llama-family model into one rank's tensor-parallel shard, in place.

Every rank loads the whole checkpoint and keeps its slices before the weights are packed for
the kernels (`process_after_loading`): q/k/v rows of its heads (`head_split`), o_proj's matching
input columns, a share of the MLP's intermediate rows (whole quantized blocks of 32 along
down_proj's K) and of the vocabulary (embedding rows, LM head rows). Mixture-of-experts models
(Mixtral, Qwen2-MoE, Qwen3-MoE) split their attention the same way and, with expert
parallelism, their experts by whole experts (layers/expert_parallel.py); OLMoE's q/k norms over
the whole projection would need the ranks' sums of squares, so it is refused.
"""

from __future__ import annotations

import dataclasses
import logging

from torch import nn

from tokenmill.config import ModelConfig
from tokenmill.layers.expert_parallel import check_expert_split, shard_experts
from tokenmill.layers.linear import Linear, MergedLinear
from tokenmill.layers.moe import SparseMoeBlock
from tokenmill.layers.tensor_parallel import (
    GatherParallel,
    HeadShard,
    RowParallel,
    TensorParallelError,
    TPGroup,
    VocabParallelEmbedding,
    VocabParallelHead,
    even_split,
    head_split,
)
from tokenmill.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP
from tokenmill.models.registry import model_class
from tokenmill.quant.block import BlockQuantMethod
from tokenmill.quant.packing import BLOCK
from tokenmill.quant.shard import take_cols, take_rows

logger = logging.getLogger(__name__)

_MOE_TP_ARCHS = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")


def _num_experts(cfg: ModelConfig) -> int:
    return int(cfg.hf_config.get("num_local_experts") or cfg.hf_config.get("num_experts") or 0)


def _has_dense_mlp(cfg: ModelConfig) -> bool:
    """Whether some layer has a dense MLP sized by intermediate_size (Qwen-MoE's dense layers;
    every layer of a model without experts)."""
    hf = cfg.hf_config
    if not _num_experts(cfg):
        return True
    return bool(hf.get("mlp_only_layers")) or int(hf.get("decoder_sparse_step") or 1) > 1


def check_splittable(cfg: ModelConfig, world_size: int, expert_parallel: bool = False) -> None:
    """Raises TensorParallelError unless `cfg` splits over `world_size` ranks (before any
    process starts)."""
    experts = _num_experts(cfg)
    if experts:
        if cfg.architecture not in _MOE_TP_ARCHS:
            raise TensorParallelError(
                f"tensor parallelism splits the mixture-of-experts models Mixtral, Qwen2-MoE "
                f"and Qwen3-MoE, not {cfg.architecture}; use tensor_parallel_size 1"
            )
        if not expert_parallel:
            raise TensorParallelError(
                f"{cfg.architecture} is a mixture-of-experts model: tensor parallelism splits "
                "it by whole experts; pass --enable-expert-parallel (enable_expert_parallel="
                "True)"
            )
        check_expert_split(experts, world_size)
    elif expert_parallel:
        raise TensorParallelError(
            f"enable_expert_parallel is for mixture-of-experts models; {cfg.architecture} "
            "has no experts"
        )
    cls = model_class(cfg.architecture)
    if cls is None or not issubclass(cls, LlamaForCausalLM):
        raise TensorParallelError(
            f"tensor parallelism supports Llama-family models (Llama, Mistral, Qwen2, Qwen3, "
            f"Phi-3) and Mixtral / Qwen-MoE, not {cfg.architecture}; use tensor_parallel_size 1"
        )
    head_split(cfg.num_attention_heads, cfg.num_key_value_heads, world_size)
    if _has_dense_mlp(cfg) and world_size > cfg.intermediate_size // BLOCK:
        raise TensorParallelError(
            f"tensor_parallel_size {world_size} exceeds the {cfg.intermediate_size // BLOCK} "
            f"blocks of {BLOCK} of the MLP's intermediate size {cfg.intermediate_size}"
        )


def local_kv_config(cfg: ModelConfig, heads: HeadShard) -> ModelConfig:
    """The config whose KV head count sizes this rank's KV cache."""
    return dataclasses.replace(
        cfg, num_attention_heads=heads.num_heads, num_key_value_heads=heads.num_kv_heads
    )


def _mlp_unit(cfg: ModelConfig) -> int:
    return BLOCK if cfg.intermediate_size % BLOCK == 0 else 1


def shard_model(model: nn.Module, tp: TPGroup) -> HeadShard:
    """Cuts `model` (loaded, not yet packed) down to rank `tp.rank`'s shard; returns its
    heads. The row-parallel layers and the embedding all-reduce, the head gathers."""
    if not isinstance(model, LlamaForCausalLM):
        raise TensorParallelError(
            f"tensor parallelism supports Llama-family models, not {type(model).__name__}"
        )
    cfg: ModelConfig = model.config
    check_splittable(cfg, tp.world_size, tp.expert_parallel)
    heads = head_split(cfg.num_attention_heads, cfg.num_key_value_heads, tp.world_size)[tp.rank]
    experts: tuple[int, int, int] | None = None
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        norm = getattr(attn, "q_norm", None)  # per head (Qwen3) splits; over all heads not
        whole_norm = norm is not None and norm.weight.numel() != attn.head_dim
        if not isinstance(attn, LlamaAttention) or whole_norm:
            raise TensorParallelError(f"tensor parallelism cannot split {type(attn).__name__}")
        _shard_attention(attn, heads, tp, cfg.hidden_size)
        if isinstance(mlp, SparseMoeBlock):
            shard = shard_experts(mlp, tp)  # the router and any shared expert stay whole
            experts = (shard.start, shard.end, shard.num_experts)
        elif isinstance(mlp, LlamaMLP):
            _shard_mlp(mlp, cfg, tp)
        else:
            raise TensorParallelError(f"tensor parallelism cannot split {type(mlp).__name__}")
        fused = getattr(layer, "fused_decode", None)  # MoE layers have none
        if fused is not None:
            fused.disable()  # the C++ layer has no all-reduce between its matmuls
    if experts is not None:
        logger.info("rank %d: experts [%d, %d) of %d in each MoE layer", tp.rank, *experts)
    v0, v1 = even_split(cfg.vocab_size, tp.world_size)[tp.rank]
    embed = model.model.embed_tokens
    model.model.embed_tokens = VocabParallelEmbedding(embed.weight.data, v0, v1, tp)
    head: Linear = model.lm_head  # type: ignore[assignment]
    take_rows(head, {None: (v0, v1)})
    model.lm_head = VocabParallelHead(head, cfg.vocab_size, tp)  # type: ignore[assignment]
    return heads


def _shard_mlp(mlp: LlamaMLP, cfg: ModelConfig, tp: TPGroup) -> None:
    mlp_split = even_split(cfg.intermediate_size, tp.world_size, _mlp_unit(cfg))
    inter = mlp_split[tp.rank]
    gate_up: MergedLinear = mlp.gate_up_proj
    gate_up.shard_sizes = take_rows(gate_up, dict.fromkeys(gate_up.shard_names, inter))
    mlp.down_proj = _row_parallel(  # type: ignore[assignment]
        mlp.down_proj, inter, mlp_split, cfg.hidden_size, tp
    )


def _row_parallel(
    linear: Linear, mine: tuple[int, int], split: list[tuple[int, int]], out: int, tp: TPGroup
) -> nn.Module:
    """A row-parallel layer over input columns `mine` (of `split`): RowParallel, or for
    block-quantized weights on the CPU (whose kernel rounds its input to int8) GatherParallel,
    which keeps the whole K and splits the output rows, so its outputs are TP=1's exactly."""
    method = linear.quant_method
    quantized = isinstance(method, BlockQuantMethod) and bool(method.parts)
    if quantized and linear.weight.device.type == "cpu":
        rows = even_split(out, tp.world_size)
        take_rows(linear, {None: rows[tp.rank]})
        return GatherParallel(linear, tp, [b - a for a, b in split], [b - a for a, b in rows])
    take_cols(linear, mine[0], mine[1], keep_bias=tp.rank == 0)
    return RowParallel(linear, tp)


def _shard_attention(attn: LlamaAttention, heads: HeadShard, tp: TPGroup, hidden: int) -> None:
    d = attn.head_dim
    all_heads = head_split(attn.num_heads, attn.num_kv_heads, tp.world_size)  # before the cut
    qkv = attn.qkv_proj
    q_name, k_name, v_name = qkv.shard_names
    kv = (heads.kv0 * d, heads.kv1 * d)
    sizes = take_rows(qkv, {q_name: (heads.q0 * d, heads.q1 * d), k_name: kv, v_name: kv})
    qkv.shard_sizes = sizes
    attn.split = sizes
    attn.num_heads, attn.num_kv_heads = heads.num_heads, heads.num_kv_heads
    attn.attn.num_heads, attn.attn.num_kv_heads = heads.num_heads, heads.num_kv_heads
    split = [(s.q0 * d, s.q1 * d) for s in all_heads]
    attn.o_proj = _row_parallel(  # type: ignore[assignment]
        attn.o_proj, (heads.q0 * d, heads.q1 * d), split, hidden, tp
    )

"""Resolves a model source into its config, compute dtype, quantization scheme, the source of its
tokenizer and a weight iterator. The engine builds the tokenizer; the runner builds the model."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import torch

from tokenmill.config import EngineConfig, ModelConfig
from tokenmill.errors import ModelLoadError
from tokenmill.kernels.cpp_build import cpu_flags
from tokenmill.loader.model_source import read_hf_config, resolve_model
from tokenmill.models.registry import SUPPORTED_ARCHITECTURES
from tokenmill.quant.base import QuantScheme
from tokenmill.quant.rtn import quantize_at_load

if TYPE_CHECKING:
    from tokenmill.loader.gguf import GGUFFile

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass
class LoadedModel:
    name: str
    model_config: ModelConfig
    dtype: torch.dtype
    max_model_len: int
    quant: QuantScheme  # how the linear weights arrive in `weights`
    weights: Iterator[tuple[str, Any]]
    # Where the tokenizer comes from: the GGUF file's own vocabulary, else a HF folder or hub id.
    gguf: GGUFFile | None
    tokenizer_path: str | None


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 F.linear measured ~3x faster than fp32 on such CPUs."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def resolve_device(name: str) -> str:
    """ "auto" -> "cuda" when a GPU is visible, else "cpu"; a clear error for a missing GPU."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelLoadError(
                f"device={name!r} but torch sees no CUDA GPU (torch {torch.__version__}); use "
                "device='cpu' (--device cpu) or a CUDA build of torch on a GPU machine"
            )
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ModelLoadError(
                f"device={name!r}: only {torch.cuda.device_count()} CUDA device(s) visible"
            )
    return name


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    if device.startswith("cuda"):
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def load_model(config: EngineConfig) -> LoadedModel:
    source = resolve_model(config.model)
    dtype = resolve_dtype(config.dtype, config.device)
    # Offloaded experts stay in the checkpoint's memory map, as stored (expert_source.py).
    map_experts = config.expert_memory_gb is not None
    if source.kind == "gguf":
        from tokenmill.loader.gguf import read_gguf

        gguf = read_gguf(source.path)
        hf_config = gguf.hf_config()
        if config.quantization == "squeezellm":
            raise ModelLoadError(_not_squeezellm(source.path))
        # Unset quantization = as stored: Q4_0/Q4_1/Q8_0 blocks reach the kernels as they are.
        weights = gguf.iter_tensors(
            dtype, keep_quantized=config.quantization is None, map_experts=map_experts
        )
        quant: QuantScheme = "blocks" if config.quantization is None else None
    else:
        from tokenmill.loader.safetensors import iter_safetensors
        from tokenmill.loader.squeezellm import iter_squeezellm, squeezellm_bits

        gguf = None
        hf_config = read_hf_config(source.path)
        weights = iter_safetensors(source.path, dtype, map_experts)
        quant = None
        sq_bits = squeezellm_bits(hf_config)  # a `tokenmill quantize` checkpoint
        if sq_bits is None and config.quantization == "squeezellm":
            raise ModelLoadError(_not_squeezellm(source.path))
        if sq_bits is not None:
            if config.quantization in ("int8", "int4"):
                raise ModelLoadError(
                    f"{source.path} is a SqueezeLLM checkpoint: it cannot be requantized to "
                    f"{config.quantization}"
                )
            dense = config.quantization == "none"  # none: dequantized to dtype at load
            weights = iter_squeezellm(source.path, dtype, sq_bits, dense=dense)
            quant = None if dense else "squeezellm"
    archs = hf_config.get("architectures") or []
    if not archs or archs[0] not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"unsupported architecture {archs[0] if archs else hf_config.get('model_type')!r}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if config.quantization in ("int8", "int4"):
        weights = quantize_at_load(weights, 8 if config.quantization == "int8" else 4)
        quant = "blocks"
    model_config = ModelConfig.from_hf_dict(hf_config)
    # Sliding-window layers attend over their window (the attention backends apply it), so a
    # window does not cap the context.
    max_len = model_config.max_position_embeddings
    if config.max_model_len is not None:
        if config.max_model_len > max_len:
            raise ValueError(
                f"max_model_len={config.max_model_len} exceeds the model's context of {max_len}"
            )
        max_len = config.max_model_len
    tokenizer_path = config.tokenizer or (None if gguf is not None else str(source.path))
    return LoadedModel(
        source.name, model_config, dtype, max_len, quant, weights, gguf, tokenizer_path
    )


def _not_squeezellm(path: object) -> str:
    return (
        f"quantization='squeezellm' needs a SqueezeLLM checkpoint, and {path} is not one; make "
        "one with `tokenmill quantize MODEL --out DIR`, or leave quantization unset"
    )

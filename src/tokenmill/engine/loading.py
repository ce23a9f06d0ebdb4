"""Resolves a model source into config, tokenizer, compute dtype and a weight iterator."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from tokenmill.config import EngineConfig, ModelConfig
from tokenmill.engine.tokenizer import Tokenizer
from tokenmill.errors import ModelLoadError
from tokenmill.kernels.cpp_build import cpu_flags
from tokenmill.layers.quantization.packing import BLOCK, quantize_rtn
from tokenmill.loader.model_source import read_hf_config, resolve_model
from tokenmill.models.registry import SUPPORTED_ARCHITECTURES

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
    tokenizer: Tokenizer
    dtype: torch.dtype
    max_model_len: int
    weights: Iterator[tuple[str, torch.Tensor]]


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


def quantize_at_load(weights: Iterator[tuple[str, Any]], bits: int) -> Iterator[tuple[str, Any]]:
    """Round-to-nearest weight-only quantization of the decoder's linear weights as they load:
    int8 with one scale per output channel, int4 with a scale and offset per group of 32 (64 was
    measured on the default model, whose weights are Q4_1 already: perplexity +73% at 64, +0.02%
    at 32, where RTN reproduces the Q4_1 grid). The embedding and the LM head stay dense."""
    for name, w in weights:
        linear = name.startswith("model.layers.") and name.endswith("_proj.weight")
        if linear and isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[1] % BLOCK == 0:
            group = w.shape[1] if bits == 8 else BLOCK
            yield name, quantize_rtn(w, bits, group)
        else:
            yield name, w


def load_model(config: EngineConfig) -> LoadedModel:
    source = resolve_model(config.model)
    dtype = resolve_dtype(config.dtype, config.device)
    if source.kind == "gguf":
        from tokenmill.loader.gguf import read_gguf

        gguf = read_gguf(source.path)
        hf_config = gguf.hf_config()
        tokenizer = (
            Tokenizer.from_pretrained(config.tokenizer)
            if config.tokenizer
            else Tokenizer.from_gguf(gguf)
        )
        if config.quantization == "squeezellm":
            raise ModelLoadError(_not_squeezellm(source.path))
        # Unset quantization = as stored: Q4_0/Q4_1/Q8_0 blocks reach the kernels as they are.
        weights = gguf.iter_tensors(dtype, keep_quantized=config.quantization is None)
    else:
        from tokenmill.loader.safetensors import iter_safetensors
        from tokenmill.loader.squeezellm import iter_squeezellm, squeezellm_bits

        hf_config = read_hf_config(source.path)
        tokenizer = Tokenizer.from_pretrained(config.tokenizer or str(source.path))
        weights = iter_safetensors(source.path, dtype)
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
    archs = hf_config.get("architectures") or []
    if not archs or archs[0] not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"unsupported architecture {archs[0] if archs else hf_config.get('model_type')!r}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if config.quantization in ("int8", "int4"):
        weights = quantize_at_load(weights, 8 if config.quantization == "int8" else 4)
    model_config = ModelConfig.from_hf_dict(hf_config)
    max_len = model_config.max_position_embeddings
    if model_config.sliding_window:
        # The reference attention has no window: stay within it so results are exact.
        max_len = min(max_len, model_config.sliding_window)
    if config.max_model_len is not None:
        if config.max_model_len > max_len:
            raise ValueError(
                f"max_model_len={config.max_model_len} exceeds the model's context of {max_len}"
            )
        max_len = config.max_model_len
    return LoadedModel(source.name, model_config, tokenizer, dtype, max_len, weights)


def _not_squeezellm(path: object) -> str:
    return (
        f"quantization='squeezellm' needs a SqueezeLLM checkpoint, and {path} is not one; make "
        "one with `tokenmill quantize MODEL --out DIR`, or leave quantization unset"
    )

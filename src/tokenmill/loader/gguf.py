"""GGUF files: metadata as an HF config dict, tensors under HF parameter names (dequantized, or
Q4_0/Q4_1/Q8_0 blocks kept as they are for the quantized kernels)."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.gguf_reader import ReaderField, ReaderTensor

from tokenmill.errors import ModelLoadError
from tokenmill.layers.quantization.packing import GGUF_FORMATS, QuantizedTensor

# GGUF `general.architecture` -> HF `architectures[0]`. Mistral GGUFs are written as "llama".
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
# llama.cpp's converter interleaves q/k rows per head for these (LlamaModel.permute); qwen2 is not.
_PERMUTED_ARCHS = frozenset({"llama"})

_TOP_LEVEL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Not an HF parameter: llama3 rope frequency factors, turned back into rope_scaling instead.
_IGNORED_TENSORS = frozenset({"rope_freqs.weight"})

_CHUNK_BLOCKS = 1 << 16  # bounds the float32 temporaries of one dequantization step


class _FastReader(GGUFReader):
    """GGUFReader over a plain ndarray view of the memmap.

    np.memmap's per-slice __array_finalize__ dominates parsing a 50k-token vocabulary (~4 s);
    a base-class view of the same mapping parses it in ~0.5 s with identical results.
    """

    _dtypes: dict[tuple[Any, str], np.dtype] = {}

    def _get(
        self, offset: int, dtype: Any, count: int = 1, override_order: str | None = None
    ) -> np.ndarray:
        data = self.data
        if type(data) is np.memmap:
            data = self.data = data.view(np.ndarray)
        order = self.byte_order if override_order is None else override_order
        dt = self._dtypes.get((dtype, order))
        if dt is None:
            dt = self._dtypes[(dtype, order)] = np.dtype(dtype).newbyteorder(order)
        return data[offset : offset + dt.itemsize * int(count)].view(dt)


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Parse a GGUF file's header, metadata and tensor table (tensor data stays memory-mapped)."""
    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"GGUF file not found: {p}")
    try:
        # copy-on-write mapping: writable arrays for torch.from_numpy, the file is never modified
        reader = _FastReader(p, mode="c")
    except Exception as e:
        raise ModelLoadError(
            f"cannot read GGUF file {p} (truncated or corrupt?): {type(e).__name__}: {e}"
        ) from e
    file_size = p.stat().st_size
    for t in reader.tensors:
        block, type_size = GGML_QUANT_SIZES[t.tensor_type]
        expected = int(t.n_elements) // block * type_size
        if (
            int(t.n_elements) % block
            or t.data.nbytes != expected
            or t.data_offset + expected > file_size
        ):
            raise ModelLoadError(
                f"GGUF file {p} is truncated or corrupt: tensor {t.name!r} "
                f"({t.tensor_type.name}, {int(t.n_elements)} elements) needs {expected} bytes "
                f"at offset {t.data_offset}, file has {file_size} bytes"
            )
    return GGUFFile(p, reader)


class GGUFFile:
    """A parsed GGUF file. Metadata values are decoded lazily and cached."""

    def __init__(self, path: Path, reader: GGUFReader) -> None:
        self.path = path
        self._reader = reader
        self._tensors: dict[str, ReaderTensor] = {t.name: t for t in reader.tensors}
        self._cache: dict[str, Any] = {}

    def keys(self) -> list[str]:
        return [k for k in self._reader.fields if not k.startswith("GGUF.")]

    def get(self, key: str, default: Any = None) -> Any:
        """The decoded value of a metadata key (str, int, float, bool or list)."""
        if key in self._cache:
            return self._cache[key]
        field = self._reader.fields.get(key)
        if field is None:
            return default
        try:
            value = _field_value(field)
        except (UnicodeDecodeError, IndexError, ValueError) as e:
            raise ModelLoadError(f"GGUF file {self.path}: cannot decode metadata {key!r}") from e
        self._cache[key] = value
        return value

    @property
    def architecture(self) -> str:
        arch = self.get("general.architecture")
        if not isinstance(arch, str):
            raise ModelLoadError(f"GGUF file {self.path} has no general.architecture")
        return arch

    def tensor_type(self, name: str) -> str:
        return self._tensors[name].tensor_type.name

    def hf_config(self) -> dict[str, Any]:
        """An HF config.json-style dict (accepted by ModelConfig.from_hf_dict)."""
        arch = self._checked_arch()
        g = lambda key, default=None: self.get(f"{arch}.{key}", default)  # noqa: E731
        required = ("block_count", "embedding_length", "feed_forward_length")
        missing = [f"{arch}.{k}" for k in (*required, "attention.head_count") if g(k) is None]
        if missing:
            raise ModelLoadError(f"GGUF file {self.path} lacks metadata: {', '.join(missing)}")
        hidden = int(g("embedding_length"))
        heads = int(g("attention.head_count"))
        head_dim = int(g("attention.key_length", hidden // heads))
        tokens = self.get("tokenizer.ggml.tokens")
        embd = self._tensors.get("token_embd.weight")
        if embd is not None:
            vocab_size = int(embd.shape[-1])
        elif tokens is not None:
            vocab_size = len(tokens)
        else:
            vocab_size = int(g("vocab_size"))
        eos_ids: list[int] = []
        for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
            tid = self.get(f"tokenizer.ggml.{key}")
            if tid is not None and int(tid) not in eos_ids:
                eos_ids.append(int(tid))
        cfg: dict[str, Any] = {
            "architectures": [SUPPORTED_ARCHITECTURES[arch]],
            "model_type": arch,
            "hidden_act": "silu",
            "vocab_size": vocab_size,
            "hidden_size": hidden,
            "intermediate_size": int(g("feed_forward_length")),
            "num_hidden_layers": int(g("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(g("attention.head_count_kv", heads)),
            "head_dim": head_dim,
            "rms_norm_eps": _f32(g("attention.layer_norm_rms_epsilon", 1e-5)),
            "rope_theta": _f32(g("rope.freq_base", 10000.0)),
            "rope_scaling": self._rope_scaling(arch, int(g("rope.dimension_count", head_dim))),
            "max_position_embeddings": int(g("context_length", 2048)),
            "tie_word_embeddings": "output.weight" not in self._tensors,
            "attention_bias": arch == "qwen2" or "blk.0.attn_q.bias" in self._tensors,
            "bos_token_id": self.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else (eos_ids or None),
            "pad_token_id": self.get("tokenizer.ggml.padding_token_id"),
        }
        rope_dim = g("rope.dimension_count")
        if rope_dim is not None and int(rope_dim) != head_dim:
            cfg["partial_rotary_factor"] = int(rope_dim) / head_dim
        if arch == "qwen2":
            cfg["use_sliding_window"] = False
        return cfg

    def _rope_scaling(self, arch: str, rope_dim: int) -> dict[str, Any] | None:
        kind = self.get(f"{arch}.rope.scaling.type")
        if kind is None and "rope_freqs.weight" in self._tensors:
            return self._llama3_rope_scaling(
                rope_dim, _f32(self.get(f"{arch}.rope.freq_base", 10000.0))
            )
        factor = self.get(f"{arch}.rope.scaling.factor")
        if kind is None and self.get(f"{arch}.rope.scale_linear") is not None:
            kind, factor = "linear", self.get(f"{arch}.rope.scale_linear")
        if kind in (None, "none") or factor is None or (kind == "linear" and factor == 1.0):
            return None
        scaling: dict[str, Any] = {"rope_type": kind, "type": kind, "factor": _f32(factor)}
        orig = self.get(f"{arch}.rope.scaling.original_context_length")
        if orig is not None:
            scaling["original_max_position_embeddings"] = int(orig)
        attn_factor = self.get(f"{arch}.rope.scaling.attn_factor")
        if attn_factor is not None:
            scaling["attention_factor"] = _f32(attn_factor)
        return scaling

    def _llama3_rope_scaling(self, rope_dim: int, theta: float) -> dict[str, Any]:
        """Llama 3.1+ GGUFs store rope scaling as per-frequency factors (rope_freqs.weight):
        recover the HF "llama3" parameters that give them (llama.cpp converter's formula)."""
        got = self.read_tensor("rope_freqs.weight").double()
        factor, low, high, old = _f32(got.max()), 1.0, 4.0, 8192  # every Llama 3.x release
        inv_freq = theta ** -(torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim)
        wavelen = 2 * math.pi / inv_freq
        smooth = (old / wavelen - low) / (high - low)
        want = torch.where(wavelen > old / low, factor, 1 / ((1 - smooth) / factor + smooth))
        want = torch.where(wavelen < old / high, 1.0, want)
        if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4):
            raise ModelLoadError(
                f"GGUF file {self.path}: rope_freqs.weight does not match llama3 rope scaling "
                f"(factor {factor}, low/high freq factor 1/4, original context 8192)"
            )
        return {
            "rope_type": "llama3",
            "type": "llama3",
            "factor": factor,
            "low_freq_factor": low,
            "high_freq_factor": high,
            "original_max_position_embeddings": old,
        }

    def _checked_arch(self) -> str:
        arch = self.architecture
        if arch not in SUPPORTED_ARCHITECTURES:
            supported = ", ".join(sorted(SUPPORTED_ARCHITECTURES))
            raise ModelLoadError(
                f"GGUF file {self.path}: architecture {arch!r} is not supported "
                f"(supported: {supported}; mistral GGUFs use 'llama')"
            )
        return arch

    def hf_name(self, gguf_name: str) -> str | None:
        """The HF parameter name of a GGUF tensor; None for tensors HF has no parameter for."""
        if gguf_name in _TOP_LEVEL_NAMES:
            return _TOP_LEVEL_NAMES[gguf_name]
        if gguf_name in _IGNORED_TENSORS:
            return None
        m = _LAYER_RE.fullmatch(gguf_name)
        if m is None or m.group(2) not in _LAYER_NAMES:
            raise ModelLoadError(
                f"GGUF file {self.path}: unexpected tensor {gguf_name!r} "
                f"for architecture {self.architecture!r}"
            )
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"

    def read_tensor(self, gguf_name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One tensor by GGUF name, dequantized, in HF shape order; q/k rows not un-permuted."""
        t = self._tensors[gguf_name]
        try:
            return _dequantize(t, dtype)
        except ModelLoadError:
            raise
        except Exception as e:
            raise ModelLoadError(f"GGUF file {self.path}: cannot read tensor {gguf_name!r}") from e

    def iter_tensors(
        self, dtype: torch.dtype = torch.float32, keep_quantized: bool = False
    ) -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
        """(HF name, tensor) pairs in file order, in HF layout: dequantized to `dtype`, or with
        `keep_quantized` Q4_0/Q4_1/Q8_0 matrices as QuantizedTensor (their raw blocks)."""
        arch = self._checked_arch()
        cfg = self.hf_config()
        permute = arch in _PERMUTED_ARCHS
        for gguf_name in self._tensors:
            name = self.hf_name(gguf_name)
            if name is None:
                continue
            t = self._tensors[gguf_name]
            w: torch.Tensor | QuantizedTensor
            if keep_quantized and t.tensor_type.name in GGUF_FORMATS and len(t.shape) == 2:
                w = self._read_blocks(t)
            else:
                w = self.read_tensor(gguf_name, dtype)
            if permute and ".attn_q." in gguf_name:
                w = _unpermute(w, cfg["num_attention_heads"])
            elif permute and ".attn_k." in gguf_name:
                w = _unpermute(w, cfg["num_key_value_heads"])
            yield name, w

    def _read_blocks(self, t: ReaderTensor) -> QuantizedTensor:
        cols, rows = (int(d) for d in t.shape.tolist())
        size, _ = GGUF_FORMATS[t.tensor_type.name]
        data = torch.from_numpy(t.data)  # a read-only view of the memory-mapped file
        if data.numel() != rows * cols // 32 * size:
            raise ModelLoadError(f"GGUF file {self.path}: tensor {t.name!r} is truncated")
        blocks = data.reshape(rows, -1).clone()  # own memory: the file may be closed later
        return QuantizedTensor(t.tensor_type.name, blocks, (rows, cols))


def _f32(value: Any) -> float:
    """A float32 metadata value as the decimal it was written from (9.99999975e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


def _field_value(field: ReaderField) -> Any:
    if not field.types:
        return None
    main = field.types[0]
    if main == GGUFValueType.ARRAY:
        if len(field.types) > 1 and field.types[-1] == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        if not field.data:
            return []
        return np.concatenate([field.parts[i] for i in field.data]).tolist()
    if main == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    return field.parts[field.data[0]][0].item()


def _unpermute(w: torch.Tensor | QuantizedTensor, n_head: int) -> torch.Tensor | QuantizedTensor:
    """Inverse of llama.cpp's LlamaModel.permute: rows [h, 2, d/2] were stored as [h, d/2, 2]."""
    if isinstance(w, QuantizedTensor):  # whole rows of blocks move
        return dataclasses.replace(w, blocks=_unpermute(w.blocks, n_head))
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _half(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 scale stored at byte `start` of each block, as float32 of shape (n, 1)."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    # ggml packs element j in the low nibble and element j + 16 in the high nibble
    return torch.cat((qs & 0x0F, qs >> 4), dim=1)


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    return blocks[:, 2:].contiguous().view(torch.int8).float() * _half(blocks, 0)


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    q = _nibbles(blocks[:, 2:]).to(torch.int8) - 8
    return _half(blocks, 0) * q.float()


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    # two separate ops (no fused multiply-add) so results equal gguf.quants bit for bit
    return _half(blocks, 0) * _nibbles(blocks[:, 4:]).float() + _half(blocks, 2)


_BLOCK_KERNELS: dict[GGMLQuantizationType, Callable[[torch.Tensor], torch.Tensor]] = {
    GGMLQuantizationType.Q8_0: _q8_0,
    GGMLQuantizationType.Q4_0: _q4_0,
    GGMLQuantizationType.Q4_1: _q4_1,
}


def _dequantize(t: ReaderTensor, dtype: torch.dtype) -> torch.Tensor:
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    qtype = t.tensor_type
    data = torch.from_numpy(t.data)
    if qtype == GGMLQuantizationType.F32:
        return data.reshape(shape).to(dtype, copy=True)
    if qtype == GGMLQuantizationType.F16:
        return data.reshape(shape).float().to(dtype)
    if qtype == GGMLQuantizationType.BF16:
        return data.reshape(-1).view(torch.bfloat16).reshape(shape).float().to(dtype)
    kernel = _BLOCK_KERNELS.get(qtype)
    if kernel is None:
        supported = ", ".join(["F32", "F16", "BF16", *(k.name for k in _BLOCK_KERNELS)])
        raise ModelLoadError(
            f"tensor {t.name!r} has GGML type {qtype.name}, which is not supported "
            f"(supported: {supported})"
        )
    block, type_size = GGML_QUANT_SIZES[qtype]
    blocks = data.reshape(-1, type_size)
    out = torch.empty(blocks.shape[0], block, dtype=dtype)
    for start in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        out[start : start + _CHUNK_BLOCKS] = kernel(blocks[start : start + _CHUNK_BLOCKS])
    return out.reshape(shape)

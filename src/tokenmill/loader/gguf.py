"""GGUF files: header, metadata and tensor table, tensors under HF parameter names (dequantized,
or Q4_0/Q4_1/Q8_0 blocks kept as they are for the quantized kernels). The metadata's HF config
is built in gguf_config, the dequantization in gguf_dequant, the tensor names in gguf_names."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFValueType
from gguf.gguf_reader import ReaderField, ReaderTensor

from tokenmill.errors import ModelLoadError
from tokenmill.loader import gguf_config
from tokenmill.loader.gguf_config import checked_architecture
from tokenmill.loader.gguf_dequant import dequantize
from tokenmill.loader.gguf_names import NORM_PLUS_ONE_ARCHS, PERMUTED_ARCHS, hf_name, unpermute
from tokenmill.quant.packing import GGUF_FORMATS, QuantizedTensor


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

    def has_tensor(self, name: str) -> bool:
        return name in self._tensors

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape in HF order (the reverse of GGUF's)."""
        return tuple(int(d) for d in reversed(self._tensors[name].shape.tolist()))

    def hf_config(self) -> dict[str, Any]:
        """An HF config.json-style dict (accepted by ModelConfig.from_hf_dict)."""
        return gguf_config.hf_config(self)

    def hf_name(self, gguf_name: str) -> str | None:
        """The HF parameter name of a GGUF tensor; None for tensors HF has no parameter for."""
        return hf_name(gguf_name, self.architecture, self.path)

    def read_tensor(self, gguf_name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One tensor by GGUF name, dequantized, in HF shape order; q/k rows not un-permuted."""
        t = self._tensors[gguf_name]
        try:
            return dequantize(t, dtype)
        except ModelLoadError:
            raise
        except Exception as e:
            raise ModelLoadError(f"GGUF file {self.path}: cannot read tensor {gguf_name!r}") from e

    def iter_tensors(
        self,
        dtype: torch.dtype = torch.float32,
        keep_quantized: bool = False,
        map_experts: bool = False,
    ) -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
        """(HF name, tensor) pairs in file order, in HF layout: dequantized to `dtype`, or with
        `keep_quantized` Q4_0/Q4_1/Q8_0 matrices as QuantizedTensor (their raw blocks). A 3-D
        tensor of stacked experts comes as one matrix per expert, `experts.{e}.` in its name.
        `map_experts` (offloading): expert weights as views of the file's memory map, unread,
        blocks as stored and float tensors in their stored dtype (others still converted)."""
        arch = checked_architecture(self)
        cfg = self.hf_config()
        permute = arch in PERMUTED_ARCHS
        norm_plus_one = arch in NORM_PLUS_ONE_ARCHS
        for gguf_name in self._tensors:
            name = self.hf_name(gguf_name)
            if name is None:
                continue
            t = self._tensors[gguf_name]
            if len(t.shape) == 3:
                yield from self._per_expert(name, t, dtype, keep_quantized, map_experts)
                continue
            w: torch.Tensor | QuantizedTensor
            mapped = map_experts and ".experts." in name  # an older file's per-expert matrix
            stored = _stored_view(t) if mapped else None
            if keep_quantized and t.tensor_type.name in GGUF_FORMATS and len(t.shape) == 2:
                w = self._read_blocks(t, copy=not mapped)
            elif stored is not None:
                w = stored
            elif norm_plus_one and name.endswith("norm.weight"):
                # subtract in fp32, then round once to dtype
                w = (self.read_tensor(gguf_name, torch.float32) - 1.0).to(dtype)
            else:
                w = self.read_tensor(gguf_name, dtype)
            if permute and ".attn_q." in gguf_name:
                w = unpermute(w, cfg["num_attention_heads"])
            elif permute and ".attn_k." in gguf_name:
                w = unpermute(w, cfg["num_key_value_heads"])
            yield name, w

    def _per_expert(
        self,
        name: str,
        t: ReaderTensor,
        dtype: torch.dtype,
        keep_quantized: bool,
        mapped: bool,
    ) -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
        """A stacked expert tensor [E, rows, cols] as E matrices named `...experts.{e}.proj`:
        quantized ones as views of one copy of the blocks (each expert's rows are contiguous),
        or with `mapped` of the file's memory map itself, as float tensors of a stored float
        type are."""
        prefix, _, rest = name.rpartition(".experts.")  # rest: "gate_proj.weight"
        if not prefix:
            raise ModelLoadError(f"GGUF file {self.path}: unexpected 3-D tensor {t.name!r}")
        cols, rows, num_experts = (int(d) for d in t.shape.tolist())
        if keep_quantized and t.tensor_type.name in GGUF_FORMATS:
            size, _ = GGUF_FORMATS[t.tensor_type.name]
            data = torch.from_numpy(t.data)
            if data.numel() != num_experts * rows * cols // 32 * size:
                raise ModelLoadError(f"GGUF file {self.path}: tensor {t.name!r} is truncated")
            blocks = data.reshape(num_experts, rows, -1)
            if not mapped:
                blocks = blocks.clone()  # own memory, as _read_blocks
            for e in range(num_experts):
                qt = QuantizedTensor(t.tensor_type.name, blocks[e], (rows, cols))
                yield f"{prefix}.experts.{e}.{rest}", qt
            return
        stored = _stored_view(t) if mapped else None
        w = self.read_tensor(t.name, dtype) if stored is None else stored  # [E, rows, cols]
        for e in range(num_experts):
            yield f"{prefix}.experts.{e}.{rest}", w[e]

    def _read_blocks(self, t: ReaderTensor, copy: bool = True) -> QuantizedTensor:
        cols, rows = (int(d) for d in t.shape.tolist())
        size, _ = GGUF_FORMATS[t.tensor_type.name]
        data = torch.from_numpy(t.data)  # a view of the memory-mapped file (copy-on-write)
        if data.numel() != rows * cols // 32 * size:
            raise ModelLoadError(f"GGUF file {self.path}: tensor {t.name!r} is truncated")
        blocks = data.reshape(rows, -1)
        if copy:
            blocks = blocks.clone()  # own memory, the file's pages not kept
        return QuantizedTensor(t.tensor_type.name, blocks, (rows, cols))


def _stored_view(t: ReaderTensor) -> torch.Tensor | None:
    """A float tensor as stored (F32 / F16 / BF16), in HF shape order: a view of the file's
    memory map (the view keeps the map open); None for other types."""
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    data = torch.from_numpy(t.data)
    name = t.tensor_type.name
    if name == "BF16":
        return data.reshape(-1).view(torch.bfloat16).reshape(shape)
    return data.reshape(shape) if name in ("F32", "F16") else None


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

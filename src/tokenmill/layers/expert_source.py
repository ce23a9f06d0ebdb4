"""Offloaded experts' weights left in the checkpoint: memory-mapped, read only when loaded.

With expert offloading the runner builds the model inside `mapped_experts()`: every expert
linear layer's method is a `MappedSource` (`map_experts`), which keeps the checkpoint tensors
the loader hands it (no placeholder is allocated, nothing is copied or converted). The loaders give
experts as views of the file's memory map where they can: GGUF blocks in their block layout
(Q4_0 / Q4_1 / Q8_0) and float tensors in their stored dtype (GGUF F32 / F16 / BF16,
safetensors, whose `safe_open` maps the file). The pages are read when an expert is loaded into
an expert-cache slot, and a CPU host's page cache may drop them again: a model whose experts
exceed RAM loads and runs. Experts converted at load (int8 / int4 round-to-nearest, GGUF
blocks dequantized with quantization none, SqueezeLLM tables) are held in RAM as converted.

A slot load (layers/expert_cache.py) writes an expert into a slot's tensors from its source:
- `fill_slot`: in place, where the layout allows: dense weights copied into the slot's weight
  rows (converted to the compute dtype by the copy), GGUF blocks written straight into the CPU
  kernel's tiles (quant/gguf_tiles.py); derived copies (oneDNN's prepacked weight, the
  batch-invariant kernel's) are made again by the cache after the copy (`needs_repack`);
- otherwise `materialise`: a fresh module loaded and processed as the loader would (the Triton
  layout on CUDA, SqueezeLLM tables, a dense fallback), whose tensors the cache copies.
Either way a slot holds the bytes a resident expert holds, so offloading changes no token.
Experts the loader converted (`is_converted`) are in RAM anyway: the cache materialises each
once at start and copies them as it copies experts given processed.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tokenmill.errors import ModelLoadError
from tokenmill.layers.linear import Linear, MergedLinear
from tokenmill.quant.block import BlockQuantMethod
from tokenmill.quant.gguf_tiles import fill_tiles, fits_tiles
from tokenmill.quant.packing import QuantizedTensor
from tokenmill.quant.unquantized import UnquantizedMethod

if TYPE_CHECKING:
    from tokenmill.quant.base import QuantScheme


class MappedSource:
    """The method of an offloaded expert's linear layer: the checkpoint parts by shard (None:
    the whole weight), as the loader gave them. It never computes: the expert runs from a slot."""

    def __init__(self, scheme: QuantScheme) -> None:
        self.scheme = scheme  # how the layer would hold the parts resident
        self.parts: dict[str | None, Any] = {}

    def create_weights(self, layer: Linear) -> None:
        pass

    def load(self, layer: Linear, tensor: Any, shard: str | None) -> None:
        self.parts[shard] = tensor
        layer.weight_bytes = sum(_nbytes(p) for p in self.parts.values())

    def process_after_loading(self, layer: Linear) -> None:
        pass

    def describe(self, layer: Linear) -> str:
        return "mapped experts"

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(f"{layer}: an offloaded expert runs from its expert-cache slot")


def _nbytes(part: Any) -> int:
    if isinstance(part, torch.Tensor):
        return part.numel() * part.element_size()
    if isinstance(part, QuantizedTensor):
        return part.blocks.numel()
    nbytes = getattr(part, "nbytes", None)
    return int(nbytes()) if callable(nbytes) else 0


def expert_linears(expert: nn.Module) -> list[Linear]:
    return [m for m in expert.modules() if isinstance(m, Linear)]


_BUILD_MAPPED: contextvars.ContextVar[bool] = contextvars.ContextVar("mapped", default=False)


@contextlib.contextmanager
def mapped_experts(enabled: bool = True) -> Iterator[None]:
    """MoE layers built inside build their experts as mapped sources (`map_experts`) from the
    start, their placeholders on the meta device: nothing of them is allocated on the compute
    device, however many experts there are."""
    token = _BUILD_MAPPED.set(enabled)
    try:
        yield
    finally:
        _BUILD_MAPPED.reset(token)


def building_mapped() -> bool:
    return _BUILD_MAPPED.get()


def map_experts(experts: nn.ModuleList) -> None:
    """Turns one MoE layer's experts (an `Experts`, not yet loaded) into mapped sources and
    frees their placeholders."""
    experts.gate_up_proj = None  # the dense stacks the placeholders were views of
    experts.down_proj = None
    for expert in experts:
        for lin in expert_linears(expert):
            lin.quant_method = MappedSource(experts.quant)
            lin._parameters.pop("weight", None)


def is_mapped(expert: nn.Module) -> bool:
    return all(isinstance(m.quant_method, MappedSource) for m in expert_linears(expert))


def is_converted(expert: nn.Module) -> bool:
    """Whether the loader converted a part of `expert` (int8 / int4 at load, SqueezeLLM
    tables): it is in RAM anyway, as no view of the file."""
    return any(
        not isinstance(p, torch.Tensor | QuantizedTensor)
        for m in expert_linears(expert)
        for p in m.quant_method.parts.values()
    )


def _shards(lin: Linear) -> tuple[str, ...]:
    return lin.shard_names if isinstance(lin, MergedLinear) else ()


def _signature(part: Any) -> tuple:
    if isinstance(part, QuantizedTensor):
        return (part.qtype, part.shape)
    if isinstance(part, torch.Tensor):
        return (part.dtype, tuple(part.shape))
    return (type(part).__name__, tuple(getattr(part, "shape", ())))


def source_signature(expert: nn.Module) -> list:
    """What a slot must match (checks only metadata: no byte of the source is read); raises
    ModelLoadError for an expert the checkpoint left incomplete."""
    sig = []
    for lin in expert_linears(expert):
        method = lin.quant_method
        assert isinstance(method, MappedSource)
        names = _shards(lin)
        if set(method.parts) not in ({None}, set(names) or {None}):
            raise ModelLoadError(f"checkpoint is missing weights of the offloaded expert {lin}")
        sig.append(sorted((str(s), _signature(p)) for s, p in method.parts.items()))
    return sig


def _rows(lin: Linear, shard: str | None) -> tuple[int, int]:
    return (0, lin.out_features) if shard is None else lin.shard_offset(shard)


def materialise(expert: nn.Module, device: torch.device) -> nn.Module:
    """A module of `expert`'s class on `device` holding its weights as a resident expert holds
    them: its parts loaded and processed as the loader and the runner do (reads the source)."""
    linears = expert_linears(expert)
    gate_up, down = expert.gate_up_proj, expert.down_proj
    scheme = linears[0].quant_method.scheme
    with torch.device(device):
        out = type(expert)(gate_up.in_features, down.in_features, down.dtype, scheme)
    with torch.no_grad():
        for src, dst in zip(linears, expert_linears(out), strict=True):
            dst.batch_invariant = src.batch_invariant
            for shard, part in src.quant_method.parts.items():
                if isinstance(part, torch.Tensor):
                    start, end = _rows(dst, shard)
                    dst.weight[start:end].copy_(part)
                else:
                    dst.load_quantized(part, shard)
            dst.quant_method.process_after_loading(dst)
    return out


def _can_fill(src: Linear, dst: Linear) -> bool:
    parts = src.quant_method.parts
    method = dst.quant_method
    if isinstance(method, UnquantizedMethod):
        return all(isinstance(p, torch.Tensor) for p in parts.values())
    if isinstance(method, BlockQuantMethod) and method.packed is not None:
        return all(
            isinstance(p, QuantizedTensor)
            and fits_tiles(method.packed, p, _rows(dst, s)[0], method.bits)
            for s, p in parts.items()
        )
    return False


def fill_slot(expert: nn.Module, slot: nn.Module) -> bool:
    """Writes `expert`'s source into `slot` (a materialised expert of the same shapes) in
    place; False, having written nothing, where a part's layout does not allow it."""
    pairs = list(zip(expert_linears(expert), expert_linears(slot), strict=True))
    if not all(_can_fill(src, dst) for src, dst in pairs):
        return False
    with torch.no_grad():
        for src, dst in pairs:
            method = dst.quant_method
            for shard, part in src.quant_method.parts.items():
                start, end = _rows(dst, shard)
                if isinstance(method, BlockQuantMethod):
                    assert method.packed is not None
                    fill_tiles(method.packed, part, start, method.bits)
                else:
                    dst.weight[start:end].copy_(part, non_blocking=True)
    return True

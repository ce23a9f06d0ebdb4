"""Which tensors an expert's matmuls read, and fresh copies of them: what the expert cache
(layers/expert_cache.py) copies into a slot on a load, and what it clones a slot from."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from tokenmill.layers.linear import Linear
from tokenmill.quant.unquantized import UnquantizedMethod

TensorRef = tuple[object, str]  # (owner, attribute): a tensor an expert's matmuls read


def expert_tensor_refs(expert: nn.Module) -> list[TensorRef]:
    """Every tensor an expert's linear layers read, in a fixed order (module order, then name),
    so two clones of one expert list matching tensors: the layer's parameters, and the quant
    method's tensors (its packed blocks, its tuple or dataclass of kernel tensors). oneDNN's
    prepacked dense weight is not listed: it is opaque (no copy_), and is packed again from the
    copied weight after a load (`needs_repack`)."""
    refs: list[TensorRef] = []
    for lin in expert.modules():
        if not isinstance(lin, Linear):
            continue
        refs += [(lin._parameters, n) for n, p in sorted(lin._parameters.items()) if p is not None]
        method = lin.quant_method
        for name, value in sorted(vars(method).items()):
            if isinstance(value, torch.Tensor):
                refs.append((method, name))
            elif isinstance(value, tuple) and value and isinstance(value[0], torch.Tensor):
                refs += [(value, str(i)) for i in range(len(value))]
            elif dataclasses.is_dataclass(value) and not isinstance(value, type):
                refs += [
                    (value, f.name)
                    for f in dataclasses.fields(value)
                    if isinstance(getattr(value, f.name), torch.Tensor)
                ]
    return refs


def get_ref(ref: TensorRef) -> torch.Tensor:
    owner, name = ref
    if isinstance(owner, dict):
        return owner[name]
    if isinstance(owner, tuple):
        return owner[int(name)]
    return getattr(owner, name)


def needs_repack(expert: nn.Module) -> list[Linear]:
    """Dense linears: what their method derives from the weight (oneDNN's prepacked copy, the
    batch-invariant kernel's packed copy) goes stale when a load overwrites the weight, so
    `process_after_loading` runs again after every load."""
    return [
        m
        for m in expert.modules()
        if isinstance(m, Linear) and isinstance(m.quant_method, UnquantizedMethod)
    ]


def set_ref(ref: TensorRef, value: torch.Tensor) -> None:
    owner, name = ref
    if isinstance(owner, dict):
        owner[name] = nn.Parameter(value, requires_grad=False)
    else:
        setattr(owner, name, value)  # tuples are rebuilt by `fresh_tensors`


def fresh_tensors(expert: nn.Module, device: torch.device, pin: bool) -> None:
    """Replaces, in place in `expert`'s modules, every listed tensor with a new one on `device`
    holding the same bytes (pinned host memory when `pin`)."""
    for lin in expert.modules():
        if not isinstance(lin, Linear):
            continue
        for name, value in vars(lin.quant_method).items():
            if isinstance(value, tuple) and value and isinstance(value[0], torch.Tensor):
                setattr(lin.quant_method, name, tuple(_moved(t, device, pin) for t in value))
    for ref in expert_tensor_refs(expert):
        if not isinstance(ref[0], tuple):
            set_ref(ref, _moved(get_ref(ref), device, pin))


def _moved(t: torch.Tensor, device: torch.device, pin: bool) -> torch.Tensor:
    out = torch.empty(t.shape, dtype=t.dtype, device=device, pin_memory=pin)
    return out.copy_(t.detach())

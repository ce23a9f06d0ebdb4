"""Tensor-parallel shards of a loaded linear weight, taken before `process_after_loading`.

A column-parallel shard keeps some output rows (per part of a fused layer: its q, k and v rows,
or its gate and up rows); a row-parallel shard keeps a range of input columns K. Quantized
blocks are never split: rows are independent, and a K range must start and end on a block
boundary (32 weights), so every kept block is the checkpoint's own (scale, offset and values)
and each rank's matmul is exactly the corresponding slice of the unsharded one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from tokenmill.quant.block import BlockQuantMethod
from tokenmill.quant.packing import BLOCK, BlockWeights
from tokenmill.quant.unquantized import UnquantizedMethod

if TYPE_CHECKING:
    from tokenmill.layers.linear import Linear

# part name (None: a plain layer) -> (start, end) of the rows kept, relative to that part
RowRanges = dict[str | None, tuple[int, int]]


class ShardError(ValueError):
    """A weight that cannot be split as asked (the message names the layer and the limit)."""


def _blocks_rows(bw: BlockWeights, start: int, end: int) -> BlockWeights:
    return BlockWeights(
        bw.q[start:end].clone(), bw.d[start:end].clone(), bw.m[start:end].clone(), bw.bits
    )


def _blocks_cols(bw: BlockWeights, start: int, end: int) -> BlockWeights:
    b0, b1 = start // BLOCK, end // BLOCK
    return BlockWeights(
        bw.q[:, b0:b1].clone(), bw.d[:, b0:b1].clone(), bw.m[:, b0:b1].clone(), bw.bits
    )


def _check_method(layer: Linear) -> None:
    if not isinstance(layer.quant_method, UnquantizedMethod | BlockQuantMethod):
        kind = type(layer.quant_method).__name__
        raise ShardError(f"{layer}: tensor parallelism does not split {kind} weights")


def take_rows(layer: Linear, ranges: RowRanges) -> list[int]:
    """Keeps the given output rows of each part (every part must be named); returns the new
    part sizes. The dense weight, the bias and any quantized parts are cut alike."""
    _check_method(layer)
    names: tuple[str | None, ...] = getattr(layer, "shard_names", (None,))
    if names == (None,):
        offsets = [(0, layer.out_features)]
    else:
        offsets = [layer.shard_offset(n) for n in names]  # type: ignore[attr-defined]
    keep = [
        (o0 + ranges[n][0], o0 + ranges[n][1]) for n, (o0, _) in zip(names, offsets, strict=True)
    ]
    method = layer.quant_method
    if isinstance(method, BlockQuantMethod) and method.parts:
        whole = method.parts.pop(None, None)
        if whole is not None and names != (None,):  # a fused weight stored whole: split it
            for n, (o0, o1) in zip(names, offsets, strict=True):
                method.parts[n] = _blocks_rows(whole, o0, o1)  # type: ignore[arg-type]
        elif whole is not None:
            method.parts[None] = whole
        for n in names:
            part = method.parts.get(n)
            if isinstance(part, BlockWeights):
                a, b = ranges[n]
                method.parts[n] = _blocks_rows(part, a, b)
    rows = torch.cat([torch.arange(a, b) for a, b in keep])
    layer.weight = nn.Parameter(layer.weight.data[rows].clone(), requires_grad=False)
    if layer.bias is not None:
        layer.bias = nn.Parameter(layer.bias.data[rows].clone(), requires_grad=False)
    layer.out_features = int(rows.numel())
    return [b - a for a, b in (ranges[n] for n in names)]


def take_cols(layer: Linear, start: int, end: int, keep_bias: bool) -> None:
    """Keeps input columns [start, end) (on block boundaries for quantized parts); the bias is
    kept on one rank only (`keep_bias`), since the partial results are summed."""
    _check_method(layer)
    method = layer.quant_method
    if isinstance(method, BlockQuantMethod) and method.parts:
        if start % BLOCK or end % BLOCK:
            raise ShardError(
                f"{layer}: a row-parallel split at columns [{start}, {end}) cuts quantized "
                f"blocks of {BLOCK}; the split must fall on multiples of {BLOCK}"
            )
        for n, part in list(method.parts.items()):
            if isinstance(part, BlockWeights):
                method.parts[n] = _blocks_cols(part, start, end)
    layer.weight = nn.Parameter(layer.weight.data[:, start:end].clone(), requires_grad=False)
    if layer.bias is not None and not keep_bias:
        layer.bias = nn.Parameter(torch.zeros_like(layer.bias.data), requires_grad=False)
    layer.in_features = end - start

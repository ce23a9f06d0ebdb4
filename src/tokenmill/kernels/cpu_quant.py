"""The C++ weight-only quantized matmul (csrc/quant_linear.cpp), JIT-built on first use.

On CPUs with AMX, `quant_linear` runs calls of 32 rows or more (prompt chunks) on AMX int8
tiles, bit-identical to the AVX512-VNNI kernel row for row (csrc/quant_amx.h), so batch
invariance holds whichever path a row takes. TOKENMILL_NO_AMX=1 keeps every call on VNNI; so
does a host whose AMX faults (probed once per process)."""

from __future__ import annotations

import functools
import logging
from typing import Any, Literal

import torch

from tokenmill.kernels.cpp_build import cpu_flags, load_extension

logger = logging.getLogger(__name__)

EXT_NAME = "tokenmill_cpu_quant"


@functools.cache
def load_cpu_quant() -> Any | None:
    """`torch.ops.tokenmill_cpu_quant`, or None (with one warning) where it cannot be had: the
    kernel needs AVX512-VNNI."""
    if not {"avx512f", "avx512bw", "avx512_vnni"} <= cpu_flags():
        logger.warning(
            "this CPU has no AVX512-VNNI: quantized weights are dequantized at load (slower)"
        )
        return None
    return load_extension(EXT_NAME, "quant_linear.cpp", "quant_linear", "quantized CPU matmul")


def _ops() -> Any:
    ops = load_cpu_quant()
    if ops is None:
        raise RuntimeError(f"{EXT_NAME} is unavailable")
    return ops


def amx_usable() -> bool:
    """Whether `quant_linear` may take its AMX path here (the CPU has AMX-INT8, the kernel
    granted it, a probe ran and TOKENMILL_NO_AMX is unset)."""
    ops = load_cpu_quant()
    return ops is not None and bool(ops.amx_usable())


def quant_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    n: int,
    bits: int,
    path: Literal["auto", "vnni", "amx"] = "auto",
) -> torch.Tensor:
    """y [M, n] = x [M, K] @ W^T for W packed by `packing.pack_tiles`; x float32 or bfloat16
    (y has x's dtype). Activations are quantized to int8 per block of 32 inside. `path` forces
    one kernel ("amx" raises where AMX is unusable); both give the same bits."""
    ops = _ops()
    op = {"auto": ops.quant_linear, "vnni": ops.quant_linear_vnni, "amx": ops.quant_linear_amx}
    return op[path].default(x.contiguous(), packed, n, bits)


def dequantize_packed(packed: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """The dense bfloat16 weight [n, K] of a `pack_tiles` weight (bit-exact with
    `BlockWeights.dequantize().bfloat16()`)."""
    return _ops().dequantize_packed.default(packed, n, bits)


def grouped_quant_linear(
    x: torch.Tensor, packed: list[torch.Tensor], counts: list[int], n: int, bits: int
) -> torch.Tensor:
    """y [M, n]: row group g of x [M, K] (the next counts[g] rows) times packed[g]^T, every
    group in one call (a MoE layer's active experts; always the VNNI kernel). Bit-identical to
    `quant_linear` on each group's rows."""
    return _ops().grouped_quant_linear.default(x.contiguous(), packed, counts, n, bits)


GGUF_FORMAT_CODES = {"Q4_0": 0, "Q4_1": 1, "Q8_0": 2}


def fill_gguf_tiles(packed: torch.Tensor, blocks: torch.Tensor, qtype: str, row0: int) -> bool:
    """Writes GGUF blocks (uint8 [rows, nb * block bytes], contiguous) into rows row0 ..
    of `packed` (quant/gguf_tiles.py's checks done by the caller); False where the extension
    is unavailable."""
    ops = load_cpu_quant()
    if ops is None:
        return False
    ops.fill_gguf_tiles.default(packed, blocks, GGUF_FORMAT_CODES[qtype], blocks.shape[0], row0)
    return True

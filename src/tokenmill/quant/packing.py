"""Quantized weights as (q, d, m) blocks and the tile layout of csrc/quant_linear.cpp.

Every supported format is stored as unsigned integers q per weight and, per row and block of
32 weights along K, a scale d and an offset m in fp16, with w = d * q + m computed in float32.
GGUF maps onto it exactly: Q4_1 is (q, d, m); Q4_0's d * (q - 8) is (q, d, -8 d); Q8_0's d * q
(q int8) is (q + 128, d, -128 d). Those products and sums are exact in float32 (an 11-bit
mantissa times at most 8 bits), so dequantizing gives gguf's values bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 32  # weights per block along K
TILE_ROWS = 16  # output rows per tile (one AVX-512 register of fp32)

# GGUF block formats: (bytes per block of 32, bits of q)
GGUF_FORMATS = {"Q4_0": (18, 4), "Q4_1": (20, 4), "Q8_0": (34, 8)}


@dataclass
class QuantizedTensor:
    """A checkpoint tensor still in its quantized blocks: `blocks` is uint8 [rows, bytes]."""

    qtype: str  # a GGUF_FORMATS key
    blocks: torch.Tensor
    shape: tuple[int, int]  # (rows, cols) in HF order

    def unpack(self) -> BlockWeights:
        return unpack_gguf(self)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.unpack().dequantize().to(dtype)


@dataclass
class BlockWeights:
    """q: uint8 [rows, nb, 32]; d, m: fp16 [rows, nb]; bits: 4 or 8 (the range of q)."""

    q: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor
    bits: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape[0], self.q.shape[1] * BLOCK

    def dequantize(self) -> torch.Tensor:
        # two separate float32 ops, no fused multiply-add: bit-exact with gguf
        w = self.d.float().unsqueeze(-1) * self.q.float() + self.m.float().unsqueeze(-1)
        return w.reshape(self.shape)

    def nbytes(self) -> int:
        return self.q.numel() * self.bits // 8 + (self.d.numel() + self.m.numel()) * 2


def cat_rows(parts: list[BlockWeights]) -> BlockWeights:
    bits = max(p.bits for p in parts)
    return BlockWeights(
        torch.cat([p.q for p in parts]),
        torch.cat([p.d for p in parts]),
        torch.cat([p.m for p in parts]),
        bits,
    )


def _fp16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    return blocks[..., start : start + 2].contiguous().view(torch.float16).squeeze(-1)


def unpack_gguf(t: QuantizedTensor) -> BlockWeights:
    size, bits = GGUF_FORMATS[t.qtype]
    rows, cols = t.shape
    if cols % BLOCK:
        raise ValueError(f"{t.qtype} tensor with {cols} columns: not a multiple of {BLOCK}")
    blocks = t.blocks.reshape(rows, cols // BLOCK, size)
    d = _fp16(blocks, 0)
    if t.qtype == "Q8_0":
        q = (blocks[..., 2:].view(torch.int8).to(torch.int16) + 128).to(torch.uint8)
        m = (d.float() * -128.0).half()
    else:
        qs = blocks[..., 4:] if t.qtype == "Q4_1" else blocks[..., 2:]
        q = torch.cat((qs & 0x0F, qs >> 4), dim=-1)  # element j low nibble, j + 16 high
        m = _fp16(blocks, 2) if t.qtype == "Q4_1" else (d.float() * -8.0).half()
    return BlockWeights(q.contiguous(), d.contiguous(), m.contiguous(), bits)


def quantize_rtn(w: torch.Tensor, bits: int, group: int = BLOCK) -> BlockWeights:
    """Round-to-nearest asymmetric quantization of w [rows, cols] with one (d, m) per `group`
    weights along K (a multiple of 32; group = cols is per-channel)."""
    rows, cols = w.shape
    if cols % group or group % BLOCK:
        raise ValueError(f"group {group} must be a multiple of {BLOCK} dividing {cols} columns")
    g = w.float().reshape(rows, cols // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    levels = (1 << bits) - 1
    d = ((hi - lo) / levels).half()
    m = lo.half()
    df = d.float().clamp_min(torch.finfo(torch.float16).tiny)
    q = ((g - m.float().unsqueeze(-1)) / df.unsqueeze(-1)).round().clamp(0, levels)
    reps = group // BLOCK
    return BlockWeights(
        q.to(torch.uint8).reshape(rows, cols // BLOCK, BLOCK),
        d.repeat_interleave(reps, dim=1),
        m.repeat_interleave(reps, dim=1),
        bits,
    )


def pack_tiles(bw: BlockWeights) -> torch.Tensor:
    """The kernel's layout: uint8 [tiles, nb, record], rows padded to a multiple of 16."""
    rows, nb = bw.d.shape
    pad = -rows % TILE_ROWS
    q, d, m = bw.q, bw.d, bw.m
    if pad:
        q = torch.cat([q, q.new_zeros(pad, nb, BLOCK)])
        d = torch.cat([d, d.new_zeros(pad, nb)])
        m = torch.cat([m, m.new_zeros(pad, nb)])
    tiles = (rows + pad) // TILE_ROWS
    # [tiles, 16 rows, nb, 8 quads, 4] -> [tiles, nb, 8 quads, 16 rows, 4]
    q = q.reshape(tiles, TILE_ROWS, nb, 8, 4).permute(0, 2, 3, 1, 4)
    if bw.bits == 4:
        q = q[:, :, :4] | (q[:, :, 4:] << 4)  # quad j low nibble, quad j + 4 high nibble
    weights = q.reshape(tiles, nb, -1)
    scales = [x.reshape(tiles, TILE_ROWS, nb).transpose(1, 2).contiguous() for x in (d, m)]
    scale_bytes = [s.view(torch.uint8).reshape(tiles, nb, 2 * TILE_ROWS) for s in scales]
    return torch.cat([weights, *scale_bytes], dim=-1).contiguous()


def unpack_tiles(packed: torch.Tensor, rows: int, bits: int) -> BlockWeights:
    """Inverse of pack_tiles (for tests and the dense fallback)."""
    tiles, nb, _ = packed.shape
    wbytes = TILE_ROWS * BLOCK * bits // 8
    q = packed[..., :wbytes].reshape(tiles, nb, -1, TILE_ROWS, 4)
    if bits == 4:
        q = torch.cat((q & 0x0F, q >> 4), dim=2)
    q = q.permute(0, 3, 1, 2, 4).reshape(tiles * TILE_ROWS, nb, BLOCK)
    scales = []
    for start in (wbytes, wbytes + 2 * TILE_ROWS):
        s = packed[..., start : start + 2 * TILE_ROWS].contiguous().view(torch.float16)
        scales.append(s.transpose(1, 2).reshape(tiles * TILE_ROWS, nb))
    return BlockWeights(q[:rows].contiguous(), scales[0][:rows], scales[1][:rows], bits)


def quantize_activations_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the kernel does to x [M, K]: int8 per block of 32 with scale amax / 127.
    Returns (xq float [M, K], dx [M, K/32]); for tests."""
    g = x.float().reshape(x.shape[0], -1, BLOCK)
    d = g.abs().amax(-1) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    xq = torch.round(g * inv.unsqueeze(-1)).clamp(-128, 127)
    return xq.reshape(x.shape), d

"""GGUF Q4_0 / Q4_1 / Q8_0 blocks written straight into the CPU kernel's tiles (packing.py's
`pack_tiles` layout), in place: what an offloaded expert's slot load does with the blocks it
reads from the memory-mapped file, without building the (q, d, m) form first.

The tile bytes are the GGUF bytes rearranged: a 4-bit tile byte for quad j of row r holds
elements 4 j + c (low nibble) and 16 + 4 j + c (high nibble), which is GGUF's byte 4 j + c of
the row's block as it stands; an 8-bit one is GGUF's int8 plus 128 (the byte XOR 0x80). The
offsets m are GGUF's (Q4_1) or computed from d as `unpack_gguf` computes them, so the bytes
equal `pack_tiles(cat_rows([p.unpack() for p in parts]))` exactly (a test checks it).
"""

from __future__ import annotations

import torch

from tokenmill.kernels.cpu_quant import fill_gguf_tiles
from tokenmill.quant.packing import BLOCK, GGUF_FORMATS, TILE_ROWS, QuantizedTensor


def fits_tiles(packed: torch.Tensor, qt: QuantizedTensor, row0: int, bits: int) -> bool:
    """Whether `qt`'s rows can be written at row `row0` of `packed` (uint8 [tiles, nb, record]
    of `bits`): a GGUF format of those bits, the same blocks per row, starting on a tile."""
    fmt = GGUF_FORMATS.get(qt.qtype)
    rows, cols = qt.shape
    return (
        fmt is not None
        and fmt[1] == bits
        and cols == packed.shape[1] * BLOCK
        and row0 % TILE_ROWS == 0
        and row0 + rows <= packed.shape[0] * TILE_ROWS
        and packed.is_contiguous()
        and packed.dtype == torch.uint8
    )


def fill_tiles(packed: torch.Tensor, qt: QuantizedTensor, row0: int, bits: int) -> None:
    """Writes `qt`'s rows into rows [row0, row0 + rows) of `packed` (see `fits_tiles`); the
    padding rows of a partial last tile are left as they are (zeros, from `pack_tiles`)."""
    assert fits_tiles(packed, qt, row0, bits)
    blocks = qt.blocks.reshape(qt.shape[0], -1)
    if blocks.is_contiguous() and fill_gguf_tiles(packed, blocks, qt.qtype, row0):
        return  # the C++ loop: one pass, no temporaries
    fill_tiles_torch(packed, qt, row0, bits)


def fill_tiles_torch(packed: torch.Tensor, qt: QuantizedTensor, row0: int, bits: int) -> None:
    """`fill_tiles` in torch ops (the reference, and where the C++ extension is not built)."""
    size, _ = GGUF_FORMATS[qt.qtype]
    rows, cols = qt.shape
    nb = cols // BLOCK
    # Every block (18, 20 or 34 bytes) and field is 2-byte aligned: read as 16-bit words.
    words = qt.blocks.reshape(rows, nb * size).view(torch.int16).reshape(rows, nb, size // 2)
    start = 2 if qt.qtype == "Q4_1" else 1  # the words of q after d (and m)
    qwords = BLOCK * bits // 8 // 2
    wbytes = TILE_ROWS * BLOCK * bits // 8
    full, rem = divmod(rows, TILE_ROWS)
    t0 = row0 // TILE_ROWS
    for first, num_tiles, n in ((0, full, TILE_ROWS), (full * TILE_ROWS, int(rem > 0), rem)):
        if num_tiles == 0:
            continue
        src = words[first : first + num_tiles * n]  # [tiles * n, nb, size / 2]
        tiles = packed[t0 + first // TILE_ROWS : t0 + first // TILE_ROWS + num_tiles]
        # Gathered contiguous first, so the transposing copy moves 4-byte words.
        q = src[..., start : start + qwords].contiguous()
        if qt.qtype == "Q8_0":
            q ^= -0x7F80  # 0x8080: each byte XOR 0x80
        q = q.view(torch.int32).reshape(num_tiles, n, nb, qwords // 2)
        weights = tiles[..., :wbytes].view(torch.int32)
        weights = weights.view(num_tiles, nb, qwords // 2, TILE_ROWS)
        weights[..., :n].copy_(q.permute(0, 2, 3, 1))
        d = src[..., 0].view(torch.float16)  # [tiles * n, nb]
        if qt.qtype == "Q4_1":
            m = src[..., 1].view(torch.float16)
        else:
            m = (d.float() * (-128.0 if qt.qtype == "Q8_0" else -8.0)).half()
        for offset, x in ((wbytes, d), (wbytes + 2 * TILE_ROWS, m)):
            dst = tiles[..., offset : offset + 2 * TILE_ROWS].view(torch.float16)
            dst[..., :n].copy_(x.reshape(num_tiles, n, nb).transpose(1, 2))

"""Pieces of random GGUF files for tests and benchmarks: Q4_0 blocks written directly (no
quantization time) and the tokenizer metadata of an existing GGUF copied into a new one."""

from __future__ import annotations

import gguf
import numpy as np

Q4_0_BLOCK = 18  # bytes per 32 weights: fp16 scale, 16 bytes of 4-bit values


def random_q4_0(rng: np.random.Generator, *shape: int, scale: float) -> np.ndarray:
    """Random Q4_0 blocks of a [..., rows, cols] matrix (uniform 4-bit values, block scales
    ~`scale`), as the uint8 [..., rows, cols / 32 * 18] the GGUF writer takes."""
    *lead, cols = shape
    nb = cols // 32
    raw = rng.integers(0, 256, size=(*lead, nb, Q4_0_BLOCK), dtype=np.uint8)
    d = (scale * (1 + 0.1 * rng.standard_normal((*lead, nb)))).astype(np.float16)
    raw[..., :2] = d.view(np.uint8).reshape(*lead, nb, 2)
    return raw.reshape(*lead, nb * Q4_0_BLOCK)


def copy_tokenizer(writer: gguf.GGUFWriter, reader: gguf.GGUFReader) -> int:
    """Copies `reader`'s `tokenizer.*` metadata into `writer`; returns the vocabulary size."""
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[1] if len(field.types) > 1 else None
            writer.add_key_value(key, field.contents(), field.types[0], sub)
    return len(reader.fields["tokenizer.ggml.tokens"].contents())

"""Prefix-cache block hashes: a full block's hash chains its parent block's hash, its token ids
and an extra key (a cache salt), so equal hashes mean equal prefixes up to and including the
block. One SHA-256 per block, whether a block is hashed alone or with the blocks after it.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

from tokenmill.core.block_pool import BlockHash

_ROOT_HASH = hashlib.sha256(b"tokenmill-kv-root").digest()


def hash_block_tokens(
    parent_hash: BlockHash | None, token_ids: Sequence[int], extra_key: str | None = None
) -> BlockHash:
    """Stable hash of one full block given its parent block's hash (None for the first block)."""
    n = len(token_ids)
    packed = struct.pack(f"<{n}q", *token_ids)
    parent = parent_hash if parent_hash is not None else _ROOT_HASH
    return _digest(parent, struct.pack("<I", n), packed, _extra_key_bytes(extra_key))


def _digest(parent: BlockHash, count: bytes, packed: bytes, extra: bytes) -> BlockHash:
    """The one layout of a block's hash: SHA-256 of its parent's hash, its token count, its
    tokens (int64 each) and its extra key. The token count comes before the tokens, so the
    extra key cannot be confused with tokens."""
    return hashlib.sha256(b"".join((parent, count, packed, extra))).digest()


def _extra_key_bytes(extra_key: str | None) -> bytes:
    return b"\x00" if extra_key is None else b"\x01" + extra_key.encode("utf-8")


def chain_hashes(
    hashes: list[BlockHash], token_ids: Sequence[int], bs: int, extra_key: str | None
) -> None:
    """Appends `hash_block_tokens` of each full block of `token_ids` after `hashes[-1]`, the
    tokens packed once for all the blocks."""
    parent = hashes[-1] if hashes else _ROOT_HASH
    data = struct.pack(f"<{len(token_ids)}q", *token_ids)
    count = struct.pack("<I", bs)
    extra = _extra_key_bytes(extra_key)
    size = 8 * bs
    for k in range(0, len(data), size):
        parent = _digest(parent, count, data[k : k + size], extra)
        hashes.append(parent)

"""xgrammar's view of the engine's tokenizer: every token's encoded text and how to decode it.

The grammar matcher works on bytes, so it must know how a token's vocabulary string maps to
bytes: byte-level BPE (gpt2 style: "Ġ" is a space, every byte one printable character),
byte-fallback SentencePiece ("▁" is a space, "<0x0A>" a raw byte) or raw text.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import xgrammar as xgr
from tokenizers import Tokenizer as FastTokenizer

_SPACE_PIECE = "\u2581"  # SentencePiece's "▁"


def tokenizer_info(
    backend: FastTokenizer, stop_token_ids: Iterable[int], vocab_size: int
) -> xgr.TokenizerInfo:
    """TokenizerInfo for `backend` with the model's `vocab_size` (the logits' width, which may
    exceed the tokenizer's: ids past it have no text and the grammar never allows them)."""
    vocab = backend.get_vocab(with_added_tokens=True)
    size = max(vocab_size, max(vocab.values(), default=-1) + 1)
    encoded = [""] * size  # ids without a token stay "" and are never allowed
    for token, i in vocab.items():
        encoded[i] = token
    vocab_type = _vocab_type(backend, vocab)
    return xgr.TokenizerInfo(
        encoded,
        vocab_type=vocab_type,
        vocab_size=vocab_size,
        stop_token_ids=sorted(set(stop_token_ids)),
        add_prefix_space=_adds_prefix_space(backend, vocab_type),
    )


def _vocab_type(backend: FastTokenizer, vocab: dict[str, int]) -> xgr.VocabType:
    """How vocabulary strings encode bytes: the decoder says it, the vocabulary confirms it."""
    decoders = _decoder_types(json.loads(backend.to_str()).get("decoder"))
    if "ByteLevel" in decoders:
        return xgr.VocabType.BYTE_LEVEL
    if "ByteFallback" in decoders or sum(f"<0x{b:02X}>" in vocab for b in range(256)) >= 128:
        return xgr.VocabType.BYTE_FALLBACK
    return xgr.VocabType.RAW


def _decoder_types(decoder: Any) -> set[str]:
    if not isinstance(decoder, dict):
        return set()
    types = {decoder.get("type", "")}
    for child in decoder.get("decoders") or ():
        types |= _decoder_types(child)
    return types


def _adds_prefix_space(backend: FastTokenizer, vocab_type: xgr.VocabType) -> bool:
    """Whether encoding prepends a space (SentencePiece's "▁a" for "a"): observed, not guessed."""
    if vocab_type != xgr.VocabType.BYTE_FALLBACK:
        return False
    ids = backend.encode("a", add_special_tokens=False).ids
    first = backend.id_to_token(ids[0]) if ids else None
    return bool(first) and first.startswith(_SPACE_PIECE)

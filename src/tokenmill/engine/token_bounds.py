"""A cheap lower bound on how many tokens a text encodes to, without encoding it.

Every token of a BPE encoding covers a contiguous piece of the (normalized) text, so a text of B
UTF-8 bytes needs at least ceil(B / max_bytes) tokens, where max_bytes is the most bytes one
token can cover. That holds only when nothing can cover an unbounded stretch of text: no fused or
per-word unknown token, no added token that strips whitespace around it, no normalizer or
pre-tokenizer that deletes text. A byte-level vocabulary may lack some bytes (SmolLM2's has no
token for 0x04, say); BPE without an unknown token drops them, so those bytes are not counted.
`token_bound` checks the tokenizer's structure (the JSON that `tokenizers` serializes) and returns
None where no sound bound exists; callers then skip the shortcut and tokenize.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tokenizers import Tokenizer as FastTokenizer

# Unicode normalization and lower-casing never delete a character, and they shrink the UTF-8
# length of a text by at most this factor: one character maps to at least one character (4 bytes
# to 1 at worst: U+1D400 MATHEMATICAL BOLD CAPITAL A -> "A"), and a composition joins at most 9
# bytes into 3 (Hangul L+V+T jamo into one syllable).
_UNICODE_SHRINK = 4
_UNICODE_NORMALIZERS = frozenset({"NFC", "NFD", "NFKC", "NFKD", "Lowercase"})
# Pre-tokenizers that only split (or, for Metaspace and ByteLevel, widen) text, never drop it.
_KEEPING_PRE_TOKENIZERS = frozenset({"ByteLevel", "Digits", "Metaspace", "UnicodeScripts"})
_SPLITTING_PRE_TOKENIZERS = frozenset({"Split", "Punctuation"})  # unless behavior is Removed
_UNK_CHAR_BYTES = 4  # an unfused unknown token stands for one character


@dataclass(frozen=True)
class TokenBound:
    max_bytes: int  # most input bytes one token stands for (times the normalizer's shrink)
    dropped: bytes = b""  # byte values the tokenizer silently drops

    def min_tokens(self, text: str) -> int:
        """A lower bound on the number of tokens `text` encodes to (special tokens added by a
        post-processor not counted)."""
        data = text.encode("utf-8", "surrogatepass")
        num_bytes = len(data.translate(None, self.dropped) if self.dropped else data)
        return -(-num_bytes // self.max_bytes)


def token_bound(tok: FastTokenizer) -> TokenBound | None:
    """The bound for this tokenizer, or None when no sound one exists."""
    spec = json.loads(tok.to_str())
    shrink = _normalizer_shrink(spec.get("normalizer"))
    if shrink is None or not _keeps_text(spec.get("pre_tokenizer")):
        return None
    added = tok.get_added_tokens_decoder().values()
    if any(t.lstrip or t.rstrip for t in added):
        return None  # such a token also swallows any amount of whitespace beside it
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        return None  # WordPiece, WordLevel and Unigram map whole unknown words to one token
    vocab = tok.get_vocab(with_added_tokens=False)
    byte_level = _has_byte_level(spec.get("pre_tokenizer")) or _has_byte_level(
        spec.get("normalizer")
    )
    dropped = b""
    if byte_level:
        alphabet = _byte_alphabet()
        missing = bytes(b for b, ch in enumerate(alphabet) if ch not in vocab)
        # bytes that never occur in UTF-8 (0xC0, 0xC1, 0xF5-0xFF) need no token
        dropped = bytes(b for b in missing if b < 0xC0 or 0xC2 <= b < 0xF5)
        if dropped and model.get("unk_token") is not None:
            if model.get("fuse_unk"):
                return None  # a run of unknown bytes becomes one token
            dropped = b""  # each unknown byte becomes one unknown token
        if dropped and spec.get("normalizer") is not None:
            return None  # normalizing could turn kept bytes into dropped ones
        chars = frozenset(alphabet)
        longest = max(
            (sum(1 if c in chars else len(c.encode()) for c in t) for t in vocab), default=1
        )
    else:
        has_bytes = all(f"<0x{b:02X}>" in vocab for b in range(256))
        falls_back = model.get("byte_fallback") and has_bytes  # every character has tokens
        # else a character outside the vocabulary becomes the unknown token, or vanishes
        if not falls_back and (model.get("unk_token") is None or model.get("fuse_unk")):
            return None
        longest = max([_UNK_CHAR_BYTES, *(len(t.encode()) for t in vocab)])
    longest = max([longest, *(len(t.content.encode()) for t in added)])
    return TokenBound(max(1, longest) * shrink, dropped)


def _normalizer_shrink(spec: dict[str, Any] | None) -> int | None:
    """How many times shorter (in UTF-8 bytes) the normalizer can make a text; None: unbounded
    (it can delete text) or unknown."""
    if spec is None:
        return 1
    kind = spec.get("type")
    if kind == "Sequence":
        total = 1
        for sub in spec.get("normalizers", []):
            factor = _normalizer_shrink(sub)
            if factor is None:
                return None
            total *= factor
        return total
    if kind in ("Prepend", "ByteLevel"):
        return 1
    if kind == "Replace":
        pattern = (spec.get("pattern") or {}).get("String")
        content = spec.get("content", "")
        if pattern is not None and len(content.encode()) >= len(pattern.encode()) > 0:
            return 1
        return None  # a regex, or a shorter replacement: it can delete text
    if kind in _UNICODE_NORMALIZERS:
        return _UNICODE_SHRINK
    return None  # Strip, StripAccents, BertNormalizer, Precompiled, ...: they delete text


def _keeps_text(spec: dict[str, Any] | None) -> bool:
    if spec is None:
        return True
    kind = spec.get("type")
    if kind == "Sequence":
        return all(_keeps_text(sub) for sub in spec.get("pretokenizers", []))
    if kind in _SPLITTING_PRE_TOKENIZERS:
        return str(spec.get("behavior", "")).lower() != "removed"
    return kind in _KEEPING_PRE_TOKENIZERS  # Whitespace, BertPreTokenizer, ...: drop spaces


def _has_byte_level(spec: dict[str, Any] | None) -> bool:
    if spec is None:
        return False
    if spec.get("type") == "ByteLevel":
        return True
    subs = spec.get("pretokenizers") or spec.get("normalizers") or []
    return any(_has_byte_level(sub) for sub in subs)


def _byte_alphabet() -> list[str]:
    """GPT-2's byte-to-character map: byte b is written as character [b]."""
    printable = {*range(33, 127), *range(161, 173), *range(174, 256)}
    chars = []
    extra = 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars

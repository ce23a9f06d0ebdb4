"""The cheap token-count lower bound: sound for every tokenizer it accepts (property test over
arbitrary and adversarial text), refused where no sound bound exists."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizer_utils import write_byte_level_gguf, write_spm_gguf
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as FastTokenizer

from tokenmill.engine.token_bounds import token_bound
from tokenmill.engine.tokenizer import Tokenizer
from utils_default import DEFAULT_GGUF, needs_default

# Text that stresses the bound: the default vocabulary's longest tokens, bytes it drops, special
# tokens, characters that normalization shrinks (NFKC: 4 bytes -> 1; Hangul jamo: 9 -> 3).
PIECES = [
    " " * 80, "\n" + " " * 80, "#" * 80, " " + "=" * 65, "-" * 64, "\x04", "\x1d\x04\x06",
    "\U00040000", "<|im_end|>", "<|endoftext|>", "<s>", "</s>", "<tool>", "𝐀𝐁", "ﬃ", "e\u0301",
    "\u1100\u1161\u11a8", "ẞ", "K", "hello world", "12345", "日本語", "😀", "\t\r\n",
]  # fmt: skip
TEXTS = st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=30)), max_size=12).map("".join)


def _check_sound(tok: Tokenizer, texts: list[str]) -> None:
    bound = tok.token_bound
    assert bound is not None
    for text in texts:
        num = len(tok.encode(text, add_special_tokens=False))
        assert num >= bound.min_tokens(text), (text, num, bound)


def _tokenizers(tmp: Path) -> dict[str, Tokenizer]:
    write_spm_gguf(tmp / "spm.gguf")
    write_byte_level_gguf(tmp / "b.gguf")
    toks = {
        "spm": Tokenizer.from_gguf(tmp / "spm.gguf"),
        "llama3-bpe": Tokenizer.from_gguf(tmp / "b.gguf"),
        "nfkc-unk": Tokenizer(_nfkc_unk()),
    }
    if DEFAULT_GGUF is not None:
        toks["smollm2"] = Tokenizer.from_gguf(DEFAULT_GGUF)
    return toks


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, Tokenizer]:
    return _tokenizers(tmp_path_factory.mktemp("bounds"))


@settings(
    max_examples=150, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck)
)
@given(texts=st.lists(TEXTS, min_size=1, max_size=4))
def test_bound_is_sound(tokenizers: dict[str, Tokenizer], texts: list[str]) -> None:
    for tok in tokenizers.values():
        _check_sound(tok, texts)


@needs_default
def test_default_model_bound(tokenizers: dict[str, Tokenizer]) -> None:
    smol = tokenizers["smollm2"]
    bound = smol.token_bound
    assert bound is not None
    assert bound.max_bytes == 81  # "\n" + 80 spaces is one token
    # SmolLM2 has no token for these bytes: byte-level BPE without an unknown token drops them
    assert smol.encode("\x04" * 100, add_special_tokens=False) == []
    assert bound.min_tokens("\x04" * 100) == 0
    assert bound.min_tokens("a" * 810) == 10
    assert bound.min_tokens("x" * 10_000_000) > 8192 * 4  # 10 MB: rejected untokenized
    longest = "\n" + " " * 80
    assert (
        len(smol.encode(longest * 3, add_special_tokens=False))
        == 3
        == bound.min_tokens(longest * 3)
    )


def test_hf_folder_bound_matches_gguf(tmp_path: Path, tokenizers: dict[str, Tokenizer]) -> None:
    transformers = pytest.importorskip("transformers")
    write_spm_gguf(tmp_path / "spm.gguf")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="spm.gguf")
    hf.save_pretrained(tmp_path / "hf")
    folder = Tokenizer.from_pretrained(tmp_path / "hf")  # Metaspace-style tokenizer.json
    _check_sound(folder, ["hello  world ", " " * 50, "hé 😀", "<s>x</s>" * 3])


def _bpe(*, byte_level: bool = False, **model_kw) -> FastTokenizer:
    vocab = {"<unk>": 0, "a": 1, "b": 2, "ab": 3}
    if byte_level:
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    tok = FastTokenizer(models.BPE(vocab=vocab, merges=[], **model_kw))
    if byte_level:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
    return tok


def _nfkc_unk() -> FastTokenizer:
    tok = _bpe(unk_token="<unk>")
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    return tok


def test_refused_where_no_bound_holds() -> None:
    assert token_bound(_bpe(byte_level=True)) is not None
    assert token_bound(_bpe(unk_token="<unk>")) is not None
    assert token_bound(_bpe(unk_token="<unk>", fuse_unk=True)) is None  # a run: one token
    assert token_bound(_bpe()) is None  # unknown characters vanish
    lstrip = _bpe(byte_level=True)
    lstrip.add_special_tokens([AddedToken("<mask>", lstrip=True)])  # eats the spaces before it
    assert token_bound(lstrip) is None
    for normalizer in (
        normalizers.Strip(),
        normalizers.StripAccents(),
        normalizers.Replace(Regex(" +"), " "),
        normalizers.Replace("ab", "a"),
    ):
        tok = _bpe(unk_token="<unk>")
        tok.normalizer = normalizer
        assert token_bound(tok) is None, normalizer
    for pre in (
        pre_tokenizers.Whitespace(),
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(" ", behavior="removed"),
    ):
        tok = _bpe(unk_token="<unk>")
        tok.pre_tokenizer = pre
        assert token_bound(tok) is None, pre
    wordpiece = FastTokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    assert token_bound(wordpiece) is None
    shrinking = token_bound(_nfkc_unk())
    assert shrinking is not None and shrinking.max_bytes == 5 * 4 * 4  # "<unk>", NFKC, lower

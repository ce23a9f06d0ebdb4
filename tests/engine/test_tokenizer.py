"""Tokenizer: GGUF byte-level BPE parity with transformers, SentencePiece GGUFs, chat templates."""

from __future__ import annotations

import json
import random

import gguf
import jinja2
import pytest
from tokenizer_utils import write_byte_level_gguf, write_spm_gguf
from tokenizers import Tokenizer as FastTokenizer
from tokenizers import pre_tokenizers

from tokenmill.engine.tokenizer import Tokenizer
from tokenmill.errors import ModelLoadError
from utils_default import DEFAULT_GGUF, needs_default

TEXTS = [
    "Hello world!",
    "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(12345))",
    "digits 12345 and 3.14159, 1,000,000 and 2024-01-01",
    "naïve café — 日本語のテキスト, Ελληνικά, русский",
    "emoji 😀👍🏽 🇫🇷 family 👨‍👩‍👧 ✨",
    "multiple   spaces\n\n\nnewlines\t\ttabs   ",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    " leading space",
    "I'm sure you're right, they'll see; WE'VE",
    "<|endoftext|>text<repo_name>x",
    "",
]
MESSAGES = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello. How can I help?"},
    {"role": "user", "content": "What is 2+2? Answer with 👍 if sure."},
]


@pytest.fixture(scope="module")
def smol() -> Tokenizer:
    return Tokenizer.from_gguf(DEFAULT_GGUF)


@pytest.fixture(scope="module")
def hf_gguf():
    transformers = pytest.importorskip("transformers")
    gguf = DEFAULT_GGUF
    return transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def _random_texts(n: int) -> list[str]:
    rng = random.Random(0)
    alphabet = "abc XYZ 0123456789 \n\t.,;:!?'\"()[]{}<>|éü日本😀-_=+*/\\"
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(n)]


@needs_default
def test_ids_match_transformers_gguf(smol, hf_gguf):
    for text in TEXTS:
        assert smol.encode(text) == hf_gguf.encode(text), text
        ids = smol.encode(text)
        assert smol.decode(ids, skip_special_tokens=False) == text
        assert smol.decode(ids) == hf_gguf.decode(ids, skip_special_tokens=True)


@needs_default
def test_digit_split_matches_smollm_pre_tokenizer(smol, hf_gguf):
    """`tokenizer.ggml.pre == "smollm"` splits digits individually before the GPT-2 regex (as
    llama.cpp and SmolLM2's tokenizer.json do); transformers' GGUF loader uses the plain GPT-2
    regex, which differs only for whitespace right before a digit."""
    reference = FastTokenizer.from_str(hf_gguf.backend_tokenizer.to_str())
    reference.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    for text in TEXTS + _random_texts(200):
        ids = smol.encode(text)
        assert ids == reference.encode(text).ids, text
        assert smol.decode(ids, skip_special_tokens=False) == text
    assert smol.convert_ids_to_tokens(smol.encode("a  1")) == ["a", "ĠĠ", "1"]


@needs_default
def test_special_tokens(smol, hf_gguf):
    assert smol.vocab_size == 49152 == len(hf_gguf)
    assert smol.bos_token_id == 1 and smol.eos_token_id == 2
    assert smol.bos_token == "<|im_start|>" and smol.eos_token == "<|im_end|>"
    assert {2, 0} <= smol.eos_token_ids  # <|im_end|> and <|endoftext|> end generation
    assert set(hf_gguf.all_special_ids) <= set(smol.all_special_ids)
    assert smol.encode("<|im_start|>") == [1]
    assert smol.decode([1, 19556, 2]) == "Hello"
    assert smol.convert_ids_to_tokens([19556, 905]) == hf_gguf.convert_ids_to_tokens([19556, 905])
    assert smol.id_to_piece_text(905) == " world"


@needs_default
def test_chat_template_matches_transformers(smol, hf_gguf):
    for msgs in (MESSAGES, MESSAGES[1:], MESSAGES[:2]):
        for add_gen in (True, False):
            ours = smol.apply_chat_template(msgs, add_generation_prompt=add_gen)
            ref = hf_gguf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_gen)
            assert ours == ref


def test_template_helpers_and_errors():
    tok = Tokenizer(FastTokenizer.from_str(_bpe_json()), eos_token_id=0)
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    tok.chat_template = (
        "{% if messages|length > 1 %}{{ raise_exception('one message only') }}{% endif %}"
        "{{ messages[0]|tojson }}|{{ strftime_now('%Y') }}|{{ eos_token }}|{{ custom }}"
    )
    out = tok.apply_chat_template([{"role": "user", "content": "é", "name": None}], custom=7)
    year = out.split("|")[1]
    assert out == f'{{"role": "user", "content": "é"}}|{year}|a|7' and year.isdigit()
    with pytest.raises(jinja2.TemplateError, match="one message only"):
        tok.apply_chat_template([{"role": "user", "content": "a"}] * 2)


def _bpe_json() -> str:
    vocab = {"a": 0, "b": 1, "ab": 2}
    model = {"type": "BPE", "vocab": vocab, "merges": [["a", "b"]]}
    return json.dumps({"version": "1.0", "model": model, "added_tokens": []})


@needs_default
def test_from_pretrained_folder(tmp_path, hf_gguf, smol):
    hf_gguf.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.eos_token_id == 2 and tok.eos_token_ids == {0, 2}
    assert tok.chat_template == smol.chat_template
    assert tok.apply_chat_template(MESSAGES) == smol.apply_chat_template(MESSAGES)
    for text in TEXTS:
        assert tok.encode(text) == hf_gguf.encode(text)


@needs_default
def test_from_pretrained_gguf_file(smol):
    tok = Tokenizer.from_pretrained(DEFAULT_GGUF)
    assert tok.encode(TEXTS[3]) == smol.encode(TEXTS[3])


def test_from_pretrained_unreachable_hub_id(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="no-such-org/no-such-model"):
        Tokenizer.from_pretrained("no-such-org/no-such-model")


def test_sentencepiece_gguf(tmp_path):
    ids = write_spm_gguf(tmp_path / "spm.gguf")
    tok = Tokenizer.from_gguf(tmp_path / "spm.gguf")
    assert tok.encode("hello world") == [1, ids["▁hello"], ids["▁world"]]
    assert tok.encode("hello world", add_special_tokens=False) == [ids["▁hello"], ids["▁world"]]
    assert tok.decode(tok.encode("hello world")) == "hello world"
    assert tok.encode(" hello", add_special_tokens=False) == [ids["▁"], ids["▁hello"]]
    assert tok.encode("hé", add_special_tokens=False) == [ids["▁h"], ids["<0xC3>"], ids["<0xA9>"]]
    # like llama.cpp and Llama-2's (legacy) tokenizer.json: text after a special token gets "▁"
    assert tok.encode("<s>hello</s>", add_special_tokens=False) == [1, ids["▁hello"], 2]
    assert tok.encode("hello<tool>", add_special_tokens=False) == [ids["▁hello"], ids["<tool>"]]
    for text in ["hello world", "hé 😀 wörld", " hello  world", "line\nbreak\t", "x<tool>"]:
        assert tok.decode(tok.encode(text)) == text, text
    assert tok.decode([1, ids["▁hello"], 2], skip_special_tokens=False) == "<s> hello</s>"
    assert tok.bos_token_id == 1 and tok.eos_token_ids == {2}
    assert set(tok.all_special_ids) == {0, 1, 2}
    assert tok.vocab_size == len(ids)


def test_sentencepiece_gguf_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    write_spm_gguf(tmp_path / "spm.gguf")
    ours = Tokenizer.from_gguf(tmp_path / "spm.gguf")
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="spm.gguf")
    # transformers' GGUF loader builds the non-legacy tokenizer (Metaspace), which differs after
    # a special token ("<s>hello": "h", ... not "▁hello") and for a leading space (no extra "▁")
    for text in ["hello world", "hé 😀 wörld", "hello  world ", "x\ny", "hello<s>"]:
        assert ours.encode(text) == ref.encode(text), text
        assert ours.decode(ours.encode(text)) == ref.decode(
            ref.encode(text), skip_special_tokens=True
        )


def test_sentencepiece_without_space_prefix(tmp_path):
    ids = write_spm_gguf(tmp_path / "spm.gguf", add_space_prefix=False)
    tok = Tokenizer.from_gguf(tmp_path / "spm.gguf")
    assert tok.encode(" hello", add_special_tokens=False) == [ids["▁hello"]]
    assert tok.decode(tok.encode(" hello world")) == " hello world"


def test_byte_level_gguf_llama3_style(tmp_path):
    tokens = write_byte_level_gguf(tmp_path / "b.gguf")
    tok = Tokenizer.from_gguf(tmp_path / "b.gguf")
    bos, the = len(tokens) - 2, tokens.index("Ġthe")
    assert tok.encode(" the") == [bos, the]
    assert tok.decode(tok.encode("  the 12345 é<|eot_id|>")) == "  the 12345 é"
    assert tok.eos_token_ids == {len(tokens) - 1}
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "<|begin_of_text|>x"


def test_unsupported_tokenizer_model(tmp_path):
    w = gguf.GGUFWriter(tmp_path / "t.gguf", "llama")
    w.add_tokenizer_model("t5")
    w.add_token_list(["a", "b"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match="'t5'"):
        Tokenizer.from_gguf(tmp_path / "t.gguf")

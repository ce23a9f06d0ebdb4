"""A fast tokenizer built from a GGUF file's `tokenizer.ggml.*` metadata: gpt2 byte-level BPE or
llama SentencePiece BPE, with llama.cpp's special and end-of-generation tokens."""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _FastTokenizer

from tokenmill.errors import ModelLoadError
from tokenmill.loader.gguf import GGUFFile

# llama.cpp token types (tokenizer.ggml.token_type)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> the regex of that model's own tokenizer.json; None: GPT-2's regex
_SPLIT_BY_PRE: dict[str, str] = {
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "falcon3"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT),
}
# SmolLM/StarCoder tokenizer.json: Digits(individual) then GPT-2's byte-level regex
_DIGIT_SPLIT_PRE = frozenset({"smollm", "starcoder", "refact"})
# llama-3's tokenizer.json sets ignore_merges (whole pre-tokens found in the vocab win)
_IGNORE_MERGES_PRE = frozenset({"llama-bpe", "llama3", "llama-v3", "smaug-bpe"})
# Token texts llama.cpp treats as end-of-generation (llama-vocab.cpp, special_eog_ids)
_EOG_TEXTS = frozenset(
    {
        "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>",
        "<|endoftext|>", "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>",
        "<end_of_utterance>",
    }
)  # fmt: skip


@dataclass
class GGUFVocabulary:
    """What Tokenizer's constructor takes, as a GGUF file describes it."""

    backend: _FastTokenizer
    bos_token_id: int | None
    eos_token_id: int | None
    eos_token_ids: set[int]
    chat_template: str | None
    template_vars: dict[str, str]


def gguf_vocabulary(f: GGUFFile) -> GGUFVocabulary:
    """The tokenizer described by `f`'s `tokenizer.ggml.*` metadata."""
    kind = f.get("tokenizer.ggml.model")
    tokens: list[str] | None = f.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ModelLoadError(f"GGUF file {f.path} has no tokenizer vocabulary")
    types: list[int] = f.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    if kind not in ("gpt2", "llama"):
        raise ModelLoadError(
            f"GGUF file {f.path}: tokenizer model {kind!r} is not supported "
            "(supported: gpt2, llama)"
        )
    tok = _byte_level_bpe(f, tokens) if kind == "gpt2" else _sentencepiece_bpe(f, tokens, types)
    _add_gguf_special_tokens(tok, tokens, types)
    bos = f.get("tokenizer.ggml.bos_token_id")
    eos = f.get("tokenizer.ggml.eos_token_id")
    add_bos = bos is not None and f.get("tokenizer.ggml.add_bos_token", kind == "llama")
    add_eos = eos is not None and f.get("tokenizer.ggml.add_eos_token", False)
    if add_bos or add_eos:
        pre, post = [tokens[bos]] * add_bos, [tokens[eos]] * add_eos
        tok.post_processor = processors.TemplateProcessing(
            single=[*pre, "$A", *post],
            pair=[*pre, "$A", *post, *pre, "$B:1", *post],
            special_tokens=[(t, tok.token_to_id(t)) for t in dict.fromkeys(pre + post)],
        )
    eos_ids = {
        f.get(f"tokenizer.ggml.{k}") for k in ("eos_token_id", "eot_token_id", "eom_token_id")
    }
    eos_ids |= {i for i, t in enumerate(tokens) if t in _EOG_TEXTS}
    eos_ids.discard(None)
    template_vars = {}
    for name in ("unk", "padding"):
        tid = f.get(f"tokenizer.ggml.{name}_token_id")
        if tid is not None and 0 <= tid < len(tokens):
            template_vars["pad_token" if name == "padding" else "unk_token"] = tokens[tid]
    return GGUFVocabulary(
        backend=tok,
        bos_token_id=bos,
        eos_token_id=eos,
        eos_token_ids=eos_ids,
        chat_template=f.get("tokenizer.chat_template"),
        template_vars=template_vars,
    )


def _byte_level_bpe(f: GGUFFile, tokens: list[str]) -> _FastTokenizer:
    merges = f.get("tokenizer.ggml.merges")
    if merges is None:
        raise ModelLoadError(f"GGUF file {f.path}: gpt2 tokenizer without tokenizer.ggml.merges")
    pre = f.get("tokenizer.ggml.pre") or "default"
    vocab = {t: i for i, t in reversed(list(enumerate(tokens)))}  # first id wins on duplicates
    bpe = models.BPE(
        vocab=vocab,
        merges=[tuple(m.split(" ", 1)) for m in merges],
        ignore_merges=pre in _IGNORE_MERGES_PRE,
    )
    tok = _FastTokenizer(bpe)
    split = _SPLIT_BY_PRE.get(pre)
    if split is not None:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    elif pre in _DIGIT_SPLIT_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(f: GGUFFile, tokens: list[str], types: list[int]) -> _FastTokenizer:
    scores: list[float] = f.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    vocab = {t: i for i, t in reversed(list(enumerate(tokens)))}
    # SentencePiece BPE merges the pair whose merged piece scores highest: rebuild merges from
    # scores, ordered like transformers' generate_merges
    normal = {t: i for t, i in vocab.items() if types[i] in (_NORMAL, _USER_DEFINED)}
    ranked = []
    for piece, i in normal.items():
        local = [
            (piece[:k], piece[k:])
            for k in range(1, len(piece))
            if piece[:k] in normal and piece[k:] in normal
        ]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        ranked.extend((scores[i], a, b) for a, b in local)
    ranked.sort(key=lambda m: (m[0], len(m[1]), len(m[2])), reverse=True)
    unk_id = f.get("tokenizer.ggml.unknown_token_id")
    bpe = models.BPE(
        vocab=vocab,
        merges=[(a, b) for _, a, b in ranked],
        unk_token=tokens[unk_id] if unk_id is not None else None,
        fuse_unk=True,
        byte_fallback=True,
    )
    tok = _FastTokenizer(bpe)
    add_prefix = bool(f.get("tokenizer.ggml.add_space_prefix", True))
    # Llama-2's tokenizer.json (legacy) and llama.cpp: every text fragment, including one that
    # follows a special token ("<s>[INST]"), gets the dummy-prefix "▁", as in training
    replace = normalizers.Replace(" ", "▁")
    tok.normalizer = (
        normalizers.Sequence([normalizers.Prepend("▁"), replace]) if add_prefix else replace
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def _add_gguf_special_tokens(tok: _FastTokenizer, tokens: list[str], types: list[int]) -> None:
    """Control/unknown tokens become special added tokens, user-defined ones plain added tokens,
    so both are matched whole in the input text instead of being split by BPE."""
    special = [
        AddedToken(t, special=True, normalized=False)
        for t, ty in zip(tokens, types, strict=False)
        if ty in (_CONTROL, _UNKNOWN)
    ]
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, ty in zip(tokens, types, strict=False)
        if ty == _USER_DEFINED
    ]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)

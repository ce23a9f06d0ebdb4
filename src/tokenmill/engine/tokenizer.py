"""Tokenizer: a fast `tokenizers.Tokenizer` plus special ids and the model's chat template.

Built from GGUF metadata (gpt2 byte-level BPE or llama SentencePiece) or from an HF folder.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _FastTokenizer

from tokenmill.engine.token_bounds import TokenBound, token_bound
from tokenmill.errors import ModelLoadError, check_unicode
from tokenmill.loader.gguf import GGUFFile, read_gguf

if TYPE_CHECKING:
    from tokenmill.engine.chat_encoding import ChatEncoder

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


class Tokenizer:
    """Encode/decode text and render chat prompts for one model."""

    def __init__(
        self,
        tokenizer: _FastTokenizer,
        *,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        eos_token_ids: Iterable[int] = (),
        chat_template: str | None = None,
        special_ids: Iterable[int] = (),
        template_vars: dict[str, str] | None = None,
    ) -> None:
        self._tok = tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        eos = set(eos_token_ids)
        if eos_token_id is not None:
            eos.add(eos_token_id)
        self.eos_token_ids: frozenset[int] = frozenset(eos)
        self.chat_template = chat_template
        added = tokenizer.get_added_tokens_decoder()
        ids = {i for i, t in added.items() if t.special} | set(special_ids) | eos
        if bos_token_id is not None:
            ids.add(bos_token_id)
        self.all_special_ids: list[int] = sorted(ids)
        self._template_vars = dict(template_vars or {})
        for name, tid in (("bos_token", bos_token_id), ("eos_token", eos_token_id)):
            if tid is not None and name not in self._template_vars:
                self._template_vars[name] = tokenizer.id_to_token(tid) or ""

    @property
    def backend(self) -> _FastTokenizer:
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> str | None:
        return self._template_vars.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self._template_vars.get("eos_token")

    def encode(
        self, text: str, add_special_tokens: bool = True, parse_special: bool = True
    ) -> list[int]:
        """Token ids of `text`. Special-token strings in it become their control tokens, unless
        not `parse_special` (then they are text like any other). Raises InvalidRequestError for
        text that is not valid Unicode. Releases the GIL while it works (the batch call does,
        `encode` does not), so other threads run meanwhile."""
        tok = self._tok if parse_special else self._text_backend
        try:
            return tok.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0].ids
        except TypeError:
            if isinstance(text, str):
                check_unicode(text)  # "TextEncodeInput must be ...": a lone surrogate
            raise

    @functools.cached_property
    def _text_backend(self) -> _FastTokenizer:
        tok = _FastTokenizer.from_str(self._tok.to_str())
        tok.encode_special_tokens = True
        return tok

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = list(ids)
        if len(ids) > _DECODE_RELEASE_GIL:  # the batch call releases the GIL
            return self._tok.decode_batch([ids], skip_special_tokens=skip_special_tokens)[0]
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    @functools.cached_property
    def token_bound(self) -> TokenBound | None:
        """A cheap lower bound on encoded lengths (see token_bounds), or None where none holds."""
        return token_bound(self._tok)

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        *,
        allow_special_in_content: bool = False,
        check_text: Callable[[str], None] | None = None,
        **kwargs: Any,
    ) -> list[int]:
        """The prompt ids of a conversation through the chat template. Special-token strings in
        the messages stay text unless `allow_special_in_content` (see chat_encoding);
        `check_text(rendered)` runs before tokenizing (a length bound, say)."""
        return self._chat_encoder.encode(
            messages, add_generation_prompt, allow_special_in_content, check_text, **kwargs
        )

    @functools.cached_property
    def _chat_encoder(self) -> ChatEncoder:
        from tokenmill.engine.chat_encoding import ChatEncoder

        return ChatEncoder(self)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self._tok.id_to_token(int(i)) for i in ids]

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_piece_text(self, token_id: int) -> str:
        """The text one token decodes to on its own (special tokens included)."""
        return self._tok.decode([token_id], skip_special_tokens=False)

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    @chat_template.setter
    def chat_template(self, template: str | None) -> None:
        self._chat_template = template
        self._compiled: jinja2.Template | None = None

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render `messages` with the model's Jinja chat template, as transformers does."""
        if self._chat_template is None:
            raise ValueError(
                "this model's tokenizer has no chat template; pass a plain prompt instead"
            )
        if self._compiled is None:
            self._compiled = _jinja_env().from_string(self._chat_template)
        # transformers drops None-valued keys (e.g. OpenAI's content=None with tool_calls)
        msgs = [{k: v for k, v in m.items() if v is not None} for m in messages]
        variables = {**self._template_vars, **kwargs}
        return self._compiled.render(
            messages=msgs,
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )

    @classmethod
    def from_gguf(cls, source: str | os.PathLike[str] | GGUFFile) -> Tokenizer:
        """Build the tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata."""
        f = source if isinstance(source, GGUFFile) else read_gguf(source)
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
        return cls(
            tok,
            bos_token_id=bos,
            eos_token_id=eos,
            eos_token_ids=eos_ids,
            chat_template=f.get("tokenizer.chat_template"),
            template_vars=template_vars,
        )

    @classmethod
    def from_pretrained(
        cls, path_or_id: str | os.PathLike[str], *, revision: str | None = None,
        trust_remote_code: bool = False,
    ) -> Tokenizer:  # fmt: skip
        """Load from an HF folder, a .gguf file, or a hub id (through huggingface_hub)."""
        path = Path(path_or_id)
        if path.is_file() and path.suffix == ".gguf":
            return cls.from_gguf(path)
        if not path.is_dir():
            path = _snapshot(str(path_or_id), revision)
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        except Exception as e:
            raise ModelLoadError(f"cannot load a tokenizer from {path}: {e}") from e
        backend = getattr(hf, "backend_tokenizer", None)
        if backend is None:
            raise ModelLoadError(f"{path}: no fast tokenizer (tokenizer.json) could be built")
        template = hf.chat_template
        if isinstance(template, dict):
            template = template.get("default") or next(iter(template.values()), None)
        eos_ids: set[int] = set()
        for name in ("generation_config.json", "config.json"):
            eos = _read_json(path / name).get("eos_token_id")
            eos_ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
        return cls(
            backend,
            bos_token_id=hf.bos_token_id,
            eos_token_id=hf.eos_token_id,
            eos_token_ids=eos_ids,
            chat_template=template,
            special_ids=hf.all_special_ids,
            template_vars={
                k: str(v) for k, v in hf.special_tokens_map.items() if isinstance(v, str)
            },
        )


_DECODE_RELEASE_GIL = 1024  # longer id lists are decoded with the GIL released


def _jinja_env() -> ImmutableSandboxedEnvironment:
    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any, ensure_ascii: bool = False, indent: int | None = None,
        separators: tuple[str, str] | None = None, sort_keys: bool = False,
    ) -> str:  # fmt: skip
        # unlike Jinja's own tojson: no HTML escaping, same options as transformers
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


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


def _snapshot(repo_id: str, revision: str | None) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=["*.json", "*.jinja", "*.model", "*.txt", "*.tiktoken"],
            )
        )
    except Exception as e:
        raise ModelLoadError(
            f"tokenizer {repo_id!r} is not a local folder and could not be fetched from the "
            f"Hugging Face Hub ({type(e).__name__}: {e})"
        ) from e


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}

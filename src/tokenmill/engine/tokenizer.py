"""Tokenizer: a fast `tokenizers.Tokenizer` plus special ids and the model's chat template.

Built from GGUF metadata (see gguf_tokenizer) or from an HF folder; chat templates are rendered
by chat_template, chat prompts encoded by chat_encoding.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
from tokenizers import Tokenizer as _FastTokenizer

from tokenmill.engine.chat_template import compile_chat_template, render_chat_template
from tokenmill.engine.gguf_tokenizer import gguf_vocabulary
from tokenmill.engine.token_bounds import TokenBound, token_bound
from tokenmill.errors import ModelLoadError, check_unicode
from tokenmill.loader.gguf import GGUFFile, read_gguf

if TYPE_CHECKING:
    from tokenmill.engine.chat_encoding import ChatEncoder


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
            self._compiled = compile_chat_template(self._chat_template)
        variables = {**self._template_vars, **kwargs}
        return render_chat_template(
            self._compiled, messages, add_generation_prompt, tools, documents, variables
        )

    @classmethod
    def from_gguf(cls, source: str | os.PathLike[str] | GGUFFile) -> Tokenizer:
        """Build the tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata."""
        f = source if isinstance(source, GGUFFile) else read_gguf(source)
        vocab = gguf_vocabulary(f)
        return cls(
            vocab.backend,
            bos_token_id=vocab.bos_token_id,
            eos_token_id=vocab.eos_token_id,
            eos_token_ids=vocab.eos_token_ids,
            chat_template=vocab.chat_template,
            template_vars=vocab.template_vars,
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

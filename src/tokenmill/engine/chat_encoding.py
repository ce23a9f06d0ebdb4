"""Chat prompts to token ids, with the messages' text kept as text.

The template's own control tokens ("<|im_start|>", "<|im_end|>", ...) must be real control
tokens, but the same strings inside a message must not be: a user message "hi<|im_end|>\\n
<|im_start|>system\\n..." would otherwise forge a system turn. So:

- a conversation whose strings contain no special-token text is rendered and encoded as a whole,
  as it always was: the same ids, whatever the tokenizer;
- otherwise every special-token string in the messages is replaced by a private-use marker, the
  template is rendered with those, the result is split at the special-token strings (all of
  them now the template's own), and each piece between them is encoded with special-token
  parsing off, after its markers are turned back into the strings they stand for. Tokenizers
  split at special tokens and encode the pieces between independently in the same way, so the
  template's part of the prompt is tokenized exactly as before.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenmill.engine.tokenizer import Tokenizer

# Markers are private-use code points (plane 16), which templates pass through untouched:
# _ESC, then two digits in base _RADIX. A literal _ESC in a message is written _ESC _ESC.
_ESC = "\U0010fffd"
_BASE = 0x100000
_RADIX = 0xFFFD  # digits are _BASE .. _BASE + _RADIX - 1, all below _ESC
_UNESCAPE = re.compile(f"{_ESC}(?:({_ESC})|([{chr(_BASE)}-{chr(_BASE + _RADIX - 1)}]{{2}}))")


class ChatEncoder:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        backend = tokenizer.backend
        added = [(i, t) for i, t in backend.get_added_tokens_decoder().items() if t.special]
        self._ids = {t.content: i for i, t in added if t.content}
        self._strings = sorted(self._ids)
        self._index = {s: j for j, s in enumerate(self._strings)}
        self._pattern = _trie_regex(self._strings) if self._strings else None
        normalized = any(t.normalized for _, t in added)  # matched after the normalizer
        self._normalizer = backend.normalizer if normalized else None

    def encode(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool,
        allow_special_in_content: bool,
        check_text: Callable[[str], None] | None,
        **kwargs: Any,
    ) -> list[int]:
        tok = self._tok
        text = tok.apply_chat_template(messages, add_generation_prompt, **kwargs)
        if check_text is not None:
            check_text(text)
        if allow_special_in_content or not any(map(self._has_special, _strings(messages))):
            return tok.encode(text, add_special_tokens=False)
        escaped = self._escape_all(messages)
        marked = tok.apply_chat_template(escaped, add_generation_prompt, **kwargs)
        assert self._pattern is not None
        ids: list[int] = []
        pos = 0
        for m in self._pattern.finditer(marked):
            ids += self._encode_text(marked[pos : m.start()])
            ids.append(self._ids[m.group()])
            pos = m.end()
        ids += self._encode_text(marked[pos:])
        return ids

    def _has_special(self, s: str) -> bool:
        if self._pattern is None:
            return False
        if self._pattern.search(s) is not None:
            return True
        # tokens matched after normalization: e.g. NFKC turns fullwidth forms into ASCII
        return self._normalizer is not None and bool(
            self._pattern.search(self._normalizer.normalize_str(s))
        )

    def _escape(self, s: str) -> str:
        assert self._pattern is not None
        s = s.replace(_ESC, _ESC + _ESC)
        return self._pattern.sub(lambda m: _marker(self._index[m.group()]), s)

    def _escape_all(self, value: Any) -> Any:
        if isinstance(value, str):
            return self._escape(value)
        if isinstance(value, dict):
            return {k: self._escape_all(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._escape_all(v) for v in value]
        return value

    def _unescape(self, s: str) -> str:
        def back(m: re.Match[str]) -> str:
            if m.group(1):
                return _ESC
            hi, lo = (ord(c) - _BASE for c in m.group(2))
            j = hi * _RADIX + lo
            return self._strings[j] if j < len(self._strings) else m.group()

        return _UNESCAPE.sub(back, s) if _ESC in s else s

    def _encode_text(self, marked: str) -> list[int]:
        if not marked:
            return []
        return self._tok.encode(
            self._unescape(marked), add_special_tokens=False, parse_special=False
        )


def _marker(j: int) -> str:
    hi, lo = divmod(j, _RADIX)
    return f"{_ESC}{chr(_BASE + hi)}{chr(_BASE + lo)}"


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def _trie_regex(strings: list[str]) -> re.Pattern[str]:
    """A regex matching any of `strings`, longest first at each position (as tokenizers'
    added-token matcher does), factored into a trie so a scan costs one branch per character."""
    trie: dict[str, Any] = {}
    for s in strings:
        node = trie
        for ch in s:
            node = node.setdefault(ch, {})
        node[""] = {}  # end of a string

    def build(node: dict[str, Any]) -> str:
        branches = [re.escape(ch) + build(child) for ch, child in sorted(node.items()) if ch]
        if not branches:
            return ""
        alt = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return f"(?:{alt})?" if "" in node else alt

    return re.compile(build(trie))

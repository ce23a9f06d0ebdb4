"""Incremental detokenization with stop strings.

Text is decoded over a sliding window of token ids (vLLM's prefix/read offsets): the delta of a
step is decode(ids[prefix:]) minus decode(ids[prefix:read]), so decoders that depend on
neighbours (BPE spaces, SentencePiece's stripped leading space, byte fallback) see context, and
text ending in U+FFFD (an incomplete UTF-8 sequence) is held until the next token completes it.
The output is decoded on its own, without prompt context, so `text` equals
`tokenizer.decode(output_ids)` (up to a stop string).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

_REPLACEMENT = "\ufffd"


class _Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Turns a stream of output token ids into text deltas, cutting at stop strings.

    Invariant: the concatenation of every delta returned by `update` and `flush` equals `text`
    once the request ends; no part of a stop string is ever returned unless
    `include_stop_str_in_output`.
    """

    def __init__(
        self,
        tokenizer: _Decoder,
        prompt_token_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
    ) -> None:
        self._tokenizer = tokenizer
        # kept for callers; decoding deliberately ignores it (see module docstring)
        self.prompt_token_ids = list(prompt_token_ids)
        self._skip = skip_special_tokens
        self._stops = [s for s in dict.fromkeys(stop) if s]
        self._max_stop = max((len(s) for s in self._stops), default=0)
        self._include_stop = include_stop_str_in_output
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0
        self._decoded = ""  # all complete text decoded so far, before stop truncation
        self._emitted = 0  # chars of the output already returned to the caller
        self._final: str | None = None  # set once a stop string matched
        self.stop_reason: str | None = None

    @property
    def text(self) -> str:
        """The output text so far (cut at the stop string once one matched)."""
        return self._final if self._final is not None else self._decoded

    @property
    def output_token_ids(self) -> list[int]:
        return list(self._ids)

    @property
    def stopped(self) -> bool:
        return self._final is not None

    def update(self, new_token_ids: Sequence[int]) -> tuple[str, str | None]:
        """Add tokens; return (text safe to emit now, matched stop string or None).

        After a stop string matched, further tokens are ignored and ("", None) is returned.
        """
        if self._final is not None:
            return "", None
        start = len(self._decoded)
        for tid in new_token_ids:
            self._ids.append(int(tid))
            self._step()
        return self._check(start)

    def flush(self) -> str:
        """End of request without a stop string: return the text held back so far."""
        if self._final is not None:
            return ""
        start = len(self._decoded)
        if self._read < len(self._ids):
            # an incomplete UTF-8 tail stays incomplete: emit it as decode() would (U+FFFD)
            prefix_text = self._decode(self._ids[self._prefix : self._read])
            self._decoded += self._decode(self._ids[self._prefix :])[len(prefix_text) :]
            self._prefix = self._read = len(self._ids)
        delta, _ = self._check(start)
        if self._final is not None:
            return delta
        delta += self._decoded[self._emitted :]
        self._emitted = len(self._decoded)
        return delta

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip) if ids else ""

    def _step(self) -> None:
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT):
            self._decoded += new_text[len(prefix_text) :]
            self._prefix = self._read
            self._read = len(self._ids)

    def _check(self, start: int) -> tuple[str, str | None]:
        """Look for a stop string in text added since `start`; return the emittable delta."""
        text = self._decoded
        if self._stops:
            # a match may begin up to max_stop - 1 chars before the new text
            lo = max(0, start - self._max_stop + 1)
            best: tuple[int, str] | None = None
            for s in self._stops:
                i = text.find(s, lo)
                if i != -1 and (best is None or i < best[0]):
                    best = (i, s)
            if best is not None:
                i, s = best
                end = i + len(s) if self._include_stop else i
                self._final = text[:end]
                self.stop_reason = s
                delta = self._final[self._emitted :]
                self._emitted = len(self._final)
                return delta, s
        safe = len(text) - (0 if self._include_stop else self._held_back(text))
        delta = text[self._emitted : safe] if safe > self._emitted else ""
        self._emitted = max(self._emitted, safe)
        return delta, None

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        for n in range(min(self._max_stop - 1, len(text)), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self._stops):
                return n
        return 0

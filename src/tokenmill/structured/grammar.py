"""One request's grammar state: its compiled grammar (maybe still compiling) and its matcher."""

from __future__ import annotations

from concurrent.futures import Future

import numpy as np
import torch
import xgrammar as xgr


class RequestGrammar:
    """Implements request.GrammarState. Used only on the engine's thread (scheduler, sampler and
    output update all run there); the compiled grammar comes from the manager's pool."""

    def __init__(self, compiled: Future[xgr.CompiledGrammar]) -> None:
        self._compiled = compiled
        self._matcher: xgr.GrammarMatcher | None = None
        self._vocab = 0  # the tokenizer's vocabulary size, read once with the matcher
        # forced_tokens' two bitmask rows (made on first use) and their numpy views: each call
        # fills row `_flip` first and keeps it, later fills of that call go to the other row.
        self._rows: torch.Tensor | None = None
        self._row_views: tuple[tuple[torch.Tensor, np.ndarray], ...] = ()  # made once: ~us each
        self._flip = 0
        self._num_accepted = 0
        # The mask after `_next_at` accepted tokens, kept from forced_tokens' first fill: when
        # nothing was forced it is the very mask the next step's sampling needs. A view of one
        # of `_rows`, valid until the next forced_tokens call.
        self._next_row: torch.Tensor | None = None
        self._next_np: np.ndarray | None = None
        self._next_at = -1

    @property
    def ready(self) -> bool:
        return self._compiled.done()

    @property
    def future(self) -> Future[xgr.CompiledGrammar]:
        return self._compiled

    @property
    def error(self) -> BaseException | None:
        """Why the grammar did not compile (only once ready)."""
        return self._compiled.exception() if self._compiled.done() else None

    @property
    def matcher(self) -> xgr.GrammarMatcher:
        if self._matcher is None:
            # Raises if compilation failed; the engine drops such requests before scheduling.
            compiled = self._compiled.result()
            self._matcher = xgr.GrammarMatcher(compiled)
            self._vocab = compiled.tokenizer_info.vocab_size
        return self._matcher

    def accept_token(self, token_id: int) -> bool:
        ok = self.matcher.accept_token(token_id)
        self._num_accepted += ok
        return ok

    def is_terminated(self) -> bool:
        return self.matcher.is_terminated()

    def forced_tokens(self, max_n: int) -> list[int]:
        """The tokens the grammar forces next: while its mask allows exactly one token id (and
        it has not terminated), that id, at most `max_n` of them: masked sampling of any kind
        could only pick it. The matcher
        ends where it began: it is advanced to find each next mask and rolled back, so the
        caller accepts the tokens with `accept_token` as it appends them."""
        matcher = self.matcher
        if max_n <= 0 or matcher.is_terminated():
            return []
        vocab = self._vocab
        if self._rows is None:
            self._rows = xgr.allocate_token_bitmask(2, vocab)
            self._row_views = tuple((self._rows[i], self._rows.numpy()[i]) for i in range(2))
        first, later = self._flip, 1 - self._flip
        self._flip = later
        forced: list[int] = []
        row = first
        while len(forced) < max_n and not matcher.is_terminated():
            matcher.fill_next_token_bitmask(self._rows, row)
            if not forced:  # the next sampling step's mask, unless a token is forced
                self._next_row, self._next_np = self._row_views[row]
                self._next_at = self._num_accepted
            token_id = single_allowed_token(self._row_views[row][1], vocab)
            if token_id is None or not matcher.accept_token(token_id):
                break
            forced.append(token_id)
            row = later
        if forced:
            matcher.rollback(len(forced))
        return forced

    def allows(self, token_id: int) -> bool:
        """Whether the grammar accepts `token_id` next: one step of the matcher, rolled back
        (far cheaper than filling a whole mask). The matcher ends where it began."""
        matcher = self.matcher  # made first: it reads the vocabulary size
        vocab = self._vocab
        if self._next_np is not None and self._next_at == self._num_accepted:  # the kept mask
            return mask_allows(self._next_np, token_id, vocab)
        if not 0 <= token_id < vocab:
            return False
        if matcher.is_terminated() or not matcher.accept_token(token_id):
            return False
        matcher.rollback(1)
        return True

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Row `row` of `bitmask` gets the tokens the grammar allows next."""
        kept = self.kept_mask()
        if kept is not None:
            bitmask[row].copy_(kept)
        else:
            self.matcher.fill_next_token_bitmask(bitmask, row)

    def kept_mask(self) -> torch.Tensor | None:
        """The mask for the next token if forced_tokens already filled it (else None)."""
        return self._next_row if self._next_at == self._num_accepted else None

    def valid_prefix(self, token_ids: list[int]) -> int:
        """How many leading `token_ids` the grammar accepts in turn (a draft is cut there). A
        token that would terminate the grammar (a stop token) ends the prefix without being
        counted: a draft never reaches past the output's end. The matcher ends where it
        began."""
        matcher = self.matcher
        accepted = n = 0
        for token_id in token_ids:
            if not matcher.accept_token(token_id):
                break
            accepted += 1
            if matcher.is_terminated():
                break
            n += 1
        if accepted:
            matcher.rollback(accepted)
        return n

    def draft_masks(self, draft: list[int]) -> list[MaskRow]:
        """The mask at each position a draft verification samples: after the accepted tokens,
        then after each prefix of `draft` (which `valid_prefix` has cut to tokens the grammar
        accepts); len(draft) + 1 rows. The matcher ends where it began."""
        matcher = self.matcher
        vocab = self._vocab
        masks = xgr.allocate_token_bitmask(len(draft) + 1, vocab)
        accepted = 0
        for j in range(len(draft) + 1):
            matcher.fill_next_token_bitmask(masks, j)
            if j < len(draft):
                ok = matcher.accept_token(draft[j])
                assert ok, "a draft the grammar rejects reached verification"
                accepted += 1
        if accepted:
            matcher.rollback(accepted)
        return [MaskRow(masks[j], vocab) for j in range(len(draft) + 1)]


class MaskRow:
    """A grammar mask computed ahead (a draft position's): stands for a RequestGrammar in a
    sampling row, which asks only `fill_bitmask`."""

    def __init__(self, row: torch.Tensor, vocab_size: int) -> None:
        self.row = row  # int32 [ceil(vocab / 32)]
        self.vocab_size = vocab_size

    def allows(self, token_id: int) -> bool:
        return mask_allows(self.row, token_id, self.vocab_size)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        bitmask[row].copy_(self.row)


# Both helpers below read a bitmask row through numpy: a per-element read or count there costs a
# fraction of a microsecond, a torch op several, and they run for every constrained row each step.


def mask_allows(row: torch.Tensor | np.ndarray, token_id: int, vocab_size: int) -> bool:
    """Whether bitmask `row` (int32 words, bit i of word w: token 32*w + i) allows `token_id`;
    ids past `vocab_size` (the last word's padding bits, padded logits) never are."""
    if not 0 <= token_id < vocab_size:
        return False
    words = row.numpy() if isinstance(row, torch.Tensor) else row
    return bool((int(words[token_id >> 5]) >> (token_id & 31)) & 1)


def single_allowed_token(row: torch.Tensor | np.ndarray, vocab_size: int) -> int | None:
    """The one token id that bitmask `row` (int32 words, bit i of word w: token 32*w + i)
    allows among the first `vocab_size` ids; None when it allows none or several. Bits past
    `vocab_size` in the last word are padding and never count."""
    words = row.numpy() if isinstance(row, torch.Tensor) else row
    if np.count_nonzero(words) != 1:
        return None
    w = int(np.flatnonzero(words)[0])
    bits = int(words[w]) & 0xFFFFFFFF  # as unsigned: bit 31 makes the int32 negative
    tail = vocab_size - 32 * w
    if tail < 32:
        bits &= (1 << tail) - 1 if tail > 0 else 0
    if bits == 0 or bits & (bits - 1):
        return None
    return 32 * w + bits.bit_length() - 1

"""Greedy constrained rows check the unmasked argmax against the grammar and fill a mask only
when it is rejected: the token must be the argmax over the masked logits either way, for a
live grammar (matcher step) and for a draft position's precomputed mask (MaskRow)."""

from __future__ import annotations

import pytest
import torch

from utils_default import DEFAULT_GGUF, needs_default

xgr = pytest.importorskip("xgrammar")


def masked_argmax(logits: torch.Tensor, grammar) -> int:
    """The reference: a full mask applied, then argmax."""
    vocab = logits.shape[1]
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    grammar.fill_bitmask(bitmask, 0)
    out = logits.clone()
    xgr.apply_token_bitmask_inplace(out, bitmask)
    return int(out.argmax())


@needs_default
def test_greedy_rows_equal_the_masked_argmax() -> None:
    from tokenmill.engine.tokenizer import Tokenizer
    from tokenmill.sampling.sampler import Sampler, SamplingRow
    from tokenmill.sampling_params import SamplingParams, StructuredOutputsParams
    from tokenmill.structured import StructuredOutputManager, tokenizer_info

    tok = Tokenizer.from_gguf(DEFAULT_GGUF)
    vocab = tok.vocab_size
    m = StructuredOutputManager(lambda: tokenizer_info(tok.backend, tok.eos_token_ids, vocab))
    try:
        schema = {
            "type": "object",
            "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
            "required": ["name", "n"],
        }
        g = m.new_grammar(StructuredOutputsParams(json=schema))
        g.future.result()
        sampler = Sampler()
        params = SamplingParams(temperature=0.0, max_tokens=64)
        gen = torch.Generator().manual_seed(0)
        checked = {"allowed": 0, "rejected": 0}
        while not g.is_terminated() and sum(checked.values()) < 40:
            logits = torch.randn(2, vocab, generator=gen)
            raw = int(logits[0].argmax())
            if sum(checked.values()) % 2:  # make the raw argmax an allowed token half the time
                bitmask = xgr.allocate_token_bitmask(1, vocab)
                g.fill_bitmask(bitmask, 0)
                allowed = [t for t in range(vocab) if (int(bitmask[0, t >> 5]) >> (t & 31)) & 1]
                logits[0, allowed[len(allowed) // 2]] = logits[0].max() + 1.0
                raw = int(logits[0].argmax())
            want = masked_argmax(logits[:1], g)
            draft_row = g.draft_masks([])[0]  # a MaskRow for the same position
            row = SamplingRow(params=params, seed=0, prompt_token_ids=[1], output_token_ids=[])
            rows = [
                SamplingRow(**{**vars(row), "grammar": g}),
                SamplingRow(**{**vars(row), "grammar": draft_row}),
            ]
            tokens, _ = sampler(torch.cat([logits[:1], logits[:1]]), rows)
            assert tokens == [want, want]
            checked["allowed" if raw == want else "rejected"] += 1
            assert g.accept_token(want)
        assert checked["allowed"] > 0 and checked["rejected"] > 0, checked
    finally:
        m.close()


@pytest.mark.parametrize("vocab", [96, 1000, 49152])
def test_masked_argmax_equals_the_masked_kernel(vocab: int) -> None:
    """masked_argmax gives what the full mask then argmax gives, for masks from one allowed id
    to nearly all: first maximum on ties, padding bits past the vocabulary ignored, the logits
    left untouched."""
    from tokenmill.structured.grammar import MaskRow
    from tokenmill.structured.masks import masked_argmax

    gen = torch.Generator().manual_seed(vocab)
    words = (vocab + 31) // 32
    masks = []
    for density in (1, 3, 40, 0.02, 0.5, 0.999):  # allowed ids: a count or a fraction
        n = density if isinstance(density, int) else max(1, int(density * vocab))
        ids = torch.randperm(vocab, generator=gen)[:n]
        bits = torch.zeros(words * 32, dtype=torch.int64)
        bits[ids] = 1
        masks.append(bits)
    pad = torch.zeros(words * 32, dtype=torch.int64)  # one allowed id and every padding bit
    pad[vocab // 2] = 1
    pad[vocab:] = 1
    masks.append(pad)
    rows = []
    for bits in masks:
        packed = (bits.view(words, 32) << torch.arange(32)).sum(1)
        rows.append(MaskRow(packed.to(torch.int64).remainder(2**32).to(torch.int32), vocab))
    # Integer-valued logits: many ties among allowed ids.
    logits = torch.randint(0, 4, (len(rows) + 1, vocab), generator=gen).float()
    before = logits.clone()
    at = list(range(1, len(rows) + 1))  # the row order in logits need not be the mask order
    got = masked_argmax(logits, at, rows)
    assert torch.equal(logits, before)
    for j, (r, row) in enumerate(zip(at, rows, strict=True)):
        want = logits[r : r + 1].clone()
        xgr.apply_token_bitmask_inplace(want, row.row.unsqueeze(0), vocab_size=vocab)
        assert got[j] == int(want.argmax()), (j, got[j])

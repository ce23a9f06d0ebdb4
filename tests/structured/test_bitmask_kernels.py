"""Applying grammar bitmasks: the Triton kernel (under Triton's interpreter on a CPU) and the
torch fallback agree with xgrammar's CPU kernel, on a subset of rows and a vocabulary that is a
multiple of neither 32 nor the kernel's block; on a GPU, the sampler's path for CUDA logits."""

from __future__ import annotations

import pytest
import torch

from utils_default import DEFAULT_GGUF, needs_default
from utils_triton import CUDA, interpreted  # sets TRITON_INTERPRET first

xgr = pytest.importorskip("xgrammar")
pytest.importorskip("triton")

from tokenmill.kernels import triton_bitmask as tb  # noqa: E402
from tokenmill.structured.masks import apply_bitmask_torch  # noqa: E402

tb = interpreted(tb)
DEV = "cuda" if CUDA else "cpu"


def reference(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """xgrammar's CPU kernel with the bitmask rows placed at the logits rows they mask."""
    full = torch.full((logits.shape[0], bitmask.shape[1]), -1, dtype=torch.int32)
    full[rows] = bitmask
    out = logits.clone()
    xgr.apply_token_bitmask_inplace(out, full, indices=rows)
    return out


@pytest.mark.parametrize("vocab", [31, 1000, 2 * tb.BLOCK + 77])
@pytest.mark.parametrize("rows", [[0], [1, 3], [0, 1, 2, 3]])
def test_kernel_and_torch_fallback_match_xgrammar(vocab: int, rows: list[int]) -> None:
    gen = torch.Generator().manual_seed(vocab + len(rows))
    logits = torch.randn(4, vocab, generator=gen)
    words = (vocab + 31) // 32
    bitmask = torch.randint(-(2**31), 2**31 - 1, (len(rows), words), generator=gen).int()
    bitmask[0, 0] = 0  # a word banning 32 tokens at once, one allowing all
    if words > 1:
        bitmask[0, 1] = -1
    expected = reference(logits, bitmask, rows)
    assert (
        torch.isinf(expected).any()
        and not torch.isinf(expected[[r for r in range(4) if r not in rows]]).any()
    )
    idx = torch.tensor(rows, dtype=torch.int32)
    for apply in (tb.apply_bitmask, apply_bitmask_torch):
        got = logits.to(DEV)
        apply(got, bitmask.to(DEV), idx.to(DEV))
        assert torch.equal(got.cpu(), expected), apply


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_sampler_masks_cuda_logits_like_cpu_logits() -> None:
    """The grammar's masks through apply_grammar_masks on CUDA logits (Triton) equal those on
    CPU logits (xgrammar's kernel), with a free row between constrained ones."""
    from tokenmill.engine.tokenizer import Tokenizer
    from tokenmill.sampling_params import StructuredOutputsParams
    from tokenmill.structured import StructuredOutputManager, apply_grammar_masks, tokenizer_info

    tok = Tokenizer.from_gguf(DEFAULT_GGUF)
    m = StructuredOutputManager(
        lambda: tokenizer_info(tok.backend, tok.eos_token_ids, tok.vocab_size)
    )
    try:
        specs = [
            StructuredOutputsParams(regex="[0-9]+"),
            None,
            StructuredOutputsParams(json_object=True),
        ]
        grammars = [None if s is None else m.new_grammar(s) for s in specs]
        logits = torch.randn(3, tok.vocab_size)
        on_cpu, on_gpu = logits.clone(), logits.cuda()
        apply_grammar_masks(on_cpu, grammars)
        apply_grammar_masks(on_gpu, grammars)
        assert torch.equal(on_gpu.cpu(), on_cpu) and torch.equal(on_cpu[1], logits[1])
    finally:
        m.close()


@needs_default
def test_masks_kept_from_forced_tokens_equal_fresh_fills() -> None:
    """forced_tokens' first fill stands in for the next step's fill only while no token has been
    accepted since; along a walk through a JSON schema, every mask equals a fresh matcher's."""
    from tokenmill.engine.tokenizer import Tokenizer
    from tokenmill.sampling_params import StructuredOutputsParams
    from tokenmill.structured import StructuredOutputManager, tokenizer_info
    from tokenmill.structured.masks import apply_grammar_masks

    tok = Tokenizer.from_gguf(DEFAULT_GGUF)
    vocab = tok.vocab_size
    m = StructuredOutputManager(lambda: tokenizer_info(tok.backend, tok.eos_token_ids, vocab))
    try:
        schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
        spec = StructuredOutputsParams(json=schema)
        g, fresh = m.new_grammar(spec), m.new_grammar(spec)
        gen = torch.Generator().manual_seed(0)
        kept = 0
        for _ in range(12):
            if g.is_terminated():
                break
            forced = g.forced_tokens(4)
            kept += g.kept_mask() is not None
            logits = torch.randn(2, vocab, generator=gen)
            apply_grammar_masks(logits, [g, fresh])  # row 0 may use the kept mask
            assert torch.equal(torch.isinf(logits[0]), torch.isinf(logits[1]))
            token = forced[0] if forced else int(logits[0].argmax())
            assert g.accept_token(token) and fresh.accept_token(token)
            assert g.kept_mask() is None  # a token was accepted since
        assert kept > 0
    finally:
        m.close()

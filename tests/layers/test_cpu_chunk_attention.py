"""The tiled chunk kernel (`paged_chunk_attention`): every query row bit-identical to the decode
kernel's row with the same keys, however the prompt is chunked, whatever was cached before it,
whichever sequences share the call and however many threads run it; and close to a float64
gather + softmax. Skipped when the extension cannot be built here."""

from __future__ import annotations

import math

import pytest
import torch

from tokenmill.kernels.cpu_attention import (
    load_cpu_attention,
    paged_chunk_attention,
    paged_decode_attention,
)

if load_cpu_attention() is None:
    pytest.skip("the C++ CPU attention extension cannot be built here", allow_module_level=True)

BLOCK = 16
TOLERANCES = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.bfloat16: {"atol": 2e-3, "rtol": 2**-8},
    torch.float16: {"atol": 1e-3, "rtol": 2**-10},
}


class Prompt:
    """One sequence of n tokens: its queries q [n, H, D], its KV in shuffled blocks of a cache
    shared with other prompts, and its block table."""

    def __init__(self, n: int, heads: tuple[int, int], head_dim: int, dtype, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        num_heads, num_kv_heads = heads
        blocks = -(-n // BLOCK)
        self.n = n
        shape = (blocks + 2, BLOCK, num_kv_heads, head_dim)
        self.k = torch.randn(shape, generator=g).to(dtype)
        self.v = torch.randn(shape, generator=g).to(dtype)
        self.table = torch.randperm(blocks + 2, generator=g)[:blocks]
        self.q = torch.randn(n, num_heads, head_dim, generator=g).to(dtype)

    def decode_rows(self, scale: float, **kw) -> torch.Tensor:
        """Every token as a decode row of its own: the definition the chunks must match."""
        tables = self.table.expand(self.n, -1)
        lens = torch.arange(1, self.n + 1)
        return paged_decode_attention(self.q, self.k, self.v, tables, lens, scale, **kw)

    def chunked(self, chunk: int, scale: float, start: int = 0, **kw) -> torch.Tensor:
        """Rows start .. n - 1 in chunks of `chunk`, each after the tokens before it (cached)."""
        outs = []
        for a in range(start, self.n, chunk):
            b = min(self.n, a + chunk)
            lens, starts = torch.tensor([b]), torch.tensor([0, b - a])
            outs.append(
                paged_chunk_attention(
                    self.q[a:b], self.k, self.v, self.table[None], lens, starts, scale, **kw
                )
            )
        return torch.cat(outs)


# GQA groups 3, 8, 1 and 5 (heads go in register groups of up to 4: 5 = 4 + 1); fp16 once.
CHUNKING_CASES = [
    *((dtype, heads) for dtype in (torch.float32, torch.bfloat16)
      for heads in ((9, 3), (8, 1), (4, 4), (10, 2))),
    (torch.float16, (9, 3)),
]  # fmt: skip


@pytest.mark.parametrize(("dtype", "heads"), CHUNKING_CASES)
def test_rows_match_decode_rows_in_any_chunking(dtype, heads) -> None:
    # 560 tokens: past the 512-key partition, so split rows and their merge are covered too.
    prompt = Prompt(560, heads, 64, dtype, seed=1)
    scale = 64**-0.5
    alone = prompt.decode_rows(scale)
    for chunk in (64, 512, 560):
        assert torch.equal(prompt.chunked(chunk, scale), alone), f"chunks of {chunk}"
    # one token or 7 at a time (as a suffix: each call costs the same whatever its position)
    assert torch.equal(prompt.chunked(1, scale, start=500), alone[500:])
    assert torch.equal(prompt.chunked(7, scale, start=400), alone[400:])
    # after a prefix-cache hit of 333 tokens, the rest as one chunk or in chunks of 100
    assert torch.equal(prompt.chunked(560, scale, start=333), alone[333:])
    assert torch.equal(prompt.chunked(100, scale, start=333), alone[333:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_do_not_depend_on_the_other_sequences_or_threads(dtype) -> None:
    heads, scale = (9, 3), 0.1
    prompts = [Prompt(n, heads, 64, dtype, seed=n) for n in (5, 530, 64, 1)]
    alone = [p.chunked(p.n, scale) for p in prompts]
    # All four in one call over one cache: each prompt's blocks are offset into it.
    k = torch.cat([p.k for p in prompts])
    v = torch.cat([p.v for p in prompts])
    offsets = torch.tensor([0] + [p.k.shape[0] for p in prompts]).cumsum(0)
    width = max(p.table.numel() for p in prompts)
    tables = torch.zeros(len(prompts), width, dtype=torch.int64)
    for i, p in enumerate(prompts):
        tables[i, : p.table.numel()] = p.table + offsets[i]
    # chunks of 3, 30, 64 and 1 tokens at the end of each prompt, in one call
    sizes = [3, 30, 64, 1]
    q = torch.cat([p.q[p.n - s :] for p, s in zip(prompts, sizes, strict=True)])
    lens = torch.tensor([p.n for p in prompts])
    starts = torch.tensor([0, *sizes]).cumsum(0)
    threads = torch.get_num_threads()
    try:
        for t in sorted({1, 2, threads}):
            torch.set_num_threads(t)
            out = paged_chunk_attention(q, k, v, tables, lens, starts, scale)
            for i, (a, s) in enumerate(zip(alone, sizes, strict=True)):
                assert torch.equal(out[starts[i] : starts[i + 1]], a[-s:]), (t, i)
    finally:
        torch.set_num_threads(threads)


def reference(prompt: Prompt, scale: float, window=None, softcap=None) -> torch.Tensor:
    """Every row of the prompt over its causal keys, in float64."""
    t = torch.arange(prompt.n)
    blocks, offsets = prompt.table[t // BLOCK], t % BLOCK
    group = prompt.q.shape[1] // prompt.k.shape[2]
    keys = prompt.k[blocks, offsets].double().repeat_interleave(group, dim=1)  # [n, H, D]
    values = prompt.v[blocks, offsets].double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", prompt.q.double(), keys) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    hidden = t[None, :] > t[:, None]
    if window is not None:
        hidden |= t[None, :] <= t[:, None] - window
    scores = scores.masked_fill(hidden, -math.inf)
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("heads", "head_dim", "window", "softcap"),
    [
        ((9, 3), 64, None, None),
        ((8, 2), 128, None, None),
        ((6, 2), 96, None, None),  # a head_dim without a specialised kernel
        ((9, 3), 64, 40, None),
        ((9, 3), 64, None, 5.0),
        ((4, 1), 64, 600, 30.0),  # a window past the partition: split rows under a window
    ],
)
def test_matches_reference(dtype, heads, head_dim, window, softcap) -> None:
    prompt = Prompt(700 if window == 600 else 150, heads, head_dim, dtype, seed=2)
    scale = head_dim**-0.5
    kw = {"window": window, "softcap": softcap}
    out = prompt.chunked(64, scale, **kw)
    torch.testing.assert_close(out.double(), reference(prompt, scale, **kw), **TOLERANCES[dtype])
    # and bit-identical to decode rows, chunk boundaries and all
    assert torch.equal(out, prompt.decode_rows(scale, **kw))


def test_rejects_bad_inputs() -> None:
    prompt = Prompt(20, (9, 3), 64, torch.float32, seed=3)
    q, k, v, table = prompt.q, prompt.k, prompt.v, prompt.table[None]
    with pytest.raises(RuntimeError, match="query rows"):  # more queries than keys
        paged_chunk_attention(q, k, v, table, torch.tensor([10]), torch.tensor([0, 20]), 0.1)
    with pytest.raises(RuntimeError, match="query_start_loc"):
        paged_chunk_attention(q, k, v, table, torch.tensor([20]), torch.tensor([0, 19]), 0.1)
    with pytest.raises(RuntimeError, match="seq_lens"):  # past the table
        paged_chunk_attention(q, k, v, table, torch.tensor([33]), torch.tensor([0, 20]), 0.1)
    bad = table.clone()
    bad[0, 1] = k.shape[0]
    with pytest.raises(RuntimeError, match="block_tables"):
        paged_chunk_attention(q, k, v, bad, torch.tensor([20]), torch.tensor([0, 20]), 0.1)

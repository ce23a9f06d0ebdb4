from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenmill.sampling.draw as sm
from tokenmill.sampling import Sampler, SamplingRow, prompt_logprobs
from tokenmill.sampling.block_ops import BLOCK, block_topk
from tokenmill.sampling.logits_processing import process_logits
from tokenmill.sampling_params import SamplingParams

sampler = Sampler()


def row(
    seed: int = 0,
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    eos: frozenset[int] = frozenset(),
    **params,
) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), seed, prompt or [], output or [], eos)


def draws(logits: torch.Tensor, n: int, **params) -> torch.Tensor:
    """Empirical token distribution of `n` seeds sampling the single row `logits` [vocab]."""
    rows = [row(seed=s, **params) for s in range(n)]
    tokens, _ = sampler(logits.expand(n, -1), rows)
    return torch.bincount(torch.tensor(tokens), minlength=logits.shape[0]).double() / n


def tv(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * float((p.double() - q.double()).abs().sum())


TOY = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])  # softmax: .53 .20 .12 .07 .03
N_DRAWS = 20_000
TV_BOUND = 0.02  # expected TV of 20k draws over 5 tokens is ~0.005


def restricted(logits: torch.Tensor, keep: list[int], temperature: float = 1.0) -> torch.Tensor:
    masked = torch.full_like(logits, float("-inf"))
    masked[keep] = logits[keep]
    return torch.softmax(masked / temperature, dim=-1)


# --- greedy -------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", [5, 1000, 4096, 50257])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_is_argmax(vocab: int, dtype: torch.dtype) -> None:
    torch.manual_seed(vocab)
    logits = (torch.randn(16, vocab) * 4).to(dtype)
    tokens, lps = sampler(logits, [row(temperature=0.0) for _ in range(16)])
    assert tokens == logits.float().argmax(-1).tolist()
    assert lps == [None] * 16


def test_greedy_ties_take_the_first_maximum() -> None:
    logits = torch.zeros(3, 700)
    logits[0, [5, 600]] = 3.0
    logits[1, [64, 65, 699]] = 1.0
    tokens, _ = sampler(logits, [row(temperature=0.0) for _ in range(3)])
    assert tokens == [5, 64, 0]


def test_top_k_1_and_tiny_top_p_equal_greedy() -> None:
    torch.manual_seed(1)
    logits = torch.randn(24, 3000) * 2
    greedy = logits.argmax(-1).tolist()
    rows = [row(seed=i, top_k=1) for i in range(12)] + [
        row(seed=i, top_p=1e-6, temperature=1.5) for i in range(12)
    ]
    assert sampler(logits, rows)[0] == greedy


# --- seeding and batch independence -------------------------------------------------------


def random_params(rng: random.Random) -> dict:
    return {
        "temperature": rng.choice([0.0, 0.3, 0.7, 1.0, 1.3]),
        "top_k": rng.choice([0, 0, 1, 5, 50, 300]),
        "top_p": rng.choice([1.0, 1.0, 0.9, 0.5, 0.99]),
        "min_p": rng.choice([0.0, 0.0, 0.05]),
        "repetition_penalty": rng.choice([1.0, 1.0, 1.2]),
        "presence_penalty": rng.choice([0.0, 0.5]),
        "logprobs": rng.choice([None, 0, 3]),
    }


def test_same_seed_same_token_alone_or_in_any_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    # wrap the internal paths to check that the batch exercises all of them
    calls: dict[str, set[int]] = {"among": set(), "wide": set(), "full": set()}
    for name, key in (("_draw_among", "among"), ("_top_sorted", "wide"), ("_inverse_cdf", "full")):
        real = getattr(sm, name)

        def spy(*args, _real=real, _key=key):
            calls[_key].add(args[0].shape[0])
            return _real(*args)

        monkeypatch.setattr(sm, name, spy)
    rng = random.Random(0)
    vocab, n = 10_000, 48
    torch.manual_seed(2)
    logits = torch.randn(n, vocab) * torch.tensor([1.0, 3.0]).repeat(n // 2).unsqueeze(1)
    logits[:, :8] += torch.rand(n, 8) * 12  # a peaked head, as real models have
    rows = [
        row(seed=rng.randrange(2**63), prompt=[1, 2, 3], output=[4] * i, **random_params(rng))
        for i in range(n)
    ]
    alone = [sampler(logits[i : i + 1], [rows[i]]) for i in range(n)]
    for trial in range(3):
        order = list(range(n))
        random.Random(trial).shuffle(order)
        tokens, lps = sampler(logits[order], [rows[i] for i in order])
        for pos, i in enumerate(order):
            assert tokens[pos] == alone[i][0][0]
            assert lps[pos] == alone[i][1][0]
    assert all(max(sizes) > 1 for sizes in calls.values())


def test_draw_depends_on_seed_and_step_only() -> None:
    logits = torch.zeros(1, 1000)  # uniform: every draw is informative
    first = [sampler(logits, [row(seed=s)])[0][0] for s in range(50)]
    again = [sampler(logits, [row(seed=s)])[0][0] for s in range(50)]
    assert first == again
    assert len(set(first)) > 40  # different seeds differ
    # the step is len(output_token_ids), so a recomputed request continues the same sequence
    steps = [sampler(logits, [row(seed=7, output=[0] * t)])[0][0] for t in range(50)]
    assert len(set(steps)) > 40
    assert steps[3] == sampler(logits, [row(seed=7, output=[9, 9, 9])])[0][0]


# --- distributions ------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_temperature_distribution_matches_softmax(temperature: float) -> None:
    got = draws(TOY, N_DRAWS, temperature=temperature)
    assert tv(got, torch.softmax(TOY / temperature, -1)) < TV_BOUND


@pytest.mark.parametrize(
    ("params", "keep"),
    [
        ({"top_k": 2}, [0, 1]),
        ({"top_k": 3, "temperature": 0.7}, [0, 1, 2]),
        ({"top_p": 0.6}, [0, 1]),  # .53 < .6 <= .73
        ({"top_p": 0.8}, [0, 1, 2]),
        ({"top_k": 3, "top_p": 0.7}, [0, 1]),  # within top-3: .62, .85
        ({"min_p": 0.2}, [0, 1, 2]),  # .12/.53 >= .2 > .07/.53
    ],
)
def test_truncated_distributions(params: dict, keep: list[int]) -> None:
    got = draws(TOY, N_DRAWS, **params)
    assert tv(got, restricted(TOY, keep, params.get("temperature", 1.0))) < TV_BOUND


def test_sampling_across_blocks_and_padded_vocab() -> None:
    vocab = 5 * BLOCK + 17  # not a multiple of the block size
    logits = torch.full((vocab,), -30.0)
    hot = [3, BLOCK + 1, 2 * BLOCK - 1, 4 * BLOCK, vocab - 1]
    logits[hot] = TOY
    got = draws(logits, N_DRAWS)
    assert tv(got[hot], torch.softmax(TOY, -1)) < TV_BOUND


def test_large_nucleus_falls_back_to_exact_sort() -> None:
    vocab = 4096
    logits = torch.linspace(0.0, 3.0, vocab)[torch.randperm(vocab, generator=torch.Generator())]
    probs = torch.softmax(logits, -1)
    sorted_probs, order = probs.sort(descending=True)
    size = int((sorted_probs.cumsum(0) < 0.5).sum()) + 1  # far more than the first candidates
    assert size > 500
    got = draws(logits, 4000, top_p=0.5)
    assert got[order[size:]].sum() == 0
    assert got[order[:size]].sum() == 1


def test_zero_probability_tokens_are_never_drawn() -> None:
    logits = torch.full((1, 300), float("-inf"))
    logits[0, 150] = 0.0
    tokens, _ = sampler(logits.expand(200, -1), [row(seed=s) for s in range(200)])
    assert set(tokens) == {150}


# --- logits processors --------------------------------------------------------------------


def test_logit_bias_forces_and_forbids() -> None:
    torch.manual_seed(3)
    logits = torch.randn(4, 1000)
    rows = [
        row(temperature=0.0, logit_bias={17: 100.0}),
        row(seed=1, logit_bias={999: 100.0}),
        row(temperature=0.0, logit_bias={int(logits[2].argmax()): -100.0}),
        row(temperature=0.0, logit_bias={5000: 100.0}),  # outside the vocab: ignored
    ]
    tokens, _ = sampler(logits, rows)
    assert tokens[:2] == [17, 999]
    assert tokens[2] == int(logits[2].topk(2).indices[1])
    assert tokens[3] == int(logits[3].argmax())


def test_min_tokens_masks_eos_and_stop_ids() -> None:
    logits = torch.zeros(1, 100)
    logits[0, [7, 8, 9]] = torch.tensor([10.0, 9.0, 8.0])
    eos = frozenset({7})

    def greedy(**kw) -> int:
        return sampler(logits, [row(temperature=0.0, eos=eos, **kw)])[0][0]

    assert greedy(min_tokens=2, output=[1]) == 8
    assert greedy(min_tokens=2, output=[1], stop_token_ids=[8]) == 9
    assert greedy(min_tokens=2, output=[1, 2], stop_token_ids=[8]) == 7  # reached
    assert greedy(min_tokens=2, ignore_eos=True) == 7  # eos is no stop then


def reference_penalties(
    logits: torch.Tensor, prompt: list[int], output: list[int], rep: float, freq: float, pres: float
) -> torch.Tensor:
    x = logits.clone()
    for t in set(prompt) | set(output):
        x[t] = x[t] / rep if x[t] > 0 else x[t] * rep
    for t in set(output):
        count = output.count(t)
        x[t] = x[t] - torch.tensor(freq) * count - torch.tensor(pres)
    return x


def test_penalties_exact_against_reference() -> None:
    logits = torch.tensor(
        [[1.5, -0.7, 2.3, 0.0, -3.1, 0.9], [0.4, 0.8, -1.2, 1.1, 2.2, -0.3]], dtype=torch.float32
    )
    cases = [
        ([0, 1], [2, 2, 4, 1], 1.3, 0.4, 0.25),
        ([5, 5, 3], [3, 0, 0, 0], 0.8, -0.3, 1.1),
    ]
    rows = [
        row(
            prompt=prompt,
            output=output,
            repetition_penalty=rep,
            frequency_penalty=freq,
            presence_penalty=pres,
        )
        for prompt, output, rep, freq, pres in cases
    ]
    got = process_logits(logits, rows)
    for i, case in enumerate(cases):
        assert torch.equal(got[i], reference_penalties(logits[i], *case))
    assert torch.equal(logits[0, 0], torch.tensor(1.5))  # input untouched


def test_penalties_only_touch_their_rows() -> None:
    logits = torch.randn(3, 50)
    rows = [row(output=[1, 2]), row(output=[1, 2], frequency_penalty=1.0), row(output=[3])]
    got = process_logits(logits, rows)
    assert torch.equal(got[[0, 2]], logits[[0, 2]])
    assert torch.equal(got[1, [1, 2]], logits[1, [1, 2]] - 1.0)


# --- logprobs -----------------------------------------------------------------------------


def reference_rank(lp: torch.Tensor, tok: int) -> int:
    return int((lp > lp[tok]).sum()) + 1


def test_sampled_logprobs_are_raw_and_include_the_token() -> None:
    torch.manual_seed(4)
    logits = torch.randn(3, 2000) * 3
    rows = [
        row(seed=1, logprobs=5, temperature=0.5, repetition_penalty=1.5, output=[1, 2]),
        row(seed=2),
        row(temperature=0.0, logprobs=0),
    ]
    tokens, lps = sampler(logits, rows)
    raw = torch.log_softmax(logits, -1)  # before penalties and temperature
    assert lps[1] is None
    for i, k in ((0, 5), (2, 0)):
        top = lps[i]
        assert top is not None and top.token_id == tokens[i]
        assert top.logprob == pytest.approx(float(raw[i, tokens[i]]), abs=1e-6)
        assert top.rank == reference_rank(raw[i], tokens[i])
        ref = raw[i].topk(k)
        assert top.top_ids == ref.indices.tolist()
        assert top.top_logprobs == pytest.approx(ref.values.tolist(), abs=1e-6)
    assert lps[2].rank == 1


def test_prompt_logprobs_match_log_softmax() -> None:
    torch.manual_seed(5)
    n, vocab = 300, 777  # more positions than one chunk
    logits = torch.randn(n, vocab) * 2
    targets = torch.randint(0, vocab, (n,)).tolist()
    got = prompt_logprobs(logits.bfloat16(), targets, 3)
    raw = torch.log_softmax(logits.bfloat16().float(), -1)
    assert len(got) == n
    for i in range(0, n, 7):
        assert got[i].token_id == targets[i]
        assert got[i].logprob == pytest.approx(float(raw[i, targets[i]]), abs=1e-6)
        assert got[i].rank == reference_rank(raw[i], targets[i])
        assert got[i].top_logprobs == pytest.approx(raw[i].topk(3).values.tolist(), abs=1e-6)
        assert sorted(got[i].top_logprobs, reverse=True) == got[i].top_logprobs
    assert prompt_logprobs(logits[:0], [], 2) == []


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 4),
    blocks=st.integers(4, 40),
    k=st.integers(1, 10),
    seed=st.integers(0, 2**31),
    ties=st.booleans(),
)
def test_block_topk_values_are_exact(rows: int, blocks: int, k: int, seed: int, ties: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(rows, blocks * BLOCK, generator=g)
    if ties:
        t = t.round()
    vals, ids = block_topk(t, k)
    assert torch.equal(vals, t.topk(k).values)
    assert torch.equal(t.gather(1, ids), vals)


def test_top_k_beyond_candidates_and_ties() -> None:
    vocab = 4096
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(6))
    top = set(logits.topk(100).indices.tolist())
    got = draws(logits, 4000, top_k=100)
    assert set(got.nonzero().squeeze(1).tolist()) <= top
    assert int((got > 0).sum()) > 80
    tied = torch.zeros(vocab)
    tied[[10, 700, 701, 2000, 4095]] = 5.0  # ties at the k-th value are all kept
    got = draws(tied, 2000, top_k=2)
    assert set(got.nonzero().squeeze(1).tolist()) == {10, 700, 701, 2000, 4095}

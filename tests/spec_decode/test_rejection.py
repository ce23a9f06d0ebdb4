"""Verification reproduces the target distribution, and seeded sampling is unchanged by drafts."""

from __future__ import annotations

import random

import torch

from tokenmill.sampling.rejection import rejection_sample, verify_drafts
from tokenmill.sampling.sampler import Sampler, SamplingRow
from tokenmill.sampling_params import SamplingParams

V = 8


def _tv(counts: torch.Tensor, probs: torch.Tensor) -> float:
    return 0.5 * float((counts / counts.sum() - probs).abs().sum())


def _random_dist(gen: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    x = torch.rand(*shape, V, generator=gen, dtype=torch.float64) ** 3  # uneven, some ~0
    return x / x.sum(-1, keepdim=True)


def test_rejection_sample_first_token_is_distributed_as_p() -> None:
    gen = torch.Generator().manual_seed(0)
    n = 400_000
    p = _random_dist(gen, (2,))  # [k + 1, V], k = 1
    q = _random_dist(gen, (1,))
    drafts = torch.multinomial(q.expand(n, V), 1, replacement=True, generator=gen)  # [n, 1]
    tokens, num = rejection_sample(p.expand(n, 2, V), q.expand(n, 1, V), drafts, gen)
    counts = torch.bincount(tokens[:, 0], minlength=V).double()
    # TV of 400k draws from an 8-way distribution: about 0.0015 expected; 5e-3 is > 3 sigma.
    assert _tv(counts, p[0]) < 5e-3
    accepted = num == 2
    alpha = float(torch.minimum(p[0], q[0]).sum())  # the expected acceptance rate
    assert abs(float(accepted.double().mean()) - alpha) < 5e-3
    assert bool((tokens[accepted, 0] == drafts[accepted, 0]).all())


def test_rejection_sample_two_position_chain_joint_is_p0_times_p1() -> None:
    """A context-free target: the first two tokens of the output (drawing the second from p1
    when the chain stopped after one) must be distributed as p0 x p1."""
    gen = torch.Generator().manual_seed(1)
    n = 400_000
    p = _random_dist(gen, (3,))  # [k + 1, V], k = 2
    q = _random_dist(gen, (2,))
    drafts = torch.stack(
        [torch.multinomial(q[i].expand(n, V), 1, True, generator=gen)[:, 0] for i in range(2)], 1
    )
    tokens, num = rejection_sample(p.expand(n, 3, V), q.expand(n, 2, V), drafts, gen)
    second = torch.where(
        num >= 2, tokens[:, 1], torch.multinomial(p[1].expand(n, V), 1, True, generator=gen)[:, 0]
    )
    counts = torch.bincount(tokens[:, 0] * V + second, minlength=V * V).double()
    # 64 cells, 400k draws: expected TV about 0.005
    assert _tv(counts, torch.outer(p[0], p[1]).flatten()) < 0.012
    assert bool((num >= 1).all()) and bool((tokens[num == 3, 2] >= 0).all())


def test_one_hot_drafts_accept_with_probability_p() -> None:
    """verify_drafts on toy logits: the first emitted token is distributed as p, and a draft x
    is accepted with probability p(x) (the min(1, p/q) rule for one-hot q)."""
    gen = torch.Generator().manual_seed(2)
    n = 40_000
    logits = torch.randn(2, V, generator=gen) * 1.5  # positions 0 and 1 of every request
    params = SamplingParams(temperature=0.8, top_k=6, max_tokens=10)
    rows = [
        SamplingRow(params, seed=s, prompt_token_ids=[1], output_token_ids=[]) for s in range(n)
    ]
    draft = 3
    tokens, _ = verify_drafts(Sampler(), logits.repeat(n, 1), rows, [[draft]] * n)
    first = torch.tensor([t[0] for t in tokens])
    x = logits[0] / 0.8
    x[x < x.topk(6).values[-1]] = float("-inf")
    p = torch.softmax(x.double(), dim=-1)
    assert _tv(torch.bincount(first, minlength=V).double(), p) < 0.012  # expected ~0.006
    acc = sum(len(t) == 2 for t in tokens) / n
    assert abs(acc - float(p[draft])) < 0.012


def _toy_logits(context: list[int], vocab: int) -> torch.Tensor:
    """A deterministic 'model': logits depend on the last two tokens."""
    g = torch.Generator().manual_seed(hash(tuple(context[-2:])) & 0xFFFF)
    return torch.randn(vocab, generator=g) * 3


def test_spec_sampling_is_token_identical_to_plain_sampling() -> None:
    """With every sampling parameter in play, drafts (right or wrong) never change a seeded
    request's tokens: each position uses the draw plain decoding would make there."""
    vocab = 300  # > 4 blocks: the sampler's blocked paths run
    rng = random.Random(0)
    sampler = Sampler()
    all_params = [
        SamplingParams(temperature=0.0, repetition_penalty=1.3, max_tokens=30),
        SamplingParams(temperature=0.9, top_k=20, top_p=0.9, seed=1, max_tokens=30),
        SamplingParams(
            temperature=1.2,
            min_p=0.05,
            presence_penalty=0.5,
            frequency_penalty=0.3,
            logit_bias={5: 3.0, 7: -50.0},
            min_tokens=5,
            stop_token_ids=[11],
            seed=2,
            max_tokens=30,
        ),
    ]
    for params in all_params:
        prompt = [rng.randrange(vocab) for _ in range(5)]

        def row(out: list[int], params=params, prompt=prompt) -> SamplingRow:
            return SamplingRow(params, 77, prompt, list(out), frozenset({11}))

        plain: list[int] = []
        for _ in range(30):
            tok, _ = sampler(_toy_logits(prompt + plain, vocab).unsqueeze(0), [row(plain)])
            plain.append(tok[0])

        spec: list[int] = []
        num_accepted = 0
        while len(spec) < 30:
            # drafts: the true continuation with some tokens corrupted
            k = rng.randint(0, 4)
            truth = plain[len(spec) + 0 : len(spec) + k]
            draft = [t if rng.random() < 0.75 else rng.randrange(vocab) for t in truth]
            ctx = prompt + spec
            logits = torch.stack(
                [_toy_logits(ctx + draft[:j], vocab) for j in range(len(draft) + 1)]
            )
            toks, _ = verify_drafts(sampler, logits, [row(spec)], [draft])
            num_accepted += len(toks[0]) - 1
            spec.extend(toks[0])
        assert spec[:30] == plain
        assert num_accepted > 0

"""Speculative decoding end to end on a tiny random-weight model (fp32, batch-invariant).

Greedy and seeded outputs are token-identical with speculation on and off, for every proposer,
alone and in mixed batches with chunked prefill and with preemption; the first tokens of many
seeded requests follow the model's distribution while drafts are being verified.
"""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
from spec_utils import OracleProposer, engine_kwargs, reference_tokens, tokens, use_oracle

from tokenmill import SamplingParams
from tokenmill.spec_decode.proposer import Proposer
from tokenmill.spec_decode.speculator import Speculator
from utils_tiny import make_tiny_hf_folder

MAX_TOKENS = 24
# "draft": the tiny model drafting for itself (high acceptance); other weights are tested below
PROPOSERS = ("ngram", "suffix", "draft")
# The draft proposer runs a second model at every step: its cases are heavy (the slow lane).
PROPOSER_PARAMS = ["ngram", "suffix", pytest.param("draft", marks=pytest.mark.slow)]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    # a small vocabulary keeps sampling and logprobs cheap; prompts are token ids below it
    return str(make_tiny_hf_folder(tmp_path_factory.mktemp("spec"), vocab_size=512))


@pytest.fixture(scope="module")
def workload():
    rng = random.Random(0)
    words = list(range(300, 340))
    prompts = []
    for i in range(8):
        n = rng.choice([5, 20, 45, 70])
        # repeated spans give the proposers something to find
        span = [rng.choice(words) for _ in range(8)]
        prompts.append(([400 + i] + [rng.choice(words) for _ in range(n)] + span * 3)[: n + 20])
    params = [
        SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
        if i % 2 == 0
        else SamplingParams(
            max_tokens=MAX_TOKENS, temperature=0.8, top_k=30, seed=i, ignore_eos=True
        )
        for i in range(len(prompts))
    ]
    return prompts, params


def _spec_kwargs(proposer: str, tiny_model: str) -> dict:
    # Every draft the proposer has gets verified: the draft budget (which fits a row's cost to
    # measured step times, and on a tiny model finds drafts not worth it at batch 8) has its
    # own tests; here the point is exactness under as much verification as possible.
    kw = dict(speculative=proposer, speculative_draft_cost=0.0)
    if proposer == "draft":
        kw["speculative_model"] = tiny_model
    return kw


@pytest.fixture(scope="module")
def reference(tiny_model, workload):
    return reference_tokens(tiny_model, *workload)


@pytest.mark.parametrize("proposer", PROPOSER_PARAMS)
def test_identical_alone_and_twice(make_llm, tiny_model, workload, reference, proposer) -> None:
    prompts, params = workload
    llm = make_llm(model=tiny_model, **_spec_kwargs(proposer, tiny_model), **engine_kwargs())
    alone = [tokens(llm, [p], [sp])[0] for p, sp in zip(prompts[:4], params[:4], strict=True)]
    assert alone == reference[:4]
    stats = llm.engine.scheduler.spec_stats
    first_accepted = stats.num_accepted_tokens
    # Again, all together: the suffix proposer now also drafts from its global tree of outputs.
    assert tokens(llm, prompts, params) == reference
    assert stats.num_accepted_tokens > first_accepted > 0
    assert stats.mean_tokens_per_step > 1.0


@pytest.mark.slow  # chunked, then preempted, for every proposer: heavy
@pytest.mark.parametrize("proposer", PROPOSERS)
def test_identical_with_chunked_prefill_and_preemption(
    make_llm, tiny_model, workload, reference, proposer
) -> None:
    prompts, params = workload
    spec = _spec_kwargs(proposer, tiny_model)
    chunked = make_llm(model=tiny_model, max_num_batched_tokens=24, **spec, **engine_kwargs())
    assert tokens(chunked, prompts, params) == reference
    assert chunked.engine.scheduler.spec_stats.num_accepted_tokens > 0

    # 12 blocks of 16 tokens for 8 requests of up to 114 tokens: requests must be preempted.
    small = make_llm(
        model=tiny_model,
        **spec,
        num_kv_blocks=12,
        max_model_len=160,
        **engine_kwargs(),
    )
    assert tokens(small, prompts, params) == reference
    assert small.engine.scheduler.num_preemptions > 0
    assert small.engine.scheduler.spec_stats.num_accepted_tokens > 0


@pytest.mark.slow  # two draft-model engines: heavy
def test_draft_model_with_other_weights(make_llm, tiny_model, workload, reference, tmp_path):
    """A draft model that mostly guesses wrong changes nothing; a foreign vocabulary is refused."""
    prompts, params = workload
    other = str(make_tiny_hf_folder(tmp_path / "other", "Qwen2ForCausalLM", vocab_size=512))
    llm = make_llm(
        model=tiny_model, speculative="draft", speculative_model=other, **engine_kwargs()
    )
    assert tokens(llm, prompts, params) == reference
    stats = llm.engine.scheduler.spec_stats
    assert stats.num_drafted_tokens > stats.num_accepted_tokens
    wrong = str(make_tiny_hf_folder(tmp_path / "wrong", vocab_size=600))
    with pytest.raises(ValueError, match="vocabulary"):
        make_llm(model=tiny_model, speculative="draft", speculative_model=wrong, **engine_kwargs())


class NoisyOracle(OracleProposer):
    """The known continuation, corrupted at random: long accepted runs and rejections."""

    def corrupt(self, token: int, full: list[int]) -> int:
        return token if self.rng.random() < 0.9 else 7


def test_long_accepted_runs_stops_and_opt_out(make_llm, tiny_model, workload, reference) -> None:
    prompts, params = workload
    llm = make_llm(model=tiny_model, speculative="ngram", **engine_kwargs())
    use_oracle(llm, NoisyOracle, prompts, reference)
    assert tokens(llm, prompts, params) == reference
    stats = llm.engine.scheduler.spec_stats
    assert 0.5 < stats.acceptance_rate < 1.0 and stats.mean_tokens_per_step > 2.0

    # A stop token inside an accepted run ends the request right there.
    greedy = 0
    stop_at = 10
    sp = SamplingParams(
        max_tokens=MAX_TOKENS,
        temperature=0.0,
        ignore_eos=True,
        stop_token_ids=[reference[greedy][stop_at]],
    )
    got = tokens(llm, [prompts[greedy]], [sp])[0]
    first = reference[greedy].index(reference[greedy][stop_at])
    assert got == reference[greedy][: first + 1]

    # Opted-out requests get no drafts.
    before = stats.num_drafted_tokens
    off = [
        SamplingParams(**{**vars(p), "use_speculation": False})
        for p in params  # same params otherwise
    ]
    assert tokens(llm, prompts, off) == reference
    assert stats.num_drafted_tokens == before


@pytest.mark.slow  # 1000 seeded requests: heavy
def test_first_tokens_follow_the_model_distribution(make_llm, tiny_model) -> None:
    """Seeded requests with temperature > 0 and top-k 4, drafts verified at the second token:
    the empirical (first, second) token frequencies match the model's probabilities, read back
    from the returned logprobs (the top-4 of the raw distribution, renormalized = top-k 4)."""
    llm = make_llm(model=tiny_model, speculative="ngram", **engine_kwargs())
    prompt = [300, 301, 302, 303]
    probe = llm.generate(
        [prompt], SamplingParams(max_tokens=2, temperature=0.0, logprobs=8), use_tqdm=False
    )[0].outputs[0]
    candidates = sorted(set(probe.logprobs[1].keys()) | set(probe.logprobs[0].keys()))

    class RandomCandidates(Proposer):
        rng = random.Random(1)

        def propose(self, reqs, max_drafts):
            return [[self.rng.choice(candidates)] for _ in reqs]

    engine = llm.engine
    engine.speculator = Speculator(RandomCandidates(), 1, engine.scheduler.max_model_len)
    n = 1000
    params = [
        # 3 tokens: the first comes from the prompt, the second is verified against a draft
        SamplingParams(max_tokens=3, temperature=1.0, top_k=4, seed=s, logprobs=4, ignore_eos=True)
        for s in range(n)
    ]
    outs = [o.outputs[0] for o in llm.generate([prompt] * n, params, use_tqdm=False)]
    stats = engine.scheduler.spec_stats
    assert stats.num_verify_steps == n and 0 < stats.num_accepted_tokens < n

    def top4(lps) -> dict[int, float]:
        ps = {tok: math.exp(lp.logprob) for tok, lp in lps.items() if lp.rank <= 4}
        total = sum(ps.values())
        return {t: p / total for t, p in ps.items()}

    p_first = top4(outs[0].logprobs[0])
    firsts = Counter(o.token_ids[0] for o in outs)
    tv_first = 0.5 * sum(
        abs(firsts[t] / n - p_first.get(t, 0.0)) for t in set(firsts) | set(p_first)
    )
    # the second token given the first: its distribution is in every output's logprobs
    by_first: dict[int, Counter] = {}
    cond: dict[int, dict[int, float]] = {}
    for o in outs:
        by_first.setdefault(o.token_ids[0], Counter())[o.token_ids[1]] += 1
        cond[o.token_ids[0]] = top4(o.logprobs[1])
    tv_second = 0.0
    for first, counts in by_first.items():
        m = sum(counts.values())
        keys = set(counts) | set(cond[first])
        tv_second += m / n * 0.5 * sum(abs(counts[t] / m - cond[first].get(t, 0.0)) for t in keys)
    # 1000 draws over 4 (and 4 x 4) cells: expected TV about 0.022 (0.05); 3x margin.
    assert tv_first < 0.07
    assert tv_second < 0.15

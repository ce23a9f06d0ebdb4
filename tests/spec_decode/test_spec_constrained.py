"""Speculative decoding for constrained requests on a tiny random-weight model (fp32,
batch-invariant): greedy outputs are token-identical with speculation on and off, alone and
together with free requests, with preemption; drafts the grammar rejects are cut before they are
verified, and the matcher ends every run in step with the output."""

from __future__ import annotations

import pytest
from spec_utils import OracleProposer, engine_kwargs, reference_tokens, tokens, use_oracle

from tokenmill import SamplingParams, StructuredOutputsParams
from tokenmill.structured.grammar import RequestGrammar
from utils_tiny import make_tiny_hf_folder

pytest.importorskip("xgrammar")

MAX_TOKENS = 40
SPECS = [
    # Repetitive languages, where the n-gram and suffix proposers find drafts.
    StructuredOutputsParams(
        json={"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 12}
    ),
    StructuredOutputsParams(regex=r"(ab|cd|a|b|c| )+\."),
    StructuredOutputsParams(grammar='root ::= item+\nitem ::= "x" | "yz" | " " | "(" item ")"'),
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return str(make_tiny_hf_folder(tmp_path_factory.mktemp("spec_constrained")))


@pytest.fixture(scope="module")
def workload() -> tuple[list[list[int]], list[SamplingParams]]:
    prompts = [[300 + i] + [310, 311, 312, 313] * 4 for i in range(4)]
    params = [
        SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, structured_outputs=s) for s in SPECS
    ]
    params.append(SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True))
    return prompts, params


@pytest.fixture(scope="module")
def reference(tiny_model, workload) -> list[list[int]]:
    return reference_tokens(tiny_model, *workload)


@pytest.fixture
def cuts(monkeypatch) -> list[int]:
    """[draft tokens offered for constrained requests, tokens the grammar cut from them]."""
    count = [0, 0]
    original = RequestGrammar.valid_prefix

    def counting(self: RequestGrammar, token_ids: list[int]) -> int:
        n = original(self, token_ids)
        count[0] += len(token_ids)
        count[1] += len(token_ids) - n
        return n

    monkeypatch.setattr(RequestGrammar, "valid_prefix", counting)
    return count


@pytest.mark.parametrize("proposer", [pytest.param("ngram", marks=pytest.mark.slow), "suffix"])
def test_constrained_greedy_identical_with_drafts(
    make_llm, tiny_model, workload, reference, cuts, proposer
) -> None:
    prompts, params = workload
    llm = make_llm(
        model=tiny_model, speculative=proposer, speculative_draft_cost=0.0, **engine_kwargs()
    )
    alone = [tokens(llm, [p], [sp])[0] for p, sp in zip(prompts, params, strict=True)]
    assert alone == reference
    assert tokens(llm, prompts, params) == reference
    stats = llm.engine.scheduler.spec_stats
    assert stats.num_accepted_tokens > 0
    assert cuts[0] > 0  # constrained requests drafted


@pytest.mark.parametrize("max_forced", [0, pytest.param(8, marks=pytest.mark.slow)])
def test_constrained_drafts_with_preemption(
    make_llm, tiny_model, workload, reference, monkeypatch, max_forced: int
) -> None:
    """Also with forced runs: a step may append drafts' accepted tokens, then forced ones."""
    prompts, params = workload
    prompts, params = prompts * 2, params * 2
    # 6 blocks of 16 tokens for 8 requests of up to 57 tokens: requests must be preempted.
    llm = make_llm(
        model=tiny_model,
        speculative="suffix",
        speculative_draft_cost=0.0,
        num_kv_blocks=6,
        max_model_len=64,
        max_forced_tokens=max_forced,
        **engine_kwargs(),
    )
    forced = [0]
    original = RequestGrammar.forced_tokens

    def counting(self: RequestGrammar, max_n: int) -> list[int]:
        ids = original(self, max_n)
        forced[0] += len(ids)
        return ids

    monkeypatch.setattr(RequestGrammar, "forced_tokens", counting)
    assert tokens(llm, prompts, params) == reference * 2
    assert (forced[0] > 0) == (max_forced > 0)
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.scheduler.spec_stats.num_accepted_tokens > 0


class GrammarBreakingOracle(OracleProposer):
    """The known continuation, corrupted at random: with a token no grammar here allows (cut
    before verification) or with another token of the same output (often one the grammar
    allows, then rejected by verification)."""

    def corrupt(self, token: int, full: list[int]) -> int:
        r = self.rng.random()
        return 7 if r < 0.1 else self.rng.choice(full) if r < 0.2 else token


def test_drafts_the_grammar_rejects_are_cut(make_llm, tiny_model, workload, reference, cuts):
    prompts, params = workload
    llm = make_llm(model=tiny_model, speculative="ngram", **engine_kwargs())
    use_oracle(llm, GrammarBreakingOracle, prompts, reference)
    assert tokens(llm, prompts, params) == reference
    stats = llm.engine.scheduler.spec_stats
    assert 0.3 < stats.acceptance_rate < 1.0 and stats.mean_tokens_per_step > 1.5
    assert 0 < cuts[1] < cuts[0]  # some drafts were cut, not all of them


@pytest.mark.parametrize(
    "spec, text, tail",
    [
        (StructuredOutputsParams(regex="[0-9]+"), "12a3", "4"),  # cut at the letter
        (StructuredOutputsParams(choice=["yes", "no"]), "yes", ""),  # whole, then the stop
    ],
)
def test_valid_prefix_leaves_the_matcher_where_it_was(spec, text: str, tail: str) -> None:
    from tokenmill.engine.tokenizer import Tokenizer
    from tokenmill.structured import StructuredOutputManager, tokenizer_info
    from utils_default import DEFAULT_GGUF

    tok = Tokenizer.from_gguf(DEFAULT_GGUF)
    m = StructuredOutputManager(
        lambda: tokenizer_info(tok.backend, tok.eos_token_ids, tok.vocab_size)
    )
    try:
        g = m.new_grammar(spec)
        ids = [tok.encode(c, add_special_tokens=False)[0] for c in text]
        eos = min(tok.eos_token_ids)
        valid = len(text.split("a")[0]) if "a" in text else len(ids)
        assert g.valid_prefix(ids + [eos]) == valid  # never the stop token that ends it
        assert not g.is_terminated()
        masks = g.draft_masks(ids[:valid])
        assert len(masks) == valid + 1
        for t in ids[:valid]:
            assert g.accept_token(t)  # the matcher was back at the start
        if tail:
            assert g.accept_token(tok.encode(tail, add_special_tokens=False)[0])
        assert g.accept_token(eos) and g.is_terminated()
    finally:
        m.close()

"""Structured output below the engine: spec validation, the vocabulary xgrammar sees, the
compile cache, and the sampler's grammar masks driven by random logits (no model)."""

from __future__ import annotations

import re

import pytest
import torch

from tokenmill.errors import InvalidRequestError
from tokenmill.sampling.sampler import Sampler, SamplingRow
from tokenmill.sampling_params import SamplingParams, StructuredOutputsParams
from utils_default import DEFAULT_GGUF, needs_default

# -- the spec -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, problem",
    [
        ({}, "exactly one"),
        ({"regex": "a", "choice": ["a"]}, "exactly one"),
        ({"json": "{not json"}, "not valid JSON"),
        ({"json": "[1, 2]"}, "JSON Schema object"),
        ({"regex": ""}, "non-empty"),
        ({"choice": []}, "1 to"),
        ({"choice": ["a", ""]}, "non-empty"),
        ({"grammar": 3}, "non-empty string"),
        ({"json": {"x": {1, 2}}}, "not JSON"),
    ],
)
def test_bad_specs_are_refused_on_construction(kw: dict, problem: str) -> None:
    with pytest.raises(InvalidRequestError, match=problem) as e:
        StructuredOutputsParams(**kw)
    assert e.value.param == "structured_outputs"


def test_spec_key_ignores_schema_key_order_and_text_form() -> None:
    a = StructuredOutputsParams(json={"type": "object", "required": []})
    b = StructuredOutputsParams(json='{"required": [], "type": "object"}')
    assert a.key() == b.key() and a.kind == "json"
    assert StructuredOutputsParams(choice=["x"]).key() != StructuredOutputsParams(regex="x").key()
    assert StructuredOutputsParams(json_object=True).kind == "json_object"


def test_sampling_params_take_only_a_spec() -> None:
    with pytest.raises(InvalidRequestError, match="structured_outputs"):
        SamplingParams(structured_outputs={"regex": "a"})  # type: ignore[arg-type]


# -- the grammar compiler on the default model's vocabulary ----------------------------------------

xgr = pytest.importorskip("xgrammar")
PAD = 64  # the model's logits may be wider than the tokenizer's vocabulary


@pytest.fixture(scope="module")
def tok():
    from tokenmill.engine.tokenizer import Tokenizer

    return Tokenizer.from_gguf(DEFAULT_GGUF)


@pytest.fixture(scope="module")
def manager(tok):
    from tokenmill.structured import StructuredOutputManager, tokenizer_info

    vocab = tok.vocab_size + PAD
    m = StructuredOutputManager(lambda: tokenizer_info(tok.backend, tok.eos_token_ids, vocab))
    yield m
    m.close()


@needs_default
def test_byte_level_vocabulary_decodes_to_bytes(tok) -> None:
    from tokenmill.structured import tokenizer_info

    info = tokenizer_info(tok.backend, tok.eos_token_ids, tok.vocab_size + PAD)
    assert info.vocab_type == xgr.VocabType.BYTE_LEVEL and not info.add_prefix_space
    assert info.vocab_size == tok.vocab_size + PAD
    assert set(info.stop_token_ids) == set(tok.eos_token_ids)
    ids = tok.encode(" héllo, wörld\n", add_special_tokens=False)
    assert b"".join(info.decoded_vocab[i] for i in ids) == " héllo, wörld\n".encode()


@needs_default
def test_equal_specs_compile_once_and_the_cache_is_bounded(tok) -> None:
    from tokenmill.structured import StructuredOutputManager, tokenizer_info

    m = StructuredOutputManager(
        lambda: tokenizer_info(tok.backend, tok.eos_token_ids, tok.vocab_size), max_cached=2
    )
    try:
        a = m.compile(StructuredOutputsParams(json={"type": "integer", "minimum": 0}))
        b = m.compile(StructuredOutputsParams(json='{"minimum": 0, "type": "integer"}'))
        assert a is b and m.num_compiled == 1 and m.num_hits == 1
        m.compile(StructuredOutputsParams(regex="x+"))
        m.compile(StructuredOutputsParams(regex="y+"))  # evicts the least recently used
        c = m.compile(StructuredOutputsParams(json={"type": "integer", "minimum": 0}))
        assert c is not a and m.num_compiled == 4
        assert a.result() is not None  # a request holding the evicted one still has it
    finally:
        m.close()


@needs_default
@pytest.mark.parametrize(
    "kw, problem",
    [
        ({"json": {"type": "foo"}}, 'json is invalid: Unsupported type "foo"'),
        ({"regex": "([a-"}, "regex is invalid: Regex parsing error"),
        ({"grammar": "root ::= foo"}, 'grammar is invalid: .*Rule "foo" is not defined'),
        ({"grammar": "start ::= 'a'"}, "grammar is invalid"),
    ],
)
def test_specs_that_do_not_compile_name_the_problem(manager, kw: dict, problem: str) -> None:
    spec = StructuredOutputsParams(**kw)
    for _ in range(2):  # the second answer comes from the cache, as clear as the first
        with pytest.raises(InvalidRequestError, match=problem) as e:
            manager.validate(spec)
        assert e.value.param == "structured_outputs"
        assert "/project/" not in str(e.value) and ".cc:" not in str(e.value)


SPECS = [
    (StructuredOutputsParams(regex=r"[0-9]{3}-[a-z]{2,5}"), r"[0-9]{3}-[a-z]{2,5}"),
    (StructuredOutputsParams(choice=["red", "green", 'say "blue"\n']), r'red|green|say "blue"\n'),
    (StructuredOutputsParams(grammar='root ::= "<" [a-c]{1,3} ">"'), r"<[a-c]{1,3}>"),
]


@needs_default
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("copies", [1, 2])  # 3 rows fill masks one by one, 6 in a batch call
def test_masked_sampling_yields_the_language_and_leaves_free_rows_alone(
    tok, manager, temperature: float, copies: int
) -> None:
    """Random logits: every constrained row ends (EOS) on a string of its language, a free row
    draws what it draws alone, and no padded id is ever chosen."""
    vocab = tok.vocab_size + PAD
    gen = torch.Generator().manual_seed(0)
    sampler = Sampler()
    specs = SPECS * copies
    n = len(specs) + 1
    grammars = [manager.new_grammar(spec) for spec, _ in specs] + [None]
    outs: list[list[int]] = [[] for _ in range(n)]
    done = [False] * n
    eos = frozenset(tok.eos_token_ids)
    for _ in range(40):
        live = [i for i in range(n) if not done[i]]
        if live == [n - 1]:
            break
        logits = torch.randn(len(live), vocab, generator=gen) * 4
        rows = [
            SamplingRow(
                params=SamplingParams(temperature=temperature, min_tokens=3),
                seed=i,
                prompt_token_ids=[1],
                output_token_ids=list(outs[i]),
                eos_token_ids=eos,
                grammar=grammars[i],
            )
            for i in live
        ]
        raw = logits.clone()
        tokens, _ = sampler(logits, rows)
        assert torch.equal(logits, raw)  # the mask works on a copy: logprobs stay raw
        alone, _ = sampler(logits[-1:], rows[-1:])
        assert tokens[-1] == alone[0]
        for i, t in zip(live, tokens, strict=True):
            assert t < tok.vocab_size
            outs[i].append(t)
            g = grammars[i]
            if g is not None:
                assert g.accept_token(t)
                done[i] = g.is_terminated()
    for (_, pattern), out, g in zip(specs, outs, grammars, strict=False):
        assert g.is_terminated() and out[-1] in eos
        assert re.fullmatch(pattern, tok.decode(out[:-1])), tok.decode(out)


@needs_default
def test_json_object_spec_gives_objects_only(tok, manager) -> None:
    g = manager.new_grammar(StructuredOutputsParams(json_object=True))
    g.fill_bitmask(bitmask := xgr.allocate_token_bitmask(1, tok.vocab_size + PAD), 0)
    logits = torch.zeros(1, tok.vocab_size + PAD)
    xgr.apply_token_bitmask_inplace(logits, bitmask)
    allowed = torch.nonzero(logits[0] == 0).flatten().tolist()
    assert allowed and all(tok.decode([t]).lstrip().startswith("{") for t in allowed)


# -- forced tokens -------------------------------------------------------------------------------


def allowed_ids(g, vocab: int) -> list[int]:
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    g.fill_bitmask(bitmask, 0)
    bits = (bitmask[0].unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return torch.nonzero(bits.flatten()[:vocab]).flatten().tolist()


def test_single_allowed_token_reads_one_bit_and_ignores_padding() -> None:
    from tokenmill.structured.grammar import single_allowed_token

    row = torch.zeros(3, dtype=torch.int32)
    assert single_allowed_token(row, 96) is None
    row[1] = torch.tensor(-(2**31), dtype=torch.int32)  # bit 31: token 63
    assert single_allowed_token(row, 96) == 63
    row[2] = 1 << 3  # a second token, 67
    assert single_allowed_token(row, 96) is None
    assert single_allowed_token(row, 66) is None  # 67 is padding, but word 2 is nonzero
    row[1] = 0
    assert single_allowed_token(row, 68) == 67
    assert single_allowed_token(row, 67) is None  # 67 is past the vocabulary
    row[2] = 0b1010
    assert single_allowed_token(row, 96) is None


@needs_default
@pytest.mark.parametrize(
    "spec, forces",
    [
        (StructuredOutputsParams(choice=["Washington", "Wellington"]), False),
        (StructuredOutputsParams(regex=r"\{[0-9]\}"), True),
        (
            StructuredOutputsParams(
                json={
                    "type": "object",
                    "properties": {"level": {"const": "high"}, "ok": {"enum": [True]}},
                    "required": ["level", "ok"],
                }
            ),
            True,
        ),
    ],
)
def test_forced_tokens_are_the_ids_each_mask_allows_alone(tok, manager, spec, forces) -> None:
    """Along a path through the grammar (always the largest allowed id), forced_tokens gives the
    run of positions whose mask allows exactly one id, bounded by max_n, and leaves the matcher
    where it was. `forces`: the path meets such a position (a choice's letters never do: every
    prefix of the rest is a token, and the model's two stop ids keep EOS from being forced)."""
    vocab = tok.vocab_size + PAD
    g = manager.new_grammar(spec)
    g.future.result()
    path: list[int] = []
    num_forced = 0
    for _ in range(60):
        if g.is_terminated():
            break
        before = allowed_ids(g, vocab)
        forced = g.forced_tokens(8)
        assert allowed_ids(g, vocab) == before  # rolled back
        assert g.forced_tokens(2) == forced[:2]
        # Expected: walk a fork of the state while one id alone is allowed.
        expected, probe = [], manager.new_grammar(spec)
        for t in path:
            assert probe.accept_token(t)
        while len(expected) < 8 and not probe.is_terminated():
            ids = allowed_ids(probe, vocab)
            if len(ids) != 1:
                break
            expected.append(ids[0])
            assert probe.accept_token(ids[0])
        assert forced == expected
        num_forced += len(forced)
        t = before[-1]
        assert g.accept_token(t)
        path.append(t)
    assert g.is_terminated() and path[-1] in tok.eos_token_ids
    assert g.forced_tokens(8) == []
    assert (num_forced > 0) == forces

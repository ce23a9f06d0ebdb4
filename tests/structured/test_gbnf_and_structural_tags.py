"""llama.cpp GBNF grammars and xgrammar structural tags: the languages they accept (checked on
strings, no vocabulary) and clear errors for specs that do not compile."""

from __future__ import annotations

import json

import pytest

from tokenmill.errors import InvalidRequestError
from tokenmill.sampling_params import StructuredOutputsParams
from utils_default import DEFAULT_GGUF, needs_default

xgr = pytest.importorskip("xgrammar")
from xgrammar.testing import _is_grammar_accept_string as accepts  # noqa: E402

from tokenmill.structured.gbnf import gbnf_to_ebnf  # noqa: E402
from tokenmill.structured.manager import structural_tag  # noqa: E402

# llama.cpp's grammars/json.gbnf, as written there: empty alternatives in `ws`, `\x` escapes.
JSON_GBNF = r"""
root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws

object ::=
  "{" ws (
            string ":" ws value
    ("," ws string ":" ws value)*
  )? "}" ws

array  ::=
  "[" ws (
            value
    ("," ws value)*
  )? "]" ws

string ::=
  "\"" (
    [^"\\\x7F\x00-\x1F] |
    "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) # escapes
  )* "\"" ws

number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws

# Optional space: by convention, applied in this grammar after literal chars when allowed
ws ::= | " " | "\n" [ \t]{0,20}
"""


def gbnf(text: str) -> xgr.Grammar:
    return xgr.Grammar.from_ebnf(gbnf_to_ebnf(text))


def test_llama_cpp_json_grammar_accepts_json_only() -> None:
    g = gbnf(JSON_GBNF)
    for ok in ['{"a": [1, 2.5e3, "x\\n"], "b": {"c": null}}', "{}", '{ "k":true}\n ']:
        assert accepts(g, ok), ok
    for bad in ['{"a": }', "[1]", '{"a": 1,}', "{'a': 1}"]:
        assert not accepts(g, bad), bad


@pytest.mark.parametrize(
    "text, good, bad",
    [
        ('root ::= | "a"', ["", "a"], ["b"]),  # empty first alternative
        ('root ::= "a" |', ["", "a"], ["aa"]),  # empty last alternative
        ('root ::= "x" ( | "a" | ) "y"', ["xy", "xay"], ["xaay"]),  # empty ones in a group
        ('root ::= "a" |\n  "b"\nx ::= "c" |\n\n# note\ny ::= "d"', ["a", "b"], ["c"]),
        ('root ::= . . "!"', ["ab!", "é€!", "\n\t!"], ["a!", "abc!"]),  # `.`: any character
        ('root ::= "." [.]', [".."], ["a."]),  # a dot in a string or class is a dot
        ('root ::= [\\x41-\\x43] "\\u00e9"', ["Bé"], ["Dé"]),
        ("root ::= my-rule{2}\nmy-rule ::= [0-9]", ["42"], ["4"]),
    ],
)
def test_gbnf_constructs(text: str, good: list[str], bad: list[str]) -> None:
    g = gbnf(text)
    assert all(accepts(g, s) for s in good), [s for s in good if not accepts(g, s)]
    assert not any(accepts(g, s) for s in bad), [s for s in bad if accepts(g, s)]


def test_xgrammar_ebnf_passes_through_unchanged() -> None:
    text = 'root ::= ("a" | "") [b-d]* "\\"" # c\nx ::= "y"{1,2}\n'
    assert gbnf_to_ebnf(text) == text


@pytest.mark.parametrize("ref", ["<[1000]>", "<think>"])
def test_token_references_are_refused(ref: str) -> None:
    with pytest.raises(ValueError, match="token references"):
        gbnf_to_ebnf(f'root ::= {ref} "a"')


TOOL = {
    "begin": '<tool_call>{"name": "get_weather", "arguments": ',
    "schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "end": "}</tool_call>",
}
LEGACY = {"structures": [TOOL], "triggers": ["<tool_call>"]}
FORMAT = {
    "type": "structural_tag",
    "format": {
        "type": "triggered_tags",
        "triggers": ["<n>"],
        "tags": [
            {"begin": "<n>", "content": {"type": "json_schema", "json_schema": {"type": "integer"}}}
            | {"end": "</n>"}
        ],
    },
}


def test_structural_tag_legacy_form_constrains_only_the_tagged_region() -> None:
    g = xgr.Grammar.from_structural_tag(structural_tag(json.dumps(LEGACY)))
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    assert accepts(g, "Let me check. " + call + " Done.")
    assert accepts(g, "no call at all")
    assert not accepts(g, call.replace('"city"', '"town"'))
    assert not accepts(g, '<tool_call>{"name": "other"}</tool_call>')


def test_structural_tag_format_form() -> None:
    g = xgr.Grammar.from_structural_tag(structural_tag(json.dumps(FORMAT)))
    assert accepts(g, "a <n>42</n> b <n>-7</n>")
    assert not accepts(g, "a <n>4.5</n>")


def test_structural_tag_spec_validation() -> None:
    as_text = StructuredOutputsParams(structural_tag=json.dumps(LEGACY))
    assert as_text.key() == StructuredOutputsParams(structural_tag=LEGACY).key()
    assert as_text.kind == "structural_tag"
    with pytest.raises(InvalidRequestError, match="structural_tag is not valid JSON"):
        StructuredOutputsParams(structural_tag="{oops")
    with pytest.raises(InvalidRequestError, match="structural_tag must be a JSON object"):
        StructuredOutputsParams(structural_tag="[1]")
    with pytest.raises(InvalidRequestError, match="exactly one"):
        StructuredOutputsParams(structural_tag=LEGACY, regex="a")


@pytest.fixture(scope="module")
def manager():
    from tokenmill.engine.tokenizer import Tokenizer
    from tokenmill.structured import StructuredOutputManager, tokenizer_info

    tok = Tokenizer.from_gguf(DEFAULT_GGUF)
    m = StructuredOutputManager(
        lambda: tokenizer_info(tok.backend, tok.eos_token_ids, tok.vocab_size)
    )
    yield m
    m.close()


@needs_default
@pytest.mark.parametrize(
    "kw, problem",
    [
        ({"structural_tag": {"structures": []}}, "triggers"),
        ({"structural_tag": {"structures": [{"begin": "<a>"}], "triggers": ["<a>"]}}, "schema"),
        (
            {"structural_tag": {"structures": [TOOL], "triggers": ["<other>"]}},
            "starts with none of the triggers",
        ),
        ({"structural_tag": {"type": "structural_tag", "format": {"type": "nope"}}}, "nope"),
        ({"structural_tag": {"foo": 1}}, "format"),
        (
            {"structural_tag": LEGACY | {"structures": [TOOL | {"schema": {"type": "bogus"}}]}},
            'Unsupported type "bogus"',
        ),
        ({"grammar": 'root ::= <[12]> "a"'}, "token references"),
        ({"grammar": "root ::= ( | "}, "grammar is invalid"),
    ],
)
def test_bad_specs_name_the_problem(manager, kw: dict, problem: str) -> None:
    spec = StructuredOutputsParams(**kw)
    with pytest.raises(InvalidRequestError, match=problem) as e:
        manager.validate(spec)
    assert e.value.param == "structured_outputs"
    assert "errors.pydantic.dev" not in str(e.value)


@needs_default
def test_gbnf_and_structural_tags_compile_on_the_vocabulary(manager) -> None:
    for spec in (
        StructuredOutputsParams(grammar=JSON_GBNF),
        StructuredOutputsParams(structural_tag=LEGACY),
        StructuredOutputsParams(structural_tag=FORMAT),
    ):
        g = manager.new_grammar(spec)
        assert g.future.result(timeout=60) is not None and not g.is_terminated()

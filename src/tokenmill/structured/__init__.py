"""Structured output: grammars compiled with xgrammar against the model's vocabulary, one
matcher per request, and the token masks the sampler applies. Token-level only: the model runner
sees a mask, never text."""

from tokenmill.structured.grammar import RequestGrammar
from tokenmill.structured.manager import StructuredOutputManager, check_compiled, check_json_schema
from tokenmill.structured.masks import apply_grammar_masks
from tokenmill.structured.vocab import tokenizer_info

__all__ = [
    "RequestGrammar",
    "StructuredOutputManager",
    "apply_grammar_masks",
    "check_compiled",
    "check_json_schema",
    "tokenizer_info",
]

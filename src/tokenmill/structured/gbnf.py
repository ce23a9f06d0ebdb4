"""llama.cpp's GBNF grammars in xgrammar's EBNF.

The two dialects share rules (`name ::= ...`, dashed names), strings and character classes with
`\\x`/`\\u`/`\\U` escapes, `* + ? {m,n}`, groups and `#` comments. GBNF also allows an empty
alternative (`ws ::= | " "`, `( | "a")`), which xgrammar's parser rejects: it becomes `""`; and
`.` (any character), which becomes the class of every code point. Token references (`<[id]>`,
`<think>`) name tokenizer tokens, which a character grammar cannot express: rejected.
Everything else is copied as written, so an xgrammar EBNF grammar passes through unchanged.
"""

from __future__ import annotations

import re

ANY_CHAR = r"[\x00-\U0010FFFF]"
EMPTY = '""'
# One lexical item: a comment, a string, a character class, `::=`, a name, or one character.
_ITEM = re.compile(
    r"""(?P<comment>\#[^\n]*)
      | (?P<string>"(?:\\.|[^"\\])*")
      | (?P<cls>\[(?:\\.|[^\]\\])*\])
      | (?P<defines>::=)
      | (?P<name>[A-Za-z0-9_][A-Za-z0-9_-]*)
      | (?P<space>\s+)
      | (?P<other>.)""",
    re.VERBOSE | re.DOTALL,
)
_RULE_START = re.compile(r"\s*(?:\#[^\n]*\s*)*::=")


def gbnf_to_ebnf(text: str) -> str:
    """`text` (GBNF or xgrammar EBNF) as EBNF xgrammar parses; raises ValueError for a construct
    it cannot express (the compiler reports every other error)."""
    out: list[str] = []
    empty = False  # the current alternative has no element yet (after `::=`, `(` or `|`)
    pos = 0
    while pos < len(text):
        m = _ITEM.match(text, pos)
        assert m is not None  # `other` matches any single character
        kind, item = m.lastgroup, m.group()
        pos = m.end()
        if kind in ("comment", "space"):
            out.append(item)
            continue
        if kind == "name" and _RULE_START.match(text, pos):  # a new rule ends the last one
            if empty:  # before the line break: a rule name must begin its line
                at = len(out)
                while at and (out[at - 1].isspace() or out[at - 1].startswith("#")):
                    at -= 1
                out.insert(at, " " + EMPTY)
            out.append(item)
            empty = False
            continue
        if kind == "defines":
            out.append(item)
            empty = True
            continue
        if kind == "other" and item in "|)":
            if empty:
                out.append(EMPTY + " ")
            out.append(item)
            empty = item == "|"
            continue
        if kind == "other" and item == "(":
            out.append(item)
            empty = True
            continue
        if kind == "other" and item == "<":
            raise ValueError(
                f"token references (<...>) are not supported (at offset {m.start()}); "
                "write the token's text as a string"
            )
        out.append(ANY_CHAR if kind == "other" and item == "." else item)
        if kind in ("string", "cls", "name") or (kind == "other" and item == "."):
            empty = False
    if empty:
        out.append(" " + EMPTY)
    return "".join(out)

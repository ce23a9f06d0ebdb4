"""Compiles structured-output specs to grammars, off the engine's thread, with a bounded cache.

A spec compiles once per distinct `StructuredOutputsParams.key()`; requests with equal specs
share the compiled grammar (each gets its own matcher). Compiling runs in a small thread pool:
the engine submits at `add_request` and the scheduler skips a request until its grammar is
ready, so a slow schema never stalls other requests. Front ends call `validate` first (from a
worker thread) so a bad spec is a clear error before the request reaches the engine loop.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import xgrammar as xgr

from tokenmill.errors import InvalidRequestError
from tokenmill.sampling_params import StructuredOutputsParams
from tokenmill.structured.gbnf import gbnf_to_ebnf
from tokenmill.structured.grammar import RequestGrammar

DEFAULT_MAX_CACHED = 128  # compiled grammars kept (a large schema's can take megabytes)
PARAM = "structured_outputs"
# xgrammar's messages start with "[time] /path/file.cc:line: "; the rest names the problem.
_LOG_PREFIX = re.compile(r"^\s*\[[^\]]*\]\s*\S+:\d+:\s*")
_MAX_MESSAGE = 500
_PYDANTIC_LINK = re.compile(r"\s*For further information visit \S+")


class StructuredOutputManager:
    def __init__(
        self,
        make_tokenizer_info: Callable[[], xgr.TokenizerInfo],
        *,
        max_cached: int = DEFAULT_MAX_CACHED,
        num_workers: int = 2,
        compiler_threads: int = 2,
    ) -> None:
        if max_cached < 1:
            raise ValueError(f"max_cached must be >= 1, got {max_cached}")
        self.max_cached = max_cached
        self._make_tokenizer_info = make_tokenizer_info
        self._compiler_threads = compiler_threads
        self._compiler: xgr.GrammarCompiler | None = None
        self._compiler_lock = threading.Lock()
        self._lock = threading.Lock()  # guards the cache: engine and front-end threads share it
        self._cache: OrderedDict[tuple[str, str], Future[xgr.CompiledGrammar]] = OrderedDict()
        self._pool = ThreadPoolExecutor(num_workers, thread_name_prefix="tokenmill-grammar")
        self.num_compiled = 0  # cache misses
        self.num_hits = 0

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    @property
    def compiler(self) -> xgr.GrammarCompiler:
        """Built on first use: the tokenizer's info takes a moment for a large vocabulary."""
        with self._compiler_lock:
            if self._compiler is None:
                # Our own cache holds compiled grammars (bounded); xgrammar's would be a second.
                self._compiler = xgr.GrammarCompiler(
                    self._make_tokenizer_info(),
                    max_threads=self._compiler_threads,
                    cache_enabled=False,
                )
            return self._compiler

    def compile(self, spec: StructuredOutputsParams) -> Future[xgr.CompiledGrammar]:
        """The compiled grammar of `spec`, compiling in the pool unless cached. A spec that does
        not compile gives a future that raises InvalidRequestError (cached too)."""
        key = spec.key()
        with self._lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                self.num_hits += 1
                return future
            future = self._pool.submit(self._compile, spec)
            self._cache[key] = future
            self.num_compiled += 1
            while len(self._cache) > self.max_cached:  # requests holding one keep it alive
                self._cache.popitem(last=False)
            return future

    def validate(self, spec: StructuredOutputsParams, timeout: float | None = None) -> None:
        """Raises InvalidRequestError unless `spec` compiles; blocks until it has (call it off
        the engine's thread). The compiled grammar stays cached for the request."""
        check_compiled(self.compile(spec), timeout)

    def new_grammar(self, spec: StructuredOutputsParams) -> RequestGrammar:
        """A fresh matcher state for one request (one per sample when n > 1)."""
        return RequestGrammar(self.compile(spec))

    def _compile(self, spec: StructuredOutputsParams) -> xgr.CompiledGrammar:
        compiler = self.compiler
        kind = spec.kind
        try:
            if kind == "json":
                # Compact JSON: free whitespace lets a small model pad forever.
                return compiler.compile_json_schema(spec.key()[1], any_whitespace=False)
            if kind == "json_object":  # any object (the builtin JSON grammar allows any value)
                return compiler.compile_json_schema(
                    '{"type": "object"}', any_whitespace=False, strict_mode=False
                )
            if kind == "regex":
                return compiler.compile_regex(spec.regex)  # type: ignore[arg-type]
            if kind == "choice":
                return compiler.compile_grammar(choice_grammar(spec.choice or []))
            if kind == "structural_tag":
                return compiler.compile_structural_tag(structural_tag(spec.key()[1]))
            return compiler.compile_grammar(gbnf_to_ebnf(spec.grammar))  # type: ignore[arg-type]
        except (RuntimeError, ValueError, TypeError) as e:
            raise InvalidRequestError(
                f"{PARAM}.{kind} is invalid: {clean_message(e)}", PARAM
            ) from None


def check_compiled(future: Future[xgr.CompiledGrammar], timeout: float | None = None) -> None:
    """Waits for `future`; raises a fresh InvalidRequestError if it failed (the cached one's
    traceback would grow with every raise)."""
    e = future.exception(timeout)
    if isinstance(e, InvalidRequestError):
        raise InvalidRequestError(str(e), e.param)
    if e is not None:
        raise e


def check_json_schema(schema: dict[str, object] | bool, param: str) -> None:
    """Raises InvalidRequestError (naming `param`) unless `schema` converts to a grammar. Cheap:
    no vocabulary is involved, so front ends can check schemas they may never compile."""
    try:
        xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False)
    except (RuntimeError, ValueError, TypeError) as e:
        raise InvalidRequestError(f"{param} is invalid: {clean_message(e)}", param) from None


def structural_tag(text: str) -> xgr.StructuralTag:
    """xgrammar's structural tag from its JSON: vLLM's legacy form (`structures` of begin,
    schema, end, with `triggers`) or xgrammar's (`{"type": "structural_tag", "format": ...}`)."""
    obj = json.loads(text)
    if "structures" not in obj:
        return xgr.StructuralTag.from_json(obj)
    structures, triggers = obj.get("structures"), obj.get("triggers")
    if not isinstance(structures, list) or not isinstance(triggers, list) or not triggers:
        raise ValueError("`structures` must be a list and `triggers` a non-empty list of strings")
    items = [xgr.StructuralTagItem.model_validate(s) for s in structures]
    for item in items:
        if not any(item.begin.startswith(t) for t in triggers):
            raise ValueError(f"begin {item.begin!r} starts with none of the triggers")
    return xgr.StructuralTag.from_legacy_structural_tag(items, triggers)


def choice_grammar(choices: list[str]) -> str:
    """EBNF for "exactly one of `choices`". JSON string escapes are EBNF string escapes."""
    alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)
    return f"root ::= {alternatives}"


def clean_message(e: BaseException) -> str:
    msg = _PYDANTIC_LINK.sub("", _LOG_PREFIX.sub("", str(e))).strip()
    return msg if len(msg) <= _MAX_MESSAGE else msg[:_MAX_MESSAGE] + "..."

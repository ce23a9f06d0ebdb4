"""The OpenAPI document at /openapi.json, made to match what the server really answers.

FastAPI's generated document is post-processed once: every operation lists the statuses the
server sends (400 rather than FastAPI's 422, 401/413 from the request guard, 503 with
Retry-After) with OpenAI's error body; 200s get their real shapes and media types (JSON or
server-sent events, Prometheus text for /metrics); and the request limits that depend on the
served model (`x-limit` markers in the protocol modules: token ids, sequence and prompt lengths,
prompts per request; model names) are filled in. So a request the document accepts is only
refused for what a schema cannot say (a text prompt plus max_tokens over the context, a
cross-field rule, a full queue).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from tokenmill.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from tokenmill.server.responses import (
    DOCUMENTED,
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionResponse,
    DetokenizeResponse,
    ErrorResponse,
    HealthResponse,
    ModelList,
    TokenizeResponse,
    VersionResponse,
)

_REQUESTS = (CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest)
_ERRORS = {
    400: "Invalid request: the message names the parameter and its limit",
    401: "Missing or wrong API key (`Authorization: Bearer <key>`)",
    404: "The model is not served here",
    413: "The request body is over the server's size limit",
    429: "The request cannot meet its `slo` even if served first (--slo-reject-hopeless)",
    500: "Internal error, or the engine loop has failed",
    503: "Overloaded: too many sequences are pending; retry after Retry-After seconds",
}
_GENERATE = (400, 404, 413, 429, 500, 503)


def _events(chunk: type[BaseModel]) -> dict[str, Any]:
    """Server-sent events (OpenAPI 3.1: the schema describes one event): `data:` is a JSON
    chunk, an error (a failure after the 200 went out), or the final `[DONE]`."""
    json_data = {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": {"anyOf": [_schema_ref(chunk), _schema_ref(ErrorResponse)]},
    }
    data = {"anyOf": [{"const": "[DONE]"}, json_data]}
    event = {"type": "object", "required": ["data"], "properties": {"data": data}}
    return {"text/event-stream": {"schema": event}}


# (method, path) -> (200 body: a model, or a content map; the error statuses it answers)
_ROUTES: dict[tuple[str, str], tuple[type[BaseModel] | dict[str, Any], tuple[int, ...]]] = {
    ("post", "/v1/completions"): (CompletionResponse, _GENERATE),
    ("post", "/v1/chat/completions"): (ChatCompletionResponse, _GENERATE),
    ("get", "/v1/models"): (ModelList, (413, 500)),
    ("get", "/health"): (HealthResponse, (413, 500, 503)),
    ("get", "/metrics"): ({"text/plain": {"schema": {"type": "string"}}}, (413, 500)),
    ("get", "/version"): (VersionResponse, (413, 500)),
    # 413 / 503 also come from the tokenizer pool's deadline (preprocess.py)
    ("post", "/tokenize"): (TokenizeResponse, (400, 404, 413, 500, 503)),
    ("post", "/detokenize"): (DetokenizeResponse, (400, 404, 413, 500, 503)),
}
_STREAMING = {"/v1/completions": CompletionChunk, "/v1/chat/completions": ChatCompletionChunk}


@dataclass(frozen=True)
class Limits:
    """What the document needs to know about the server."""

    model_names: list[str]
    vocab_size: int
    max_seq_len: int
    max_pending_seqs: int | None
    needs_api_key: Callable[[str], bool]  # whether the request guard asks this path for a key


def install_openapi(app: FastAPI, limits: Limits) -> None:
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = copy.deepcopy(generate())
            app.openapi_schema = finish(doc, limits)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _schema_ref(model: type[BaseModel]) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _ref(model: type[BaseModel]) -> dict[str, Any]:
    return {"application/json": {"schema": _schema_ref(model)}}


def finish(doc: dict[str, Any], limits: Limits) -> dict[str, Any]:
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    # pydantic's own schemas: FastAPI's document model turns integer bounds into floats, and
    # 2^64 - 1 as a float is 2^64.
    for model in (*_REQUESTS, *DOCUMENTED):
        found = copy.deepcopy(model.model_json_schema(ref_template="#/components/schemas/{model}"))
        schemas.update(found.pop("$defs", {}))
        schemas[model.__name__] = found
    for path, ops in doc.get("paths", {}).items():
        for method, op in ops.items():
            op["responses"] = _responses(method, path, op.get("responses", {}), limits)
    _fill_limits(schemas, limits)
    return doc


def _responses(method: str, path: str, generated: dict[str, Any], limits: Limits) -> dict[str, Any]:
    ok, errors = _ROUTES.get((method, path), (None, (413, 500)))
    out: dict[str, Any] = {"200": dict(generated.get("200", {"description": "OK"}))}
    if ok is not None:
        content = _ref(ok) if isinstance(ok, type) else ok
        description = "OK"
        if path in _STREAMING:
            content = {**content, **_events(_STREAMING[path])}
            description = "OK (server-sent events when stream is true)"
        out["200"] = {"description": description, "content": content}
    statuses = sorted({*errors, *((401,) if limits.needs_api_key(path) else ())})
    for status in statuses:
        resp: dict[str, Any] = {"description": _ERRORS[status], "content": _ref(ErrorResponse)}
        if status == 503 and path in (*_STREAMING, "/tokenize", "/detokenize"):
            resp["headers"] = {"Retry-After": {"schema": {"type": "integer", "minimum": 1}}}
        if status == 401:
            resp["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
        out[str(status)] = resp
    return out


def _nodes(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _nodes(v)
    elif isinstance(node, list):
        for v in node:
            yield from _nodes(v)


def _fill_limits(schemas: dict[str, Any], limits: Limits) -> None:
    for node in list(_nodes(schemas)):
        kind = node.pop("x-limit", None)
        if kind == "token_id":
            node["maximum"] = limits.vocab_size - 1
        elif kind == "token_key":  # a decimal string naming a token id
            node["pattern"] = f"^0*({_below(limits.vocab_size)})$"
        elif kind == "seq_len":  # a prompt has at least one token
            node["maximum"] = limits.max_seq_len - 1
        elif kind == "prompt_len":  # and leaves room for at least one more
            node["maxItems"] = limits.max_seq_len - 1
        elif kind == "num_prompts" and limits.max_pending_seqs is not None:
            node["maxItems"] = limits.max_pending_seqs
    names = {"type": "string", "enum": list(limits.model_names)}
    for schema in schemas.values():
        props = schema.get("properties", {})
        if "model" in props and schema.get("title", "").endswith("Request"):
            props["model"] = {"anyOf": [names, {"type": "null"}], "default": None}


def _below(n: int) -> str:
    """A regex alternation matching the decimal numbers 0 .. n-1 (no leading zeros needed)."""
    digits = str(n - 1)
    k = len(digits)
    alts = [f"[0-9]{{1,{k - 1}}}"] if k > 1 else []
    for i, d in enumerate(digits[:-1]):
        if d != "0":
            alts.append(f"{digits[:i]}[0-{int(d) - 1}][0-9]{{{k - i - 1}}}")
    alts.append(f"{digits[:-1]}[0-{digits[-1]}]")
    return "|".join(alts)

"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

User mistakes are 400 with the offending parameter named; pydantic's validation details never
reach the client. Anything unexpected is a 500 with a generic message (logged in full here).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokenmill.engine.async_engine import EngineDeadError, QueueFullError
from tokenmill.errors import InvalidRequestError
from tokenmill.slo_params import SloHopelessError

logger = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "server_error",
}


class APIError(Exception):
    """An error with an HTTP status, raised anywhere in the server and rendered by the app."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    err_type = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    message, param = _encodable(message), None if param is None else _encodable(param)
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def _encodable(text: str) -> str:
    """A lone surrogate from the request (in a field name, say) would make the error itself
    unencodable as UTF-8: escape it."""
    return text if text.isascii() else text.encode("utf-8", "backslashreplace").decode()


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status, headers=headers)


def error_bytes(status: int, message: str, code: str | None = None) -> bytes:
    """The JSON body of an error, for ASGI middleware that answers without FastAPI."""
    return json.dumps(error_body(status, message, None, code)).encode()


def to_api_error(exc: BaseException) -> APIError:
    """Maps engine and validation exceptions to the status the client should see."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, SloHopelessError):  # retrying later, or with a looser slo, may succeed
        return APIError(429, str(exc), exc.param, exc.code)
    if isinstance(exc, InvalidRequestError):
        return APIError(400, str(exc), exc.param, exc.code)
    if isinstance(exc, QueueFullError):
        return APIError(503, str(exc), code="server_overloaded", headers={"Retry-After": "1"})
    if isinstance(exc, EngineDeadError):
        return APIError(500, str(exc), code="engine_dead")
    if isinstance(exc, ValueError):  # user errors raise ValueError subclasses by convention
        return APIError(400, str(exc))
    logger.error("internal error", exc_info=exc)
    return APIError(500, "internal server error")


# Fields holding objects: their errors name the inner field (messages[0].role); any other field's
# errors name the field itself, whatever union branch or list item pydantic was looking at.
_NESTED = {"messages": 3, "stream_options": 2}
_LIMITS = {
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}",
    "too_short": "must have at least {min_length} item(s)",
    "too_long": "must have at most {max_length} item(s)",
    "string_too_short": "must have at least {min_length} character(s)",
    "string_too_long": "must have at most {max_length} character(s)",
}


def _loc_to_param(loc: tuple[Any, ...]) -> str | None:
    parts = [p for p in loc if p != "body"]
    if not parts:
        return None
    parts = parts[: _NESTED.get(str(parts[0]), 1)]
    param = ""
    for p in parts:
        if isinstance(p, int):
            param += f"[{p}]"
        else:
            param += f".{p}" if param else str(p)
    return param


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request")
    err = errors[0]
    loc = tuple(err.get("loc", ()))
    kind = err.get("type", "")
    if kind == "json_invalid":
        return APIError(400, "the request body is not valid JSON")
    if loc in ((), ("body",)):
        return APIError(400, "the request body must be a JSON object")
    param = _loc_to_param(loc)
    msg = str(err.get("msg", "is invalid"))
    msg = msg.removeprefix("Value error, ")
    if kind == "missing":
        msg = "is required"
    elif kind == "extra_forbidden":
        msg = "is not a recognized argument"
    elif kind in _LIMITS:
        msg = _LIMITS[kind].format(**err.get("ctx", {})) + f", got {_short(err.get('input'))}"
    else:
        msg = msg[:1].lower() + msg[1:]
    return APIError(400, f"{param} {msg}" if param else msg, param)


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(_: Request, exc: Exception) -> JSONResponse:
        e = to_api_error(exc)
        return error_response(e.status, e.message, e.param, e.code, e.headers)

    async def on_validation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        e = validation_error(exc)
        return error_response(e.status, e.message, e.param, e.code)

    async def on_http(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        msg = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404:
            msg = "not found"
        return error_response(exc.status_code, msg, headers=getattr(exc, "headers", None))

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(InvalidRequestError, on_api_error)
    app.add_exception_handler(QueueFullError, on_api_error)
    app.add_exception_handler(EngineDeadError, on_api_error)
    app.add_exception_handler(ValueError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_api_error)

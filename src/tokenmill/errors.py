"""User-facing error types. Each names the offending field and its limit."""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """A request parameter is out of range; `param` names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ModelLoadError(ValueError):
    """A model source cannot be found, read or is not supported."""

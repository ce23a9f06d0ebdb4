"""User-facing error types. Each names the offending field and its limit."""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """A request parameter is out of range; `param` names the field. `code` is the
    machine-readable reason the server reports (OpenAI's `error.code`), when there is one."""

    code: str | None = None

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ContextLengthError(InvalidRequestError):
    """The prompt, or the prompt plus max_tokens, is longer than one sequence may ever be."""

    code = "context_length_exceeded"


class CapacityError(InvalidRequestError):
    """The request needs more sequences at once than the engine ever admits, so retrying can
    never help (unlike a full queue, which is temporary)."""

    code = "capacity_exceeded"


class ModelLoadError(ValueError):
    """A model source cannot be found, read or is not supported."""

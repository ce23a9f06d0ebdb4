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


def check_unicode(text: str, param: str | None = None) -> None:
    """Raises InvalidRequestError for text that is not valid Unicode: a lone surrogate (which JSON
    can carry as an escape, e.g. "\\ud800") cannot be encoded as UTF-8 or tokenized."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        where = f"{param} " if param else ""
        raise InvalidRequestError(
            f"{where}contains a lone surrogate (U+{ord(text[e.start]):04X}) at index {e.start}; "
            "text must be valid Unicode",
            param,
        ) from None

"""Text files shipped with the package (package data, so they are there in any install)."""

from __future__ import annotations

from importlib.resources import files

# The Declaration of Independence, the Gettysburg Address and Lincoln's Second Inaugural Address
# (public domain; see README.md here): the default calibration text of `tokenmill quantize`.
US_FOUNDING_TEXTS = "us_founding_texts.txt"


def read_text(name: str = US_FOUNDING_TEXTS) -> str:
    """The contents of the packaged text file `name`."""
    return files(__name__).joinpath(name).read_text(encoding="utf-8")

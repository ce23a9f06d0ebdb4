"""C++ CPU decode attention over the paged KV cache (csrc/paged_attention.cpp).

`load_cpu_attention()` JIT-builds the extension on first use (-O3 -march=native) into the
torch_extensions cache (TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions), so later processes
only reload it; at most once per process. If it cannot be built or loaded (no compiler, no
ninja, ...) it logs one warning and returns None. TOKENMILL_NO_EXT=1 disables it.

`paged_decode_attention` runs the kernel; `paged_prefill_attention` runs it for a short chunk of
query tokens; `supports` tells which head_dim and dtype it takes.
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

EXT_NAME = "tokenmill_cpu_attn"
_SOURCE = "paged_attention.cpp"


def _find_source() -> Path | None:
    # src/tokenmill/layers/attn_backends/cpu_ext.py -> <repo>/csrc; an editable install runs the
    # files in place, so this holds there too.
    repo = Path(__file__).resolve().parents[4]
    src = repo / "csrc" / _SOURCE
    return src if src.is_file() else None


def _host_tag() -> str:
    # -march=native builds are only valid on this CPU; the tag changes the build hash, so a
    # torch_extensions cache shared with another kind of CPU rebuilds instead of crashing.
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return hashlib.sha1(flags.encode()).hexdigest()[:12]


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


@functools.cache
def load_cpu_attention() -> Any | None:
    """The op namespace `torch.ops.tokenmill_cpu_attn`, building it if needed; None if unavailable.

    Built at most once per process; TOKENMILL_NO_EXT=1 disables it.
    """
    if os.environ.get("TOKENMILL_NO_EXT", "") not in ("", "0"):
        logger.info("TOKENMILL_NO_EXT is set: using the PyTorch reference attention")
        return None
    try:
        src = _find_source()
        if src is None:
            raise FileNotFoundError(f"csrc/{_SOURCE} not found above {Path(__file__).parent}")
        _ensure_ninja_on_path()
        from torch.utils import cpp_extension

        start = time.perf_counter()
        cpp_extension.load(
            name=EXT_NAME,
            sources=[str(src)],
            extra_cflags=["-O3", "-march=native", "-fopenmp", f"-DTOKENMILL_HOST={_host_tag()}"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
        ops = torch.ops.tokenmill_cpu_attn
        ops.paged_decode_attention  # noqa: B018 - fails here if the library did not register
        logger.info("loaded %s in %.1f s", EXT_NAME, time.perf_counter() - start)
        return ops
    except Exception as e:  # any build or load failure means: use the fallback
        logger.warning(
            "could not build the C++ CPU attention (%s: %s); falling back to the PyTorch "
            "reference attention, slower",
            type(e).__name__,
            _summary(str(e)),
        )
        return None


_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def supports(head_dim: int, dtype: torch.dtype) -> bool:
    """Whether the kernel takes this head_dim and dtype (the extension may still be unavailable)."""
    return head_dim % 32 == 0 and head_dim <= 256 and dtype in _DTYPES


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    ctx_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Decode attention, one query token per row, read straight from the paged cache.

    q: [B, H, D] float32/bfloat16/float16, last dim contiguous (a view of the fused qkv output
    is fine); k_cache, v_cache: [num_blocks, block_size, H_kv, D] of q's dtype, last dim
    contiguous (per-layer views of the full cache are fine); block_tables: [B, max_blocks]
    int64; ctx_lens: [B] int64, each in [1, max_blocks * block_size]; all on CPU. H must be a
    multiple of H_kv (query head h reads kv head h // (H // H_kv)); D a multiple of 32, at most
    256 (see `supports`). Returns a contiguous [B, H, D] in q's dtype. A row's result does not
    depend on the other rows nor on the thread count. Raises RuntimeError on bad input, or if
    the extension is unavailable (check `load_cpu_attention()` first).
    """
    ops = load_cpu_attention()
    if ops is None:
        raise RuntimeError(f"{EXT_NAME} is unavailable; use the reference attention")
    return ops.paged_decode_attention.default(
        q, k_cache, v_cache, block_tables, ctx_lens, float(scale)
    )


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    start_pos: int,
    scale: float,
) -> torch.Tensor:
    """Causal attention for a chunk of n query tokens at positions start_pos .. start_pos + n - 1
    whose keys (cached prefix and the chunk itself) are already in the cache.

    q: [n, H, D]; block_table: [>= ceil((start_pos + n) / block_size)] int64. Query i is
    computed exactly like a decode row with start_pos + i + 1 keys, so a token's output is
    bit-identical whether it was decoded or part of a chunk. Each query reads its keys on its
    own (no sharing across the chunk): faster than gather + SDPA only for short chunks (a few
    tokens; see benchmarks/attention_cpu.py --prefill).
    """
    n = q.shape[0]
    lens = torch.arange(start_pos + 1, start_pos + n + 1, dtype=torch.int64)
    return paged_decode_attention(q, k_cache, v_cache, block_table.expand(n, -1), lens, scale)

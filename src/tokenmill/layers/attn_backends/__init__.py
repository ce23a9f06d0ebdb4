"""Optional attention backends beside the PyTorch reference path in `layers.attention`.

`cpu_ext`: a C++ decode attention over the paged KV cache for CPU, JIT-built on first use
(torch.utils.cpp_extension); when it cannot be built the reference path is used instead.
`triton_attn`: one ragged Triton kernel over the paged cache for the whole batch (the GPU path),
and its PyTorch oracle; imported only when chosen.
"""

from __future__ import annotations

import functools
import importlib.util


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None

"""Optional attention backends beside the PyTorch reference path in `layers.attention`.

`cpu_ext`: a C++ decode attention over the paged KV cache for CPU, JIT-built on first use
(torch.utils.cpp_extension); when it cannot be built the reference path is used instead.
"""

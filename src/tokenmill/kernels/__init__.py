"""C++ CPU kernels (csrc/), JIT-built with torch.utils.cpp_extension on first use."""

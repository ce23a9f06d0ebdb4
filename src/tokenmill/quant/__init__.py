"""Weight quantization methods for `Linear` (create weights / process after loading / apply).

`packing`: the block layout the CPU kernel reads (w = d * q + m per block of 32) and the
converters into it (GGUF Q4_0 / Q4_1 / Q8_0 blocks, round-to-nearest int8 / int4).
`cpu_quant`: the C++ kernel (csrc/quant_linear.cpp). `block_method`: the Linear method.
"""

"""Every kernel binding and its build. C++ CPU kernels (csrc/, JIT-built with
torch.utils.cpp_extension on first use, `cpp_build`; `python -m tokenmill.kernels` builds them
all ahead): `cpu_attention`, `cpu_quant`, `cpu_lut`, `cpu_fused`. Triton GPU kernels, imported
only where triton is wanted: `triton_attention` (with its PyTorch oracle `attention_ref`) and
`triton_quant`. Nothing here imports the rest of the package: layers and quantization methods
call these."""

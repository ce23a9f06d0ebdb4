"""How linear weights are stored and multiplied: the `QuantMethod` protocol and its methods.

`base`: the protocol and `make_quant_method(scheme)`. `unquantized`: dense weights.
`block`: blocks of 32 (GGUF Q4_0 / Q4_1 / Q8_0, int8, int4) for the C++ or Triton kernels;
`packing` is their layout and converters, `gpu_layout` the Triton kernel's. `squeezellm`:
per-row lookup tables plus sparse outliers; `squeezellm_fit` fits them. `rtn`: round-to-nearest
quantization as a checkpoint loads.
"""

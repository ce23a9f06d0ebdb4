"""The interface between a linear layer and the way its weight is stored and multiplied.

A `Linear` owns the shapes (in_features, out_features, and for a fused layer its shards) and
delegates everything about the weight to one `QuantMethod`, chosen when the layer is built from
the model's quantization scheme (`make_quant_method`):

1. `create_weights(layer)`: registers the parameters the loader fills (a dense placeholder
   where dense tensors may still arrive);
2. `load(layer, tensor, shard)`: takes a quantized tensor, or one shard of a fused layer's;
3. `process_after_loading(layer)`: converts what was loaded into the kernel's layout, once;
   a method may hand the layer to another (the dense one) when no kernel can run it;
4. `apply(layer, x)`: y = x W^T (+ b) for x [num_rows, in_features].

A method reads the layer's shapes and never assumes where they came from, so a column- or
row-parallel shard of a layer, or one expert of a fused mixture-of-experts weight, is one more
layer description that these methods serve, not a special case inside them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch

from tokenmill.quant.block import BlockQuantMethod
from tokenmill.quant.squeezellm import SqueezeLLMMethod
from tokenmill.quant.unquantized import UnquantizedMethod

if TYPE_CHECKING:
    from tokenmill.layers.linear import Linear

# How a model's linear weights arrive: dense tensors (None), GGUF or round-to-nearest blocks
# ("blocks": Q4_0 / Q4_1 / Q8_0, int8, int4), or SqueezeLLM lookup tables ("squeezellm").
QuantScheme = Literal["blocks", "squeezellm"] | None
QUANT_SCHEMES: tuple[str, ...] = ("blocks", "squeezellm")


class QuantMethod(Protocol):
    def create_weights(self, layer: Linear) -> None: ...

    def load(self, layer: Linear, tensor: Any, shard: str | None) -> None: ...

    def process_after_loading(self, layer: Linear) -> None: ...

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor: ...

    def describe(self, layer: Linear) -> str: ...


def make_quant_method(scheme: QuantScheme) -> QuantMethod:
    """A fresh method for one layer of a model whose weights arrive as `scheme`."""
    if scheme is None:
        return UnquantizedMethod()
    if scheme == "blocks":
        return BlockQuantMethod()
    if scheme == "squeezellm":
        return SqueezeLLMMethod()
    raise ValueError(f"unknown quantization scheme {scheme!r}; known: {', '.join(QUANT_SCHEMES)}")

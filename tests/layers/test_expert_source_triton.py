"""Offloaded experts on CUDA (layers/expert_source.py): slots in the Triton kernel's layout load
from the experts' mapped GGUF blocks (processed afresh on each load, then copied into the slot),
and compute what the expert built resident computes. Without CUDA, on CPU tensors under
Triton's interpreter with the block method told to take the Triton layout (see utils_triton)."""

from __future__ import annotations

import pytest
import torch

from utils_triton import interpreted  # sets TRITON_INTERPRET first

pytest.importorskip("triton")

from tokenmill.kernels import triton_quant as tq  # noqa: E402
from tokenmill.layers.expert_cache import ExpertCache  # noqa: E402
from tokenmill.layers.expert_source import map_experts, materialise  # noqa: E402
from tokenmill.layers.expert_tensors import expert_tensor_refs, get_ref  # noqa: E402
from tokenmill.layers.moe import Experts  # noqa: E402
from tokenmill.quant import block as block_method  # noqa: E402
from tokenmill.quant.packing import QuantizedTensor  # noqa: E402

tq = interpreted(tq)


def q4_0(rows: int, cols: int, gen: torch.Generator) -> QuantizedTensor:
    b = torch.randint(0, 256, (rows, cols // 32, 18), dtype=torch.uint8, generator=gen)
    b[..., 1] = 0x20  # fp16 scales of ~2^-7
    return QuantizedTensor("Q4_0", b.reshape(rows, -1), (rows, cols))


def test_triton_layout_slots_load_from_mapped_blocks(monkeypatch) -> None:
    monkeypatch.setattr(block_method, "_use_triton", lambda device: True)
    gen = torch.Generator().manual_seed(0)
    layers = []
    for _ in range(2):
        experts = Experts(4, 64, 32, torch.bfloat16, "blocks")
        map_experts(experts)
        for expert in experts:
            expert.gate_up_proj.load_quantized(q4_0(32, 64, gen), "gate_proj")
            expert.gate_up_proj.load_quantized(q4_0(32, 64, gen), "up_proj")
            expert.down_proj.load_quantized(q4_0(64, 32, gen), None)
        layers.append(experts)
    one = materialise(layers[0][0], torch.device("cpu"))
    assert one.down_proj.quant_method.gpu_weight is not None  # the Triton layout
    expert_bytes = sum(
        get_ref(r).numel() * get_ref(r).element_size() for r in expert_tensor_refs(one)
    )
    cache = ExpertCache(layers, 2 * expert_bytes, "lru")
    assert cache.mapped and cache.num_slots == 2
    x = torch.randn(3, 64, generator=gen).bfloat16()
    for layer, e in [(0, 1), (1, 3), (0, 2), (0, 1), (1, 0)]:
        cache.begin_layer(layer, [e], 3)
        got = cache.get(layer, e)(x)
        assert torch.equal(got, materialise(layers[layer][e], torch.device("cpu"))(x))
        cache.check()
    assert cache.stats.misses == 5 and cache.stats.bytes_loaded == 5 * expert_bytes

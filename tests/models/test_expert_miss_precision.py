"""Mixed-precision expert misses (`expert_miss_precision`, lossy and opt-in): a miss on an expert
whose routing weight is under the threshold runs its resident low-bit copy instead of loading
it. The copies compute what their re-quantized weights compute; with the option on the
low-bit path is taken (counted up to /metrics) and the logits stay within a bound of the
lossless ones; the pool stays within its budget, the copies counted beside it."""

from __future__ import annotations

from pathlib import Path

import pytest
import test_families as families  # the dense families' helpers (tests/models)
import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.config import EngineConfig
from tokenmill.engine.stats import engine_stats
from tokenmill.layers.expert_cache import ExpertCache
from tokenmill.layers.expert_lowbit import copy_bytes, low_bit_copy
from tokenmill.layers.linear import Linear
from tokenmill.layers.moe import SwiGLU
from tokenmill.quant.int2 import pack_int2, unpack_int2
from tokenmill.quant.packing import quantize_rtn
from tokenmill.testing.parity import engine_prefill_logits, logits_diff
from utils_tiny import make_tiny_hf_folder

transformers = pytest.importorskip("transformers")

ARCH = "MixtralForCausalLM"
NUM_LAYERS = 4  # x 8 experts of the tiny config
BASE = dict(dtype="float32", batch_invariant=True, block_size=4, kv_cache_memory_gb=0.02)


def dense_expert(hidden: int = 64, inter: int = 96, seed: int = 0) -> SwiGLU:
    torch.manual_seed(seed)
    expert = SwiGLU(hidden, inter, torch.float32, None)
    for m in expert.modules():
        if isinstance(m, Linear):
            m.weight.data.normal_(0.0, 0.05)
            m.quant_method.process_after_loading(m)
    return expert


def requantized_forward(expert: SwiGLU, bits: int, x: torch.Tensor) -> torch.Tensor:
    """The expert on its weights quantized round-to-nearest at `bits`, then dequantized."""
    gu = quantize_rtn(expert.gate_up_proj.weight, bits).dequantize()
    down = quantize_rtn(expert.down_proj.weight, bits).dequantize()
    gate, up = F.linear(x, gu).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


def test_int2_packing_round_trips() -> None:
    bw = quantize_rtn(torch.randn(5, 96), 2)
    assert int(bw.q.max()) <= 3
    packed = pack_int2(bw)
    assert packed.shape == (5, 3, 8) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int2(packed), bw.q)


@pytest.mark.parametrize("bits", [4, 2])
def test_low_bit_copy_computes_its_requantized_weights(bits: int) -> None:
    """int4 through the quantized CPU kernel (int8 activations: close, not exact), int2
    dequantized and multiplied densely (exact up to float32 summation order)."""
    expert = dense_expert()
    copy = low_bit_copy(expert, bits, torch.device("cpu"))
    x = torch.randn(5, 64)
    got, want = copy(x), requantized_forward(expert, bits, x)
    tol = 2e-3 if bits == 4 else 1e-5
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    # 5 (int4) or 3 (int2) bits a weight: q, and fp16 scale and offset per 32
    assert copy_bytes(copy) == 3 * 64 * 96 * (bits + 1) // 8


def test_threshold_picks_the_copy_only_on_a_low_weight_miss() -> None:
    layers = [nn.ModuleList(dense_expert(seed=s) for s in range(4))]
    full = 3 * 64 * 96 * 4
    cache = ExpertCache(layers, 2 * full, "lru", miss_bits=4, miss_threshold=0.3)
    assert cache.num_slots == 2 and cache.pool_bytes == 2 * full
    assert cache.low_precision_bytes == 4 * 3 * 64 * 96 * 5 // 8  # beside the budget
    x = torch.randn(3, 64)
    cache.begin_layer(0, [0, 1], 3)
    low = cache.get(0, 0, 0.1)  # a miss under the threshold: the copy, nothing loaded
    assert low is cache.low_precision[0][0] and not torch.equal(low(x), layers[0][0](x))
    assert torch.equal(cache.get(0, 1, 0.3)(x), layers[0][1](x))  # at the threshold: loaded
    assert torch.equal(cache.get(0, 1, 0.1)(x), layers[0][1](x))  # resident: a hit
    st = cache.stats
    assert (st.hits, st.misses, st.low_precision_hits) == (1, 1, 1)
    assert st.bytes_loaded == full and st.hit_rate == pytest.approx(1 / 3)
    cache.check()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny-moe-miss-precision")
    return make_tiny_hf_folder(root, ARCH, num_hidden_layers=NUM_LAYERS)


@pytest.fixture(scope="module")
def prompts(folder: Path) -> list[list[int]]:
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    return [tok(p)["input_ids"] for p in families.PROMPT_TEXTS]


def budget_gb(folder: Path, fraction: float) -> float:
    cfg = transformers.AutoConfig.from_pretrained(str(folder))
    expert = 3 * cfg.hidden_size * cfg.intermediate_size * 4  # float32 w1, w2, w3
    return fraction * NUM_LAYERS * cfg.num_local_experts * expert / 2**30


@pytest.mark.parametrize("precision,bound", [("int4", 0.01), ("int2", 0.1)])
def test_low_precision_misses_stay_close(folder, prompts, make_llm, precision, bound) -> None:
    """25% of the experts resident; Mixtral renormalises its top 2, so the second expert's
    weight is under 0.5 and a threshold of 0.5 sends every second-choice miss to its copy.
    The prefill logits differ from the lossless ones (the copies ran), by less than `bound`
    relative to the logits' scale; the counts reach the engine's stats."""
    name, gb = str(folder), budget_gb(folder, 0.25)
    lossless = make_llm(model=name, expert_memory_gb=gb, **BASE)
    want = engine_prefill_logits(lossless, prompts)
    llm = make_llm(
        model=name, expert_memory_gb=gb, expert_miss_precision=precision,
        expert_miss_threshold=0.5, **BASE,
    )  # fmt: skip
    got = engine_prefill_logits(llm, prompts)
    cache = llm.engine.runner.expert_cache
    stats = cache.stats
    assert stats.low_precision_hits > 0 and stats.misses > 0
    assert stats.bytes_loaded == (stats.misses + stats.prefetches) * cache.expert_bytes
    assert cache.pool_bytes <= gb * 2**30 and 0 < cache.low_precision_bytes < gb * 4 * 2**30
    cache.check()
    for g, w in zip(got, want, strict=True):
        diff = logits_diff(g, w)
        assert 0 < diff["max_abs_diff"] < bound * diff["logit_scale"], diff
    assert lossless.engine.runner.expert_cache.stats.low_precision_hits == 0
    snap = engine_stats(llm.engine.scheduler_stats(), 0, llm.engine.expert_cache_stats())
    assert snap.expert_low_precision_hits == stats.low_precision_hits


def test_miss_precision_options_checked() -> None:
    with pytest.raises(ValueError, match="expert_miss_precision must be int4 or int2"):
        EngineConfig(expert_memory_gb=1.0, expert_miss_precision="int3")
    with pytest.raises(ValueError, match="needs expert_memory_gb"):
        EngineConfig(expert_miss_precision="int4")
    with pytest.raises(ValueError, match=r"expert_miss_threshold must be in \(0, 1\]"):
        EngineConfig(expert_memory_gb=1.0, expert_miss_precision="int4", expert_miss_threshold=0)

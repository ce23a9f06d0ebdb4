"""MoE expert offloading (layers/expert_cache.py): a pool of expert slots under a byte budget,
loaded on a miss. The weights a slot computes with are the expert's own bytes, so generation is
token-identical to every expert resident; the pool never exceeds its budget; the sequence-level
policy beats LRU on a trace that cycles through the layers; the counts reach /metrics."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import test_families as families  # the dense families' helpers (tests/models)
import torch
from torch import nn

from tokenmill import LLM
from tokenmill.engine.async_engine import EngineStats
from tokenmill.engine.stats import engine_stats
from tokenmill.layers.expert_cache import ExpertCache, ExpertCacheStats
from tokenmill.layers.expert_policy import LRUPolicy, SequencePolicy
from tokenmill.layers.linear import Linear
from tokenmill.layers.moe import SwiGLU, offload_experts
from tokenmill.server.metrics import ServerMetrics
from tokenmill.testing.parity import greedy_tokens
from utils_tiny import make_tiny_hf_folder

transformers = pytest.importorskip("transformers")

ARCH = "MixtralForCausalLM"
NUM_LAYERS = 4  # x 8 experts: 32 experts, of which 25% is 8 slots
NUM_TOKENS = 10


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny-moe-offload")
    return make_tiny_hf_folder(root, ARCH, num_hidden_layers=NUM_LAYERS)


@pytest.fixture(scope="module")
def prompts(folder: Path) -> list[list[int]]:
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    return [tok(p)["input_ids"] for p in families.PROMPT_TEXTS]


@pytest.fixture(scope="module")
def want(folder: Path, prompts: list[list[int]]) -> list[list[int]]:
    """The greedy tokens with every expert resident (batch-invariant: alone or batched)."""
    resident = LLM(model=str(folder), kv_cache_memory_gb=0.02, **BASE)
    assert resident.engine.expert_cache_stats() is None
    return greedy_tokens(resident, prompts, NUM_TOKENS)


def expert_bytes(folder: Path) -> int:
    """One Mixtral expert of the tiny config in float32: w1, w3 [I, hidden] and w2 [hidden, I]."""
    cfg = transformers.AutoConfig.from_pretrained(str(folder))
    return 3 * cfg.hidden_size * cfg.intermediate_size * 4


def budget_gb(folder: Path, fraction: float) -> float:
    return fraction * NUM_LAYERS * 8 * expert_bytes(folder) / 2**30


BASE = dict(dtype="float32", batch_invariant=True, block_size=4)


@pytest.mark.parametrize(
    "policy,prefetch", [("lru", False), ("hobbit", False), ("lru", True), ("hobbit", True)]
)
def test_offloaded_tokens_identical(folder, prompts, want, make_llm, policy, prefetch) -> None:
    """25% of the experts resident, with and without prefetch: the same greedy tokens in a
    batch and alone, and again from the prefix cache; the pool holds 8 slots, within budget."""
    name = str(folder)
    gb = budget_gb(folder, 0.25)
    llm = make_llm(
        model=name, kv_cache_memory_gb=0.02, expert_memory_gb=gb, expert_cache_policy=policy,
        expert_prefetch=prefetch, **BASE,
    )  # fmt: skip
    cache = llm.engine.runner.expert_cache
    assert cache is not None and cache.num_slots == 8
    assert cache.expert_bytes == expert_bytes(folder)
    assert cache.pool_bytes <= gb * 2**30
    assert greedy_tokens(llm, prompts, NUM_TOKENS) == want
    assert [greedy_tokens(llm, [p], NUM_TOKENS)[0] for p in prompts] == want
    hits = llm.engine.scheduler.kv_cache_manager.prefix_hits
    assert greedy_tokens(llm, prompts, NUM_TOKENS) == want
    assert llm.engine.scheduler.kv_cache_manager.prefix_hits > hits
    cache.check()
    stats = llm.engine.expert_cache_stats()
    assert stats is not None and stats.misses > 0 and stats.hits > 0
    # Mixed-precision misses are opt-in: no low-bit copies, every expert at full precision.
    assert cache.low_precision is None and cache.low_precision_bytes == 0
    assert stats.low_precision_hits == 0
    assert stats.bytes_loaded == (stats.misses + stats.prefetches) * cache.expert_bytes
    assert (stats.prefetch_predicted > 0) == prefetch
    assert (stats.prefetches > 0) == prefetch
    # What the engine loop snapshots for /metrics.
    snap = engine_stats(llm.engine.scheduler_stats(), 0, stats)
    assert snap.expert_offloading and snap.expert_tokens == stats.tokens > 0
    assert (snap.expert_cache_hits, snap.expert_cache_misses) == (stats.hits, stats.misses)
    assert snap.expert_bytes_loaded == stats.bytes_loaded


def test_offloaded_tokens_identical_under_preemption(folder, prompts, want, make_llm) -> None:
    """Preempted for want of KV blocks and recomputed, with prefetch: the resident tokens."""
    name = str(folder)
    small = make_llm(
        model=name, num_kv_blocks=8, max_model_len=28, enable_prefix_caching=False,
        expert_memory_gb=budget_gb(folder, 0.25), expert_cache_policy="hobbit",
        expert_prefetch=True, **BASE,
    )  # fmt: skip
    assert greedy_tokens(small, prompts, NUM_TOKENS) == want
    assert small.engine.scheduler.num_preemptions > 0
    small.engine.runner.expert_cache.check()


def test_budget_below_one_expert_is_refused(folder, make_llm) -> None:
    with pytest.raises(ValueError, match="holds no expert"):
        make_llm(
            model=str(folder), dtype="float32", kv_cache_memory_gb=0.02,
            expert_memory_gb=0.5 * expert_bytes(folder) / 2**30,
        )  # fmt: skip


def tiny_layers(num_layers: int, num_experts: int, quant: str | None = None) -> list:
    torch.manual_seed(0)
    layers = []
    for _ in range(num_layers):
        experts = nn.ModuleList(SwiGLU(32, 32, torch.float32, quant) for _ in range(num_experts))
        for m in experts.modules():
            if isinstance(m, Linear):
                m.weight.data.normal_()
                m.quant_method.process_after_loading(m)
        layers.append(experts)
    return layers


def replay(policy: str, trace: list[list[list[int]]], num_slots: int) -> ExpertCacheStats:
    """Runs `trace` (passes -> layers -> active experts) through a cache of `num_slots`,
    asserting the pool's invariants after every lookup."""
    layers = tiny_layers(len(trace[0]), 8)
    cache = ExpertCache(layers, num_slots * 3 * 32 * 32 * 4, policy)
    assert cache.num_slots == num_slots
    x = torch.randn(2, 32)
    for step in trace:
        for layer, active in enumerate(step):
            cache.begin_layer(layer, active, 1)
            for e in active:
                assert torch.equal(cache.get(layer, e)(x), layers[layer][e](x))
                cache.check()
    return cache.stats


def test_sequence_policy_beats_lru_on_layer_cycle() -> None:
    """Each pass every layer uses its hot expert 0 and one random other: 8 distinct experts a
    pass, 6 slots. LRU evicts exactly the expert whose layer comes next and misses nearly all;
    the sequence-level policy keeps the hot experts (frequency) of the next layers."""
    gen = torch.Generator().manual_seed(0)
    trace = [
        [[0, int(torch.randint(1, 8, (1,), generator=gen))] for _ in range(4)] for _ in range(60)
    ]
    lru = replay("lru", trace, 6)
    policy = replay("hobbit", trace, 6)
    assert lru.hits + lru.misses == policy.hits + policy.misses == 60 * 4 * 2
    assert policy.hit_rate > lru.hit_rate + 0.2, (policy.hit_rate, lru.hit_rate)
    assert policy.hit_rate > 0.4


def test_nearness_follows_the_layer_cycle() -> None:
    """With 4 MoE layers and layer 1 running: layer 2 runs next (1), then 3, 0, and layer 1's
    own experts, already run, are needed last (1/4)."""
    policy = SequencePolicy(4)
    assert [policy.nearness(layer, 1) for layer in (2, 3, 0, 1)] == [1.0, 0.75, 0.5, 0.25]
    lru = LRUPolicy()
    for clock, key in enumerate([(0, 1), (1, 2), (0, 3)]):
        lru.touch(key, clock)
    assert lru.victim([(0, 1), (1, 2), (0, 3)], 3, 0) == (0, 1)


def test_prepacked_bf16_experts_packed_again_after_a_load() -> None:
    """bf16 dense experts on a CPU carry oneDNN's opaque prepacked weight: a slot copies the
    plain weight and packs it again, and computes what the expert computes."""
    layers = [nn.ModuleList(SwiGLU(32, 32, torch.bfloat16, None) for _ in range(4))]
    for m in layers[0].modules():
        if isinstance(m, Linear):
            m.weight.data.normal_()
            m.quant_method.process_after_loading(m)
    if layers[0][0].down_proj.packed_weight is None:
        pytest.skip("this torch build has no oneDNN prepacking")
    cache = ExpertCache(layers, 2 * 3 * 32 * 32 * 2, "lru")
    assert cache.num_slots == 2
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    for e in (0, 1, 2, 0, 3):
        cache.begin_layer(0, [e], 3)
        assert torch.equal(cache.get(0, e)(x), layers[0][e](x))
        cache.check()


def test_quantized_experts_offload_in_their_blocks() -> None:
    """int4 experts: a slot holds the packed blocks (no dense weight), copied byte for byte."""
    from tokenmill.quant.packing import quantize_rtn

    torch.manual_seed(0)
    layers = []
    for _ in range(2):
        experts = nn.ModuleList(SwiGLU(64, 64, torch.float32, "blocks") for _ in range(4))
        for m in experts.modules():
            if isinstance(m, Linear):
                m.load_quantized(quantize_rtn(torch.randn(m.out_features, 64), 4))
                m.quant_method.process_after_loading(m)
        layers.append(experts)
    model = nn.Module()
    model.layers = nn.ModuleList(layers)
    lin = layers[0][0].down_proj
    packed = lin.quant_method.packed
    assert lin.quant_method.describe(lin) == "int4" and "weight" not in lin._parameters
    cache = ExpertCache(layers, 2 * 3 * packed.numel() * packed.element_size(), "lru")
    assert cache.num_slots == 2
    slot_lin = cache.slots[0].down_proj
    assert (
        "weight" not in slot_lin._parameters and slot_lin.quant_method.packed.dtype == packed.dtype
    )
    x = torch.randn(3, 64)
    for layer, e in [(0, 1), (1, 3), (0, 2), (0, 1), (1, 0)]:
        cache.begin_layer(layer, [e], 3)
        assert torch.equal(cache.get(layer, e)(x), layers[layer][e](x))
        cache.check()
    assert cache.stats.misses == 5 and cache.stats.hits == 0
    assert offload_experts(model, 1 << 20) is None  # no SparseMoeBlock: nothing to offload


def test_expert_metrics_exported() -> None:
    stats = EngineStats(
        expert_offloading=True, expert_cache_hits=30, expert_cache_misses=6,
        expert_low_precision_hits=4, expert_bytes_loaded=4000, expert_tokens=8, expert_prefetches=5,
        expert_prefetch_predicted=20, expert_prefetch_correct=15, expert_prefetch_actual=30,
    )  # fmt: skip
    engine = SimpleNamespace(stats=stats, num_pending_seqs=0, is_healthy=True)
    metrics = ServerMetrics("m")
    metrics.attach(engine)  # type: ignore[arg-type]
    text = metrics.render().decode()
    values = {
        line.split("{")[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("tokenmill_expert")
    }
    assert values == {
        "tokenmill_expert_cache_hits_total": 30.0,
        "tokenmill_expert_cache_misses_total": 6.0,
        "tokenmill_expert_low_precision_hits_total": 4.0,
        "tokenmill_expert_bytes_loaded_total": 4000.0,
        "tokenmill_expert_prefetches_total": 5.0,
        "tokenmill_expert_cache_hit_rate": 0.75,
        "tokenmill_expert_bytes_loaded_per_token": 500.0,
        "tokenmill_expert_prefetch_accuracy": 0.75,
    }
    # Without offloading, no expert series at all.
    plain = ServerMetrics("m")
    plain.attach(SimpleNamespace(stats=EngineStats(), num_pending_seqs=0, is_healthy=True))  # type: ignore[arg-type]
    assert "tokenmill_expert" not in plain.render().decode()

"""Offloaded experts stay in the checkpoint's memory map (layers/expert_source.py): on a random
OLMoE-shaped GGUF written here, generation with a quarter of the experts resident is
token-identical to every expert resident, the non-resident experts' tensors lie inside the
file's mapping (not copies), and loading adds far less private memory than the experts' bytes.
GGUF blocks go straight into the quantized kernel's tiles on a slot load: byte-equal to the
loader's packing."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from tokenmill.config import EngineConfig
from tokenmill.engine.runner_setup import make_runner
from tokenmill.layers.expert_source import MappedSource, expert_linears
from tokenmill.layers.moe import SparseMoeBlock
from tokenmill.loader.model_loader import load_model
from tokenmill.loader.model_source import default_model_path
from tokenmill.quant.gguf_tiles import fill_tiles, fill_tiles_torch, fits_tiles
from tokenmill.quant.packing import GGUF_FORMATS, QuantizedTensor, cat_rows, pack_tiles
from tokenmill.testing.gguf_files import copy_tokenizer, random_q4_0
from tokenmill.testing.parity import greedy_tokens

Q4_0 = gguf.GGMLQuantizationType.Q4_0
F16 = gguf.GGMLQuantizationType.F16
BASE = dict(dtype="float32", batch_invariant=True, block_size=4, kv_cache_memory_gb=0.02)
PROMPTS = [[1, 17, 4012, 77, 9, 1200], [300, 301, 5, 42], [7] * 9]


def write_olmoe(
    path: Path, layers: int, experts: int, hidden: int, ffn: int, expert_type=Q4_0
) -> int:
    """An OLMoE GGUF with random weights and the default model's tokenizer; experts in Q4_0
    blocks (or F16). Returns the bytes of all experts in the file."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, "olmoe")
    vocab = copy_tokenizer(w, gguf.GGUFReader(default_model_path()))
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_rope_dimension_count(hidden // 4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_expert_count(experts)
    w.add_expert_used_count(2)
    w.add_tensor("token_embd.weight", rng.standard_normal((vocab, hidden)).astype(np.float16))
    ones = np.ones(hidden, np.float32)
    w.add_tensor("output_norm.weight", ones)
    expert_bytes = 0
    for i in range(layers):
        b = f"blk.{i}."
        for name in ("attn_norm", "ffn_norm", "attn_q_norm", "attn_k_norm"):
            w.add_tensor(b + name + ".weight", ones)
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            m = rng.standard_normal((hidden, hidden)).astype(np.float32) * 0.05
            w.add_tensor(b + name + ".weight", m)
        router = rng.standard_normal((experts, hidden)).astype(np.float32)
        w.add_tensor(b + "ffn_gate_inp.weight", router)
        for name, rows, cols in (("gate", ffn, hidden), ("up", ffn, hidden), ("down", hidden, ffn)):
            if expert_type == Q4_0:
                data = random_q4_0(rng, experts, rows, cols, scale=0.02)
                w.add_tensor(b + f"ffn_{name}_exps.weight", data, raw_dtype=Q4_0)
            else:
                data = (rng.standard_normal((experts, rows, cols)) * 0.05).astype(np.float16)
                w.add_tensor(b + f"ffn_{name}_exps.weight", data)
            expert_bytes += data.nbytes
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expert_bytes


def mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """The address ranges this process maps `path` at (/proc/self/maps)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path.resolve())):
            lo, hi = line.split()[0].split("-")
            ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


def assert_experts_mapped(model: torch.nn.Module, *paths: Path) -> None:
    """Every expert's source part is a view inside the mapping of one of `paths`."""
    ranges = [r for path in paths for r in mapped_ranges(path)]
    assert ranges
    blocks = [m for m in model.modules() if isinstance(m, SparseMoeBlock)]
    assert blocks and all(b.experts.gate_up_proj is None for b in blocks)  # no dense stack
    for block in blocks:
        for expert in block.experts:
            for lin in expert_linears(expert):
                assert isinstance(lin.quant_method, MappedSource) and not lin._parameters
                for part in lin.quant_method.parts.values():
                    t = part if isinstance(part, torch.Tensor) else part.blocks
                    start = t.data_ptr()
                    end = start + t.numel() * t.element_size()
                    assert any(lo <= start and end <= hi for lo, hi in ranges)


@pytest.mark.parametrize("expert_type", [Q4_0, F16], ids=["q4_0", "f16"])
def test_quarter_resident_from_the_map_is_token_identical(tmp_path, make_llm, expert_type):
    """Q4_0 experts load into slots through the tiles writer; F16 ones are converted to the
    float32 compute dtype by the slot copy, as the loader converts a resident expert."""
    layers, experts = 2, 16
    path = tmp_path / "olmoe.gguf"
    write_olmoe(path, layers, experts, hidden=64, ffn=96, expert_type=expert_type)
    resident = make_llm(model=str(path), **BASE)
    want = greedy_tokens(resident, PROMPTS, 8)
    del resident
    # A slot: the kernel's tiles (5 bits a Q4_0 weight: q, fp16 scale and offset), or the
    # float32 weights.
    slot = 3 * 64 * 96 * 5 // 8 if expert_type == Q4_0 else 3 * 64 * 96 * 4
    gb = 0.25 * layers * experts * slot / 2**30
    llm = make_llm(model=str(path), expert_memory_gb=gb, **BASE)
    cache = llm.engine.runner.expert_cache
    assert cache is not None and cache.mapped and cache.expert_bytes == slot
    assert cache.num_slots == layers * experts // 4
    assert greedy_tokens(llm, PROMPTS, 8) == want
    assert cache.stats.misses > 0
    cache.check()
    assert_experts_mapped(llm.engine.runner.model, path)


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


def test_loading_leaves_the_experts_in_the_file(tmp_path) -> None:
    """A model with ~110 MB of Q4_0 experts at 10% resident: the process's private memory
    (RssAnon; the file's pages are RssFile, reclaimable) grows by far less than the experts'
    bytes while the runner loads the weights, profiling forward included (measured: ~35 MB,
    against ~300 MB with every expert resident). The tokenizer's parsing comes before."""
    layers, experts = 4, 64
    path = tmp_path / "olmoe-big.gguf"
    total = write_olmoe(path, layers, experts, hidden=64, ffn=4096)
    assert total > 100 * 2**20
    # The slot size of this shape in the kernel's tiles: 5 bits a weight.
    slot = 3 * 64 * 4096 * 5 // 8
    gb = 0.1 * layers * experts * slot / 2**30
    config = EngineConfig(
        model=str(path), device="cpu", expert_memory_gb=gb, dtype="float32", block_size=4,
        kv_cache_memory_gb=0.002,
    )  # fmt: skip
    loaded = load_model(config)  # the GGUF's metadata and tokenizer fields
    before = _rss_kib("RssAnon")
    runner = make_runner(config, loaded)
    grown = (_rss_kib("RssAnon") - before) * 1024
    cache = runner.expert_cache
    assert cache is not None and cache.expert_bytes == slot
    assert cache.num_slots == int(0.1 * layers * experts)
    # What does take private memory: the pool (10%: 12 MiB), the float32 embedding (12 MiB),
    # the KV cache (2 MiB). Every expert held in RAM would add the experts' bytes and more.
    assert grown < 0.5 * total, (grown, total)
    assert_experts_mapped(runner.model, path)


@pytest.mark.parametrize("qtype", list(GGUF_FORMATS))
def test_tiles_written_in_place_equal_the_loader_packing(qtype: str) -> None:
    """gate / up parts at their row offsets, a partial last tile: the bytes of pack_tiles."""
    size, bits = GGUF_FORMATS[qtype]
    gen = torch.Generator().manual_seed(0)

    def part(rows: int) -> QuantizedTensor:
        b = torch.randint(0, 256, (rows, 3, size), dtype=torch.uint8, generator=gen)
        b[..., 1] &= 0x3B  # finite fp16 scales (and Q4_1 offsets below)
        b[..., 3] &= 0x3B
        return QuantizedTensor(qtype, b.reshape(rows, -1), (rows, 96))

    for rows in [(32, 32), (16, 40), (48,)]:
        parts = [part(r) for r in rows]
        want = pack_tiles(cat_rows([p.unpack() for p in parts]))
        for fill in (fill_tiles, fill_tiles_torch):  # the C++ loop where built, the torch ops
            got = torch.zeros_like(want)
            row0 = 0
            for p in parts:
                assert fits_tiles(got, p, row0, bits)
                fill(got, p, row0, bits)
                row0 += p.shape[0]
            assert torch.equal(got, want), fill
    assert not fits_tiles(got, part(16), 8, bits)  # not on a tile boundary
    assert not fits_tiles(got, part(16), 0, 12 - bits)  # other bits


def test_safetensors_experts_are_views_of_the_files(tmp_path, make_llm) -> None:
    """An HF folder: `safe_open` maps the shards, and the experts stay views of them."""
    pytest.importorskip("transformers")
    from utils_tiny import make_tiny_hf_folder

    folder = make_tiny_hf_folder(tmp_path, "MixtralForCausalLM", sharded=True)
    llm = make_llm(model=str(folder), expert_memory_gb=1e-4, **BASE)
    cache = llm.engine.runner.expert_cache
    assert cache is not None and cache.mapped
    greedy_tokens(llm, PROMPTS[:1], 2)  # loads some experts into slots
    cache.check()
    assert_experts_mapped(llm.engine.runner.model, *sorted(folder.glob("*.safetensors")))


def test_experts_converted_at_load_are_processed_once(tmp_path, make_llm) -> None:
    """int4 at load: the experts are in RAM anyway (round-to-nearest blocks, no view of the
    file), so the cache processes each once and copies its tiles on a miss; same tokens."""
    pytest.importorskip("transformers")
    from utils_tiny import make_tiny_hf_folder

    folder = make_tiny_hf_folder(tmp_path, "MixtralForCausalLM")
    want = greedy_tokens(make_llm(model=str(folder), quantization="int4", **BASE), PROMPTS, 6)
    llm = make_llm(model=str(folder), quantization="int4", expert_memory_gb=1e-4, **BASE)
    cache = llm.engine.runner.expert_cache
    assert cache is not None and not cache.mapped and cache.num_slots >= 1
    assert greedy_tokens(llm, PROMPTS, 6) == want
    assert cache.stats.misses > 0
    cache.check()

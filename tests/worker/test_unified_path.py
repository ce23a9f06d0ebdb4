"""The GPU path's plumbing, checked on the CPU: the unified attention metadata (one ragged
kernel over the whole batch; here its PyTorch oracle stands in for the Triton kernel), the CUDA
graph runner's padded static buffers (run eagerly), the reserved null block, and the device
options' errors. The GPU itself is checked by the `gpu`-marked tests at the end."""

from __future__ import annotations

import pytest
import torch

from tokenmill import SamplingParams
from tokenmill.config import EngineConfig
from tokenmill.errors import ModelLoadError
from tokenmill.layers.attention import PagedAttention
from tokenmill.worker.cuda_graph import graph_buckets
from tokenmill.worker.model_runner import GpuOptions
from utils_tiny import make_tiny_hf_folder

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return str(make_tiny_hf_folder(tmp_path_factory.mktemp("unified"), vocab_size=512))


def _prompts() -> list[list[int]]:
    return [[(7 * i + 3 * j) % 500 + 1 for j in range(n)] for i, n in enumerate((3, 17, 40, 9))]


def _greedy(llm, prompts, max_tokens: int = 12) -> list[list[int]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _engine(make_llm, model: str, **kw):
    return make_llm(model=model, dtype="float32", device="cpu", num_kv_blocks=64, **kw)


@pytest.fixture(scope="module")
def reference(tiny_model) -> list[list[int]]:
    from tokenmill import LLM

    llm = LLM(model=tiny_model, dtype="float32", device="cpu", attention_backend="sdpa")
    return _greedy(llm, _prompts())


def test_unified_metadata_path_matches_reference_backend(make_llm, tiny_model, reference):
    # chunked prefill (8-token budget) mixes decode rows and prompt chunks in one step
    llm = _engine(make_llm, tiny_model, attention_backend="unified-ref", max_num_batched_tokens=8)
    assert llm.engine.runner.attn_backend.name == "unified-ref"
    assert _greedy(llm, _prompts()) == reference


def test_null_block_is_reserved(make_llm, tiny_model):
    llm = _engine(make_llm, tiny_model, attention_backend="unified-ref")
    runner = llm.engine.runner
    assert (
        runner.null_blocks
        == [runner.num_blocks]
        == [llm.engine.scheduler.kv_cache_manager.num_blocks]
        == [64]
    )
    (cache,) = runner.kv_caches
    assert cache.shape[2] == 65  # the scheduler's blocks plus the null block


def test_graph_buckets():
    assert graph_buckets(1) == [1]
    assert graph_buckets(8) == [1, 2, 4, 8]
    assert graph_buckets(40) == [1, 2, 4, 8, 16, 32, 40]
    assert graph_buckets(128)[-3:] == [96, 112, 128]


def _install_padded_decode(runner, max_batch: int) -> list[int]:
    """Gives the runner the CUDA-graph runner's padded buffers, run eagerly (capture=False);
    returns the list that records each decode batch's row count."""
    graphs = runner.decode_graphs(max_batch, capture=False)
    assert graphs is not None
    rows: list[int] = []
    run = graphs.run
    graphs.run = lambda batch: rows.append(batch.input_ids.shape[0]) or run(batch)
    runner.graphs = graphs
    return rows


def test_padded_decode_buffers_give_the_same_tokens(make_llm, tiny_model, reference):
    """The CUDA-graph runner's static buffers and padding rows, run eagerly on the CPU: decode
    batches of 4, 3, 2, 1 rows pad to buckets 4, 4, 2, 1 and the tokens do not change."""
    llm = _engine(make_llm, tiny_model, attention_backend="unified-ref")
    runner = llm.engine.runner
    used = _install_padded_decode(runner, max_batch=4)
    prompts = _prompts()
    # staggered lengths: the batch shrinks from 4 decode rows to 1 as requests finish
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (4, 12, 8, 6)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    got = [list(o.outputs[0].token_ids) for o in outs]
    assert got == [ref[: len(g)] for ref, g in zip(reference, got, strict=True)]
    assert {4, 3, 2, 1} <= set(used)
    # padding rows wrote only into the null block: its KV changed, the pool's blocks are intact
    (cache,), (null_block,) = runner.kv_caches, runner.null_blocks
    assert cache[:, :, null_block].abs().sum() > 0


def test_padded_decode_buffers_with_two_kv_groups(make_llm, tmp_path):
    """A model with global and windowed layers (Gemma 3) has two KV cache groups: the padded
    decode buffers hold static tables, slots and a null block per group; the tokens are those of
    the unpadded steps, and padding wrote only into each group's null block."""
    folder = make_tiny_hf_folder(
        tmp_path, "Gemma3ForCausalLM", vocab_size=512, sliding_window=8, head_dim=16,
        query_pre_attn_scalar=16, num_hidden_layers=3, sliding_window_pattern=3,
    )  # fmt: skip
    kw = dict(
        attention_backend="unified-ref",
        block_size=4,
        enable_prefix_caching=False,
        max_model_len=128,
    )
    # staggered lengths: the batch shrinks from 4 decode rows to 1 as requests finish
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (4, 16, 9, 6)]
    inputs = [{"prompt_token_ids": p} for p in _prompts()]

    def tokens(llm) -> list[list[int]]:
        outs = llm.generate(inputs, params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    expected = tokens(_engine(make_llm, str(folder), **kw))
    llm = _engine(make_llm, str(folder), **kw)
    runner = llm.engine.runner
    assert [g.sliding_window for g in runner.kv_groups] == [None, 8]
    used = _install_padded_decode(runner, max_batch=4)
    assert tokens(llm) == expected
    assert {4, 3, 2, 1} <= set(used)
    for cache, null_block in zip(runner.kv_caches, runner.null_blocks, strict=True):
        assert cache[:, :, null_block].abs().sum() > 0


@pytest.mark.parametrize("backend", ["unified-ref", "sdpa"])
def test_profiling_forward(make_llm, tiny_model, reference, backend):
    """The forward that sizes the GPU's KV cache, run on the CPU: a step longer than the
    context is split into max_model_len sequences over a throw-away cache; rebinding the real
    cache afterwards leaves the engine as it was."""
    llm = _engine(make_llm, tiny_model, attention_backend=backend)
    runner = llm.engine.runner
    layers = [m for m in runner.model.modules() if isinstance(m, PagedAttention)]
    assert runner.max_model_len < 700
    runner._profile_run(GpuOptions(max_num_seqs=4, max_num_batched_tokens=700))
    assert layers[0].k_cache.data_ptr() != runner.kv_caches[0][0, 0].data_ptr()
    runner._bind_cache(runner.kv_caches)
    assert _greedy(llm, _prompts()) == reference


def test_speculative_verify_rows_through_the_padded_decode_buffers(make_llm, tiny_model, reference):
    """Verified drafts are decode rows too: with n-gram drafts a step has more rows than
    requests, and still goes through the graph runner's padded buffers (or, past its largest
    bucket, the eager path) with the plain-decoding tokens."""
    llm = _engine(
        make_llm, tiny_model, attention_backend="unified-ref", speculative="ngram",
        speculative_draft_cost=0.0, prompt_lookup_min=1,
    )  # fmt: skip
    runner = llm.engine.runner
    rows = _install_padded_decode(runner, max_batch=8)
    assert _greedy(llm, _prompts()) == reference
    assert llm.engine.scheduler.spec_stats.num_drafted_tokens > 0
    assert any(n > 4 for n in rows)  # steps with drafts: more rows than the 4 requests


def test_device_options_are_checked():
    with pytest.raises(ValueError, match="device must be"):
        EngineConfig(device="tpu")
    with pytest.raises(ValueError, match="attention_backend"):
        EngineConfig(attention_backend="flash")
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        EngineConfig(gpu_memory_utilization=1.5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU's error")
def test_triton_backend_on_the_cpu_is_a_clear_error(tiny_model, monkeypatch):
    from tokenmill import LLM

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="runs on a CUDA device"):
        LLM(model=tiny_model, device="cpu", attention_backend="triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error(tiny_model):
    from tokenmill import LLM

    with pytest.raises(ModelLoadError, match="no CUDA GPU"):
        LLM(model=tiny_model, device="cuda")


# --- on a GPU ------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
def test_gpu_triton_eager_and_graphs_match_the_oracle(make_llm, tiny_model):
    kw = dict(model=tiny_model, device="cuda", dtype="float32", num_kv_blocks=256)
    oracle = _greedy(
        make_llm(attention_backend="unified-ref", enforce_eager=True, **kw), _prompts()
    )
    eager = _greedy(make_llm(attention_backend="triton", enforce_eager=True, **kw), _prompts())
    graphs_llm = make_llm(attention_backend="triton", **kw)
    assert graphs_llm.engine.runner.graphs is not None
    assert eager == oracle
    assert _greedy(graphs_llm, _prompts()) == eager


@pytest.mark.gpu
@needs_cuda
def test_gpu_kv_cache_sized_from_free_memory(make_llm, tiny_model):
    llm = make_llm(model=tiny_model, device="cuda", gpu_memory_utilization=0.5)
    free, total = torch.cuda.mem_get_info()
    runner = llm.engine.runner
    kv_bytes = sum(c.numel() * c.element_size() for c in runner.kv_caches)
    assert 0.2 * total < kv_bytes < 0.5 * total
    with pytest.raises(ValueError, match="gpu-memory-utilization"):
        make_llm(model=tiny_model, device="cuda", gpu_memory_utilization=0.001)

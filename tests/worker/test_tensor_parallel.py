"""Tensor parallelism: head and block splits, the broadcast queue, and TP=2 on gloo against
TP=1 (logits and greedy tokens), under mp and Ray, and a worker killed mid-request."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tp_utils import PROMPTS, assert_matches_tp1, greedy

from tokenmill import LLM, SamplingParams, StructuredOutputsParams
from tokenmill.config import EngineConfig
from tokenmill.core.sched_types import ScheduledSeq
from tokenmill.engine import tp_executor
from tokenmill.engine.async_engine import AsyncLLMEngine
from tokenmill.engine.engine import LLMEngine
from tokenmill.engine.engine_loop import EngineDeadError
from tokenmill.engine.tp_executor import DistributedStartupError
from tokenmill.layers.linear import Linear
from tokenmill.layers.tensor_parallel import TensorParallelError, even_split, head_split
from tokenmill.quant.packing import quantize_rtn
from tokenmill.quant.shard import ShardError, take_cols
from tokenmill.worker import input_batch
from tokenmill.worker.shm_broadcast import ShmBroadcast
from utils_default import needs_default
from utils_tiny import make_tiny_hf_folder


def test_head_split_uneven_and_replicated() -> None:
    # SmolLM2: 9 q heads, 3 KV heads over 2 ranks: 2 KV heads (6 q) and 1 KV head (3 q)
    assert [(s.q0, s.q1, s.kv0, s.kv1) for s in head_split(9, 3, 2)] == [
        (0, 6, 0, 2),
        (6, 9, 2, 3),
    ]
    # 4 ranks over 2 KV heads: each KV head on two ranks, which split its 2 q heads
    assert [(s.q0, s.q1, s.kv0, s.kv1) for s in head_split(4, 2, 4)] == [
        (0, 1, 0, 1),
        (1, 2, 0, 1),
        (2, 3, 1, 2),
        (3, 4, 1, 2),
    ]
    with pytest.raises(TensorParallelError, match="multiple of it"):
        head_split(9, 3, 4)
    assert even_split(1536, 2, 32) == [(0, 768), (768, 1536)]
    assert even_split(96, 2, 32) == [(0, 64), (64, 96)]


def test_row_parallel_split_keeps_whole_blocks() -> None:
    layer = Linear(64, 16, quant="blocks")
    layer.load_quantized(quantize_rtn(torch.randn(16, 64), 4))
    with pytest.raises(ShardError, match="multiples of 32"):
        take_cols(layer, 0, 48, keep_bias=True)


def test_broadcast_queue_wraps_around() -> None:
    writer = ShmBroadcast(1, 1 << 12, num_slots=2)
    reader = ShmBroadcast(1, 1 << 12, num_slots=2, name=writer.name, reader=0)
    try:
        for i in range(5):  # more messages than slots: each waits for the reader's ack
            writer.publish({"step": i}, timeout_s=1.0)
            assert reader.receive(lambda: True) == {"step": i}
        assert writer.idle_for(0) == 0.0  # ran its last message, not waiting yet
        writer.publish(1, timeout_s=1.0)
        writer.publish(2, timeout_s=1.0)
        with pytest.raises(RuntimeError, match="has not read"):
            writer.publish(3, timeout_s=0.05)  # the ring is full: the reader is stuck
        writer.stop()
        assert reader.receive(lambda: True) == 1
    finally:
        reader.close()
        writer.close(unlink=True)


@pytest.fixture(scope="module")
def tiny_gqa(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 6 q heads over 3 KV heads: at TP=2 the ranks get 2 and 1 KV heads (an uneven split)
    return make_tiny_hf_folder(
        tmp_path_factory.mktemp("tiny_gqa"),
        hidden_size=96,
        num_attention_heads=6,
        num_key_value_heads=3,
        intermediate_size=192,
    )


@pytest.mark.parametrize("quantization", [None, "int4"])
def test_tp2_matches_tp1_tiny_gqa(tiny_gqa: Path, quantization: str | None) -> None:
    """Dense: logits within 1e-4 (the row-parallel sums add in another order). int4 blocks:
    the row-parallel layers gather instead (see GatherParallel): the same logits exactly."""
    kw = dict(dtype="float32", quantization=quantization)
    one = LLM(str(tiny_gqa), **kw)
    two = LLM(str(tiny_gqa), tensor_parallel_size=2, **kw)
    try:
        # prompt logprobs: the workers run the LM head on the prompt rows as well
        steps = assert_matches_tp1(one, two, prompt_logprobs=2)
        assert steps > 8  # 8 decode steps plus the prompt rows
    finally:
        two.engine.shutdown()


def test_tp2_forced_runs_match_tp1(tiny_gqa: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A constrained request's forced run is laid out as decode rows on rank 0; the workers
    learn that from the step message (they have no request), so every rank orders the rows
    alike and the tokens are TP=1's."""
    runs = []  # rank 0's forced runs (several tokens as decode rows)
    decode_rows = input_batch._decode_rows

    def counted(seq: ScheduledSeq) -> bool:
        rows = decode_rows(seq)
        runs.extend([seq.num_tokens] if rows and seq.num_tokens > 1 else [])
        return rows

    monkeypatch.setattr(input_batch, "_decode_rows", counted)
    spec = StructuredOutputsParams(json={"type": "object", "properties": {"name": {"enum": [
        "Washington state", "Wellington city"]}}, "required": ["name"]})  # fmt: skip
    params = SamplingParams(max_tokens=24, temperature=0, structured_outputs=spec)
    one = LLM(str(tiny_gqa), dtype="float32", max_forced_tokens=16)
    two = LLM(str(tiny_gqa), dtype="float32", max_forced_tokens=16, tensor_parallel_size=2)
    try:
        expected = [o.outputs[0].token_ids for o in one.generate(PROMPTS, params)]
        assert [o.outputs[0].token_ids for o in two.generate(PROMPTS, params)] == expected
        assert runs  # forced runs really ran
    finally:
        two.engine.shutdown()


def test_tp2_ray_matches_mp(tiny_gqa: Path) -> None:
    ray = pytest.importorskip("ray")
    mp_llm = LLM(str(tiny_gqa), dtype="float32", tensor_parallel_size=2)
    try:
        expected = greedy(mp_llm)
    finally:
        mp_llm.engine.shutdown()
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        ray_llm = LLM(
            str(tiny_gqa),
            dtype="float32",
            tensor_parallel_size=2,
            distributed_executor_backend="ray",
        )
        try:
            assert greedy(ray_llm) == expected
        finally:
            ray_llm.engine.shutdown()
    finally:
        ray.shutdown()


def _wait_for(cond: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_hung_or_killed_worker_fails_health_and_requests(
    tiny_gqa: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = LLMEngine(EngineConfig(model=str(tiny_gqa), dtype="float32", tensor_parallel_size=2))
    assert engine.executor is not None
    worker = engine.executor.workers[0]
    # an idle worker that stops answering (SIGSTOP) turns health bad, and good again after
    monkeypatch.setattr(tp_executor, "IDLE_HANG_S", 1.0)
    assert _wait_for(lambda: engine.executor.channel.idle_for(0) > 0, 10)
    os.kill(worker.pid, signal.SIGSTOP)
    try:
        assert _wait_for(lambda: "not responded" in (engine.health_error() or ""), 10)
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    assert _wait_for(lambda: engine.health_error() is None, 10)

    async def run() -> float:
        aengine = AsyncLLMEngine(engine)
        await aengine.start()
        assert aengine.is_healthy
        params = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
        stream = aengine.generate(PROMPTS[0], params)
        await stream.__anext__()  # the request runs
        os.kill(worker.pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        took = time.monotonic() - t0
        assert not aengine.is_healthy
        await aengine.shutdown()
        return took

    try:
        assert asyncio.run(asyncio.wait_for(run(), 60)) < 30
        assert "rank 1" in (engine.health_error() or "")
    finally:
        engine.shutdown()


def test_start_up_errors_are_clear(tiny_gqa: Path) -> None:
    with pytest.raises(TensorParallelError, match="multiple of it"):
        LLM(str(tiny_gqa), dtype="float32", tensor_parallel_size=4)  # 3 KV heads over 4 ranks
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(DistributedStartupError, match=f"distributed_port {port}"):
            LLM(str(tiny_gqa), dtype="float32", tensor_parallel_size=2, distributed_port=port)


@pytest.mark.slow
@needs_default
def test_tp2_default_model_greedy_tokens() -> None:
    """The Q4_1 GGUF split by whole blocks: TP=1's logits exactly, so the same tokens."""
    one = LLM(dtype="float32")
    two = LLM(dtype="float32", tensor_parallel_size=2)
    try:
        assert_matches_tp1(one, two, 16)
    finally:
        two.engine.shutdown()


@pytest.mark.slow
def test_tp4_replicates_kv_heads(tmp_path: Path) -> None:
    """4 ranks over 2 KV heads: each KV head on two ranks, which split its q heads."""
    folder = make_tiny_hf_folder(tmp_path)  # 4 q heads, 2 KV heads
    one = LLM(str(folder), dtype="float32")
    four = LLM(str(folder), dtype="float32", tensor_parallel_size=4)
    try:
        assert_matches_tp1(one, four)
    finally:
        four.engine.shutdown()

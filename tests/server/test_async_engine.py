"""The async engine on its own: streams, early exit aborts, bad input, the pending limit and
shutdown with requests in flight; the engine is left idle every time."""

from __future__ import annotations

import asyncio

import pytest
from server_utils import check_engine_idle

from tokenmill.engine.async_engine import AsyncLLMEngine, EngineDeadError, QueueFullError
from tokenmill.engine.engine import LLMEngine
from tokenmill.errors import CapacityError, InvalidRequestError
from tokenmill.sampling_params import SamplingParams

pytestmark = pytest.mark.slow  # a server over the default model

PROMPT = "The capital of France is"


def run(engine: LLMEngine, body, **kw) -> object:
    async def main():
        aengine = AsyncLLMEngine(engine, **kw)
        await aengine.start()
        try:
            return await body(aengine)
        finally:
            await aengine.shutdown()

    result = asyncio.run(main())
    check_engine_idle(engine)
    return result


def test_stream_is_cumulative_and_matches_sync_engine(llm_engine: LLMEngine) -> None:
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)

    async def body(aengine: AsyncLLMEngine):
        outs = [out async for out in aengine.generate(PROMPT, params)]
        return outs

    outs = run(llm_engine, body)
    assert outs[-1].finished and not any(o.finished for o in outs[:-1])
    lens = [len(o.outputs[0].token_ids) for o in outs]
    assert lens == sorted(lens) and lens[-1] == 6
    for a, b in zip(outs, outs[1:], strict=False):  # snapshots: earlier ones never change
        assert b.outputs[0].token_ids[: len(a.outputs[0].token_ids)] == a.outputs[0].token_ids
    llm_engine.add_request(PROMPT, params, "sync")
    final = None
    while llm_engine.has_unfinished_requests():
        for o in llm_engine.step():
            final = o
    assert final.outputs[0].token_ids == outs[-1].outputs[0].token_ids
    assert final.outputs[0].text == outs[-1].outputs[0].text


def test_breaking_out_aborts(llm_engine: LLMEngine) -> None:
    params = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)

    async def body(aengine: AsyncLLMEngine):
        gen = aengine.generate(PROMPT, params)
        async for out in gen:
            if len(out.outputs[0].token_ids) >= 2:
                break
        await gen.aclose()
        assert aengine.num_pending_seqs == 0
        for _ in range(200):  # the engine thread frees the blocks at its next iteration
            if aengine.stats.num_used_blocks == 0 and aengine.stats.num_running == 0:
                return True
            await asyncio.sleep(0.02)
        return False

    assert run(llm_engine, body)


def test_bad_input_and_pending_limit(llm_engine: LLMEngine) -> None:
    async def body(aengine: AsyncLLMEngine):
        with pytest.raises(InvalidRequestError) as e:
            await aengine.add_request([10**9], SamplingParams(max_tokens=2))
        assert e.value.param == "prompt"
        long = SamplingParams(max_tokens=500, ignore_eos=True)
        s1 = await aengine.add_request(PROMPT, long)
        with pytest.raises(QueueFullError):
            await aengine.add_request(PROMPT, SamplingParams(n=2, max_tokens=2))
        s2 = await aengine.add_request(PROMPT, SamplingParams(max_tokens=2))
        out = await s2.final()
        assert len(out.outputs[0].token_ids) <= 2
        s1.abort()
        return await aengine.call(lambda eng: eng.has_unfinished_requests())

    assert run(llm_engine, body, max_pending_seqs=2) is False


def test_shutdown_with_requests_in_flight(llm_engine: LLMEngine) -> None:
    async def body(aengine: AsyncLLMEngine):
        stream = await aengine.add_request(PROMPT, SamplingParams(max_tokens=500, ignore_eos=True))
        await stream.__anext__()
        await aengine.shutdown()
        rest = [out async for out in stream]  # ends: aborted by the shutdown
        assert rest and rest[-1].finished
        assert rest[-1].outputs[0].finish_reason == "abort"
        with pytest.raises(EngineDeadError):
            await aengine.add_request(PROMPT, SamplingParams(max_tokens=2))
        return True

    assert run(llm_engine, body)


def test_add_requests_is_all_or_nothing(llm_engine: LLMEngine) -> None:
    async def body(aengine: AsyncLLMEngine):
        params = SamplingParams(max_tokens=2, n=3)
        for prompts in ([PROMPT] * 2, [[1, 2]] * 2):  # 6 sequences, more than the engine holds
            with pytest.raises(CapacityError) as e:
                await aengine.add_requests(prompts, params, ["a", "b"])
            assert isinstance(e.value, InvalidRequestError) and "4" in str(e.value)
        # the second prompt is bad: the first one, added just before it, is withdrawn
        with pytest.raises(InvalidRequestError):
            await aengine.add_requests([PROMPT, [10**9]], SamplingParams(max_tokens=2), ["a", "b"])
        assert aengine.num_pending_seqs == 0
        left = await aengine.call(
            lambda eng: (eng.has_unfinished_requests(), dict(eng.outputs.states))
        )
        assert left == (False, {})
        streams = await aengine.add_requests(
            [PROMPT, [1, 2]], SamplingParams(max_tokens=2, n=2), ["a", "b"]
        )
        outs = [await s.final() for s in streams]
        return [len(o.outputs) for o in outs]

    assert run(llm_engine, body, max_pending_seqs=4) == [2, 2]

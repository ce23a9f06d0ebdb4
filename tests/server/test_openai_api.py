"""The server through the official `openai` client, sync and async: completions and chat,
streaming and not, n, logprobs, echo, stops, seeds and exact usage."""

from __future__ import annotations

import asyncio
import math
import uuid

import httpx
import openai
import pytest
from server_utils import Server

pytestmark = pytest.mark.slow  # a server over the default model

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Name three colors."}]
MAX = 8


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", timeout=120, max_retries=0)


def num_tokens(server: Server, **body) -> int:
    r = httpx.post(f"{server.url}/tokenize", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["count"]


# -- plain endpoints -------------------------------------------------------------------------


def test_models_health_version(server: Server, client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [server.model]
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/version").json()["version"]


def test_tokenize_detokenize(server: Server) -> None:
    tok = server.engine.tokenizer
    r = httpx.post(f"{server.url}/tokenize", json={"prompt": PROMPT}).json()
    assert r["tokens"] == tok.encode(PROMPT)
    assert r["count"] == len(r["tokens"])
    assert r["max_model_len"] == server.engine.max_model_len
    back = httpx.post(f"{server.url}/detokenize", json={"tokens": r["tokens"]}).json()
    assert back["prompt"] == PROMPT
    chat = httpx.post(f"{server.url}/tokenize", json={"messages": CHAT}).json()
    text = tok.apply_chat_template(CHAT, add_generation_prompt=True)
    assert chat["tokens"] == tok.encode(text, add_special_tokens=False)


# -- completions -----------------------------------------------------------------------------


def test_completion_greedy_matches_engine(server: Server, client: openai.OpenAI) -> None:
    r = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=MAX, temperature=0)
    assert r.object == "text_completion"
    assert r.model == server.model
    (choice,) = r.choices
    assert choice.index == 0
    assert choice.text.startswith(" Paris")
    assert choice.finish_reason == "length"
    assert r.usage.prompt_tokens == num_tokens(server, prompt=PROMPT)
    assert r.usage.completion_tokens == MAX
    assert r.usage.total_tokens == r.usage.prompt_tokens + MAX


def test_completion_stream_equals_non_stream(server: Server, client: openai.OpenAI) -> None:
    kw = dict(model=server.model, prompt=PROMPT, max_tokens=12, temperature=0)
    full = client.completions.create(**kw)
    chunks = list(
        client.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[-1].usage is not None and not chunks[-1].choices
    assert chunks[-1].usage.model_dump() == full.usage.model_dump()
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == [full.choices[0].finish_reason]
    assert len({c.id for c in chunks}) == 1


def test_completion_prompt_forms(server: Server, client: openai.OpenAI) -> None:
    ids = server.engine.tokenizer.encode(PROMPT)
    kw = dict(model=server.model, max_tokens=4, temperature=0)
    by_text = client.completions.create(prompt=PROMPT, **kw).choices[0].text
    assert client.completions.create(prompt=ids, **kw).choices[0].text == by_text
    r = client.completions.create(prompt=[PROMPT, "Hello, my name is"], **kw)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text == by_text
    r2 = client.completions.create(prompt=[ids, ids], **kw)
    assert [c.text for c in r2.choices] == [by_text, by_text]
    assert r2.usage.prompt_tokens == 2 * len(ids)
    assert r2.usage.completion_tokens == 8


def test_completion_n2_seeded(server: Server, client: openai.OpenAI) -> None:
    kw = dict(model=server.model, prompt=PROMPT, max_tokens=MAX, temperature=1.0, n=2, seed=7)
    a = client.completions.create(**kw, logprobs=0)
    assert [c.index for c in a.choices] == [0, 1]
    assert a.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in a.choices)
    b = client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seed: reproducible
    assert a.choices[0].text != a.choices[1].text  # samples differ (seed + i)
    streamed = list(client.completions.create(**kw, stream=True))
    texts = ["", ""]
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == [c.text for c in a.choices]


def test_seed_reproducible_and_varies(server: Server, client: openai.OpenAI) -> None:
    kw = dict(model=server.model, prompt="Once upon a time", max_tokens=MAX, temperature=1.0)
    first = [client.completions.create(**kw, seed=s).choices[0].text for s in (1, 2, 3)]
    again = [client.completions.create(**kw, seed=s).choices[0].text for s in (1, 2, 3)]
    assert first == again
    assert len(set(first)) > 1


def test_completion_logprobs(server: Server, client: openai.OpenAI) -> None:
    r = client.completions.create(
        model=server.model, prompt=PROMPT, max_tokens=MAX, temperature=0, logprobs=3
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == MAX
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(MAX)]
    for tok, val, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert val <= 0
        assert 3 <= len(top) <= 4
        assert max(top.values()) == pytest.approx(val)  # greedy picks the most likely token
        assert top[tok] == pytest.approx(val)
    assert sum(math.exp(v) for v in lp.top_logprobs[0].values()) <= 1.0 + 1e-5


def test_completion_echo(server: Server, client: openai.OpenAI) -> None:
    kw = dict(model=server.model, prompt=PROMPT, max_tokens=4, temperature=0)
    plain = client.completions.create(**kw).choices[0].text
    r = client.completions.create(**kw, echo=True)
    assert r.choices[0].text == PROMPT + plain
    r = client.completions.create(**kw, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    num_prompt = r.usage.prompt_tokens
    assert len(lp.tokens) == num_prompt + 4
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    assert "".join(lp.tokens) == PROMPT + plain
    streamed = client.completions.create(**kw, echo=True, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == PROMPT + plain


def test_completion_stop_string(server: Server, client: openai.OpenAI) -> None:
    kw = dict(model=server.model, prompt=PROMPT, max_tokens=12, temperature=0)
    full = client.completions.create(**kw).choices[0].text  # ' Paris.\n\nThe answer is: ...'
    assert "." in full
    r = client.completions.create(**kw, stop=["."])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[: full.index(".")]
    s = client.completions.create(**kw, stop=".", stream=True)
    assert "".join(c.choices[0].text for c in s) == r.choices[0].text


def test_extras_via_extra_body(server: Server, client: openai.OpenAI) -> None:
    r = client.completions.create(
        model=server.model,
        prompt=PROMPT,
        max_tokens=MAX,
        temperature=0.8,
        seed=3,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        logit_bias={"12": -100},
        user="tester",
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.2, "ignore_eos": True},
    )
    assert r.usage.completion_tokens == MAX  # ignore_eos: runs to max_tokens
    assert 12 not in server.engine.tokenizer.encode(r.choices[0].text)


# -- chat ------------------------------------------------------------------------------------


def test_chat_greedy_stream_equals_non_stream(server: Server, client: openai.OpenAI) -> None:
    kw = dict(model=server.model, messages=CHAT, max_tokens=12, temperature=0)
    full = client.chat.completions.create(**kw)
    assert full.object == "chat.completion"
    msg = full.choices[0].message
    assert msg.role == "assistant" and msg.content
    assert full.usage.prompt_tokens == num_tokens(server, messages=CHAT)
    assert full.usage.completion_tokens <= 12
    chunks = list(
        client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == msg.content
    details = {"prompt_tokens_details"}
    assert chunks[-1].usage.model_dump(exclude=details) == full.usage.model_dump(exclude=details)
    # the streamed request repeats the first one: its prompt's full blocks come from the cache
    block = server.engine.config.block_size
    cached = (full.usage.prompt_tokens - 1) // block * block
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == cached
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == [full.choices[0].finish_reason]


def test_chat_parts_system_assistant_and_max_completion_tokens(
    server: Server, client: openai.OpenAI
) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Name a color."},
    ]
    r = client.chat.completions.create(
        model=server.model, messages=messages, max_completion_tokens=3, temperature=0
    )
    assert r.usage.completion_tokens <= 3
    assert r.usage.prompt_tokens == num_tokens(server, messages=messages)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_chat_logprobs_and_n(server: Server, client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=server.model, messages=CHAT, max_tokens=6, temperature=0.7, seed=5, n=2,
        logprobs=True, top_logprobs=2,
    )  # fmt: skip
    assert [c.index for c in r.choices] == [0, 1]
    total = 0
    for c in r.choices:
        content = c.logprobs.content
        total += len(content)
        assert "".join(e.token for e in content).startswith(c.message.content)
        for e in content:
            assert len(e.top_logprobs) == 2
            assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
            assert bytes(e.bytes).decode("utf-8", "replace") == e.token
    assert r.usage.completion_tokens == total
    again = client.chat.completions.create(
        model=server.model, messages=CHAT, max_tokens=6, temperature=0.7, seed=5, n=2
    )
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]


def test_chat_stop(server: Server, client: openai.OpenAI) -> None:
    kw = dict(model=server.model, messages=CHAT, max_tokens=12, temperature=0)
    full = client.chat.completions.create(**kw).choices[0].message.content
    stop = full.strip()[2:4]
    r = client.chat.completions.create(**kw, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == full[: full.index(stop)]


# -- async client ----------------------------------------------------------------------------


def test_async_client(server: Server, client: openai.OpenAI) -> None:
    expected = (
        client.completions.create(model=server.model, prompt=PROMPT, max_tokens=MAX, temperature=0)
        .choices[0]
        .text
    )
    expected_chat = (
        client.chat.completions.create(
            model=server.model, messages=CHAT, max_tokens=MAX, temperature=0
        )
        .choices[0]
        .message.content
    )

    async def main() -> tuple[str, str, str]:
        aclient = openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        async with aclient:

            async def completion() -> str:
                r = await aclient.completions.create(
                    model=server.model, prompt=PROMPT, max_tokens=MAX, temperature=0
                )
                return r.choices[0].text

            async def chat_stream() -> str:
                s = await aclient.chat.completions.create(
                    model=server.model, messages=CHAT, max_tokens=MAX, temperature=0, stream=True
                )
                return "".join([c.choices[0].delta.content or "" async for c in s if c.choices])

            async def completion_stream() -> str:
                s = await aclient.completions.create(
                    model=server.model, prompt=PROMPT, max_tokens=MAX, temperature=0, stream=True
                )
                return "".join([c.choices[0].text async for c in s if c.choices])

            return await asyncio.gather(completion(), chat_stream(), completion_stream())

    a, b, c = asyncio.run(main())
    assert a == c == expected
    assert b == expected_chat


def test_metrics_after_requests(server: Server, client: openai.OpenAI) -> None:
    before = server.wait_idle()
    length = client.completions.create(
        model=server.model, prompt=PROMPT, max_tokens=3, extra_body={"ignore_eos": True}
    )
    stop = client.completions.create(
        model=server.model, prompt=PROMPT, max_tokens=8, temperature=0, stop=["."]
    )
    assert (length.choices[0].finish_reason, stop.choices[0].finish_reason) == ("length", "stop")
    m = server.wait_idle()
    for reason in ("length", "stop"):
        n = m("tokenmill_request_success_total", finished_reason=reason)
        assert n == before("tokenmill_request_success_total", finished_reason=reason) + 1
    num_out = length.usage.completion_tokens + stop.usage.completion_tokens
    num_in = length.usage.prompt_tokens + stop.usage.prompt_tokens
    assert (
        m("tokenmill_generation_tokens_total")
        == before("tokenmill_generation_tokens_total") + num_out
    )
    assert m("tokenmill_prompt_tokens_total") == before("tokenmill_prompt_tokens_total") + num_in
    assert m("tokenmill_request_success_total", finished_reason="length") > 0
    assert m("tokenmill_request_success_total", finished_reason="stop") > 0
    assert m("tokenmill_time_to_first_token_seconds_count") > 0
    assert m("tokenmill_e2e_request_latency_seconds_count") > 0
    assert m("tokenmill_time_per_output_token_seconds_count") > 0
    assert m("tokenmill_kv_cache_usage_perc") == 0
    assert m("tokenmill_num_preemptions_total") >= 0


# -- prefix cache ----------------------------------------------------------------------------


def test_prefix_cache_usage_and_metrics(server: Server, client: openai.OpenAI) -> None:
    """A repeated prompt reports its cached tokens in usage (streamed too), a cache_salt keeps
    tenants apart, and /metrics counts the queried and hit tokens the KV cache manager saw."""
    salt = f"test-{uuid.uuid4().hex}"  # nothing cached under it yet, whatever ran before
    prompt = "Tell me about the history of Lyon. " * 6
    num_prompt = num_tokens(server, prompt=prompt)
    block = server.engine.config.block_size
    assert num_prompt > 2 * block
    expected = (num_prompt - 1) // block * block  # full blocks; the last token is recomputed
    kw = dict(model=server.model, prompt=prompt, max_tokens=2, temperature=0)
    salted = {"cache_salt": salt}
    before = server.wait_idle()

    first = client.completions.create(**kw, extra_body=salted)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    second = client.completions.create(**kw, extra_body=salted)
    assert second.usage.prompt_tokens_details.cached_tokens == expected
    assert second.choices[0].text == first.choices[0].text
    chunks = list(
        client.completions.create(
            **kw, extra_body=salted, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == expected
    other = client.completions.create(**kw, extra_body={"cache_salt": salt + "-other"})
    assert other.usage.prompt_tokens_details.cached_tokens == 0

    messages = [{"role": "user", "content": prompt}]
    chat_kw = dict(model=server.model, messages=messages, max_tokens=2, temperature=0)
    client.chat.completions.create(**chat_kw, extra_body=salted)
    chat = client.chat.completions.create(**chat_kw, extra_body=salted)
    num_chat = chat.usage.prompt_tokens
    expected_chat = (num_chat - 1) // block * block
    assert chat.usage.prompt_tokens_details.cached_tokens == expected_chat
    chat_chunks = list(
        client.chat.completions.create(
            **chat_kw, extra_body=salted, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chat_chunks[-1].usage.model_dump() == chat.usage.model_dump()

    m = server.wait_idle()
    queries = m("tokenmill_prefix_cache_queries_total") - before(
        "tokenmill_prefix_cache_queries_total"
    )
    hits = m("tokenmill_prefix_cache_hits_total") - before("tokenmill_prefix_cache_hits_total")
    assert queries == 4 * num_prompt + 3 * num_chat
    assert hits == 2 * expected + 2 * expected_chat
    total_hits = m("tokenmill_prefix_cache_hits_total")
    total_queries = m("tokenmill_prefix_cache_queries_total")
    assert m("tokenmill_prefix_cache_hit_rate") == pytest.approx(total_hits / total_queries)

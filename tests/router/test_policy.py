"""Routing decisions without HTTP: request info, policies, tickets, and the router's bookkeeping."""

from __future__ import annotations

import pytest

from tokenmill.cli import build_parser
from tokenmill.cli_flags import dataclass_flags
from tokenmill.router.policy import CacheAwarePolicy, make_policy
from tokenmill.router.radix import ApproxRadixTree
from tokenmill.router.replicas import split_cores, split_threads
from tokenmill.router.request_info import route_info
from tokenmill.router.routing import Router
from tokenmill.router.workers import Ticket, WorkerPool


def make_router(policy: str = "cache_aware", n: int = 2, **kw: float) -> Router:
    pool = WorkerPool([f"http://w{i}" for i in range(n)])
    p = make_policy(
        policy,
        kw.get("cache_threshold", 0.5),
        int(kw.get("balance_abs_tokens", 100)),
        kw.get("balance_rel", 1.5),
        int(kw.get("balance_abs_requests", 16)),
    )
    return Router(pool, p, ApproxRadixTree())


def test_route_info_reads_completions_and_chat() -> None:
    info = route_info("/v1/completions", {"prompt": "x" * 40, "max_tokens": 7, "n": 2})
    assert info.text == "x" * 40 and info.prompt_tokens == 10 and info.max_new_tokens == 14
    assert not info.stream
    ids = route_info("/v1/completions", {"prompt": [1, 2, 3], "stream": True})
    assert ids.prompt_tokens == 3 and ids.chars_per_token == 1.0 and ids.stream
    assert ids.max_new_tokens == 256  # the default prediction
    batch = route_info("/v1/completions", {"prompt": [[5, 6], [7]]})
    assert batch.text == route_info("/v1/completions", {"prompt": [5, 6]}).text
    chat = route_info(
        "/v1/chat/completions",
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi"}]},
            ],
            "max_completion_tokens": 3,
        },
    )
    assert chat.text == "<system>be brief\n<user>hi" and chat.max_new_tokens == 3
    # a body the worker will refuse still routes somewhere
    assert route_info("/v1/completions", {}).text == ""


def test_ticket_gives_back_its_work() -> None:
    w = WorkerPool(["http://a"]).workers[0]
    t = Ticket(w, prompt_work=100, output_work=10)
    assert (w.outstanding, w.work) == (1, 110)
    t.first_byte()
    assert w.work == 10
    t.tokens(4)
    assert w.work == 6
    t.tokens(100)  # never below what it added
    assert w.work == 0
    t.finish()
    t.finish()
    assert (w.outstanding, w.work) == (0, 0)


def test_cache_aware_follows_the_prefix_and_spreads_new_ones() -> None:
    r = make_router(balance_abs_tokens=10_000)
    system = [f"system prompt {i} " * 50 for i in range(4)]
    owners: dict[int, set[str]] = {i: set() for i in range(4)}
    for q in range(8):
        for i, s in enumerate(system):
            d = r.route(route_info("/v1/completions", {"prompt": s + f"question {q}"}), set())
            assert d is not None
            owners[i].add(d.worker.url)
            d.ticket.finish()
    assert all(len(o) == 1 for o in owners.values()), owners
    assert len({next(iter(o)) for o in owners.values()}) == 2  # the prompts were spread
    assert r.decisions["prefix"] == 4 * 7 and r.decisions["no_prefix"] == 4


def test_overloaded_owner_falls_back_to_least_loaded() -> None:
    r = make_router(balance_abs_tokens=1000, balance_rel=1.5)
    text = "shared " * 100  # + 1 character: 175 predicted tokens
    first = r.route(route_info("/v1/completions", {"prompt": text + "a"}), set())
    assert first is not None  # still outstanding: its work (175 + 256) stays on the owner
    owner = first.worker
    busy = r.route(route_info("/v1/completions", {"prompt": text + "b", "max_tokens": 1000}), set())
    assert busy is not None and busy.worker is owner and busy.reason == "prefix"
    assert owner.work == 175 + 256 + 1 + 1000  # the second prompt was cached but a token
    nxt = r.route(route_info("/v1/completions", {"prompt": text + "c"}), set())
    assert nxt is not None and nxt.worker is not owner and nxt.reason == "overloaded"
    # the new worker now holds the prefix too
    assert r.tree.match(text).per_tenant.keys() == {w.url for w in r.pool.workers}


def test_an_owner_with_too_many_requests_is_overloaded_too() -> None:
    r = make_router(balance_abs_tokens=10**9, balance_abs_requests=2)
    text = "shared " * 100
    held = []
    for i in range(3):  # 3 - 0 > 2 outstanding: the owner is overloaded after these
        d = r.route(
            route_info("/v1/completions", {"prompt": text + str(i), "max_tokens": 1}), set()
        )
        assert d is not None and (i == 0 or d.reason == "prefix")
        held.append(d)
    spill = r.route(route_info("/v1/completions", {"prompt": text + "x", "max_tokens": 1}), set())
    assert spill is not None and spill.reason == "overloaded"
    assert spill.worker is not held[0].worker
    # both hold the prefix now: the less busy owner takes the next one, as a prefix hit
    nxt = r.route(route_info("/v1/completions", {"prompt": text + "y", "max_tokens": 1}), set())
    assert nxt is not None and nxt.reason == "prefix" and nxt.worker is spill.worker


def test_least_load_balances_predicted_work_not_request_counts() -> None:
    r = make_router("least_load")
    big = r.route(route_info("/v1/completions", {"prompt": "p", "max_tokens": 1000}), set())
    assert big is not None
    # three small requests all go to the other worker: their work together is below the big one
    small = [r.route(route_info("/v1/completions", {"prompt": "q", "max_tokens": 10}), set())
             for _ in range(3)]  # fmt: skip
    assert all(d is not None and d.worker is not big.worker for d in small)


def test_round_robin_and_exclusions() -> None:
    r = make_router("round_robin", n=3)
    info = route_info("/v1/completions", {"prompt": "same"})
    picks = []
    for _ in range(6):
        d = r.route(info, set())
        assert d is not None
        picks.append(d.worker.url)
    assert picks == ["http://w0", "http://w1", "http://w2"] * 2
    assert r.route(info, {"http://w0", "http://w1", "http://w2"}) is None
    r.mark_unhealthy(r.pool.workers[0], "test")
    assert "http://w0" not in r.tree.tenants()
    d = r.route(info, {"http://w1"})
    assert d is not None and d.worker.url == "http://w2"


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="policy"):
        make_policy("random")
    with pytest.raises(ValueError, match="balance_rel"):
        CacheAwarePolicy(balance_rel=0.5)
    with pytest.raises(ValueError, match="repeat"):
        WorkerPool(["http://a", "http://a/"])
    with pytest.raises(ValueError, match="http"):
        WorkerPool(["localhost:8000"])


def test_split_threads_and_cores() -> None:
    assert split_threads(16, 2) == [8, 8]
    assert split_threads(7, 3) == [3, 2, 2]
    assert split_threads(1, 2) == [1, 1]
    assert split_cores([3, 0, 1, 2, 5], [2, 2]) == [[0, 1], [2, 3]]
    assert split_cores([0, 1, 2], [2, 2]) is None  # too few cores: nobody is pinned


def test_replica_flags_give_the_same_configs() -> None:
    from tokenmill.cli_flags import engine_config_of
    from tokenmill.server.config import ServerConfig

    argv = ["serve", "--dtype", "float32", "--max-num-seqs", "4", "--no-prefix-caching",
            "--served-model-name", "a", "--served-model-name", "b", "--api-key", "k",
            "--data-parallel-size", "2", "--port", "9000"]  # fmt: skip
    args = build_parser().parse_args(argv)
    assert args.data_parallel_size == 2 and args.router_policy == "cache_aware"
    names = {"api_key", "served_model_name"}
    server = ServerConfig(**{k: v for k, v in vars(args).items() if k in names})
    engine = engine_config_of(args)
    again = build_parser().parse_args(
        ["serve", *dataclass_flags(engine), *dataclass_flags(server, skip=("port",))]
    )
    assert engine_config_of(again) == engine
    assert again.served_model_name == ["a", "b"] and again.api_key == "k"
    assert again.data_parallel_size == 1


def test_router_options_under_serve() -> None:
    from tokenmill.router.config import RouterConfig, router_options

    args = build_parser().parse_args(
        [
            "serve",
            "--router-option",
            "balance_abs_requests=8",
            "--router-option",
            "cache-threshold=0.3",
        ]
    )
    opts = router_options(args.router_option)
    assert opts == {"balance_abs_requests": 8, "cache_threshold": 0.3}
    assert RouterConfig(**opts).balance_abs_requests == 8
    for bad in ("nonsense=1", "balance_rel", "port=1", "health_failures=x"):
        with pytest.raises(ValueError, match="router option"):
            router_options([bad])


def test_router_flags_parse() -> None:
    args = build_parser().parse_args(
        ["router", "--worker", "http://a:1", "--worker", "http://b:2", "--policy", "round_robin"]
    )
    assert args.worker == ["http://a:1", "http://b:2"] and args.policy == "round_robin"

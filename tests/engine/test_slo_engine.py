"""SLO fields through the engine: validation, the response field, hopeless rejection, and
tokens that do not depend on the scheduling policy (tiny model; the default model is slow)."""

from __future__ import annotations

import pytest

from tokenmill import LLM, SamplingParams
from tokenmill.errors import InvalidRequestError
from tokenmill.slo_params import SloHopelessError, SloParams, WorkflowParams, targets_met
from utils_default import needs_default
from utils_tiny import make_tiny_hf_folder


@pytest.mark.parametrize(
    "kw",
    [
        {"slo": {"ttft_ms": 0}},
        {"slo": {"tpot_ms": -1.0}},
        {"slo": {"deadline_ms": float("nan")}},
        {"slo": {"deadline_ms": "100"}},
        {"slo": {"deadline_ms": 1e12}},
        {"slo": {"latency": 5}},
        {"slo": [1, 2]},
        {"workflow": {"stage": 1}},
        {"workflow": {"id": ""}},
        {"workflow": {"id": "w", "stage": -1}},
        {"workflow": {"id": "w", "remaining_stages": True}},
    ],
)
def test_bad_slo_and_workflow_fields(kw: dict) -> None:
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kw)
    assert e.value.param in ("slo", "workflow")


def test_slo_fields_accept_dicts_and_objects() -> None:
    p = SamplingParams(slo={"ttft_ms": 200, "deadline_ms": 1500.5}, workflow={"id": "w1"})
    assert p.slo == SloParams(ttft_ms=200.0, deadline_ms=1500.5)
    assert p.slo.slo_class == "ttft+deadline"
    assert p.workflow == WorkflowParams("w1", 0, 0)
    assert SamplingParams(slo={}).slo is None
    met = targets_met(p.slo, ttft=0.1, tpot=None, e2e=2.0)
    assert met == {"ttft": True, "deadline": False}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return str(make_tiny_hf_folder(tmp_path_factory.mktemp("slo"), vocab_size=512))


def _prompts() -> list[dict]:
    return [
        {"prompt_token_ids": [(5 * i + 3 * j) % 500 + 1 for j in range(n)]}
        for i, n in enumerate((3, 30, 11, 45, 7, 19))
    ]


def _params() -> list[SamplingParams]:
    slos = [
        {"ttft_ms": 1.0},  # hopeless at once: served last under slo
        {"deadline_ms": 60_000.0},
        None,
        {"ttft_ms": 50.0, "tpot_ms": 5.0},
        {"deadline_ms": 2.0},
        {"tpot_ms": 1000.0},
    ]
    return [
        SamplingParams(max_tokens=6 + i, temperature=0.0, ignore_eos=True, slo=s)
        for i, s in enumerate(slos)
    ]


def test_tokens_do_not_depend_on_the_policy(make_llm, tiny_model: str) -> None:
    outs = {}
    for policy in ("fcfs", "priority", "slo"):
        llm = make_llm(
            model=tiny_model,
            dtype="float32",
            batch_invariant=True,
            scheduling_policy=policy,
            max_num_batched_tokens=16,
            max_num_seqs=3,
            num_kv_blocks=24,
            block_size=4,
            max_model_len=96,
        )
        res = llm.generate(_prompts(), _params(), use_tqdm=False)
        outs[policy] = [list(r.outputs[0].token_ids) for r in res]
        assert [r.slo is not None for r in res] == [p.slo is not None for p in _params()]
        if policy == "slo":
            assert res[0].slo == {"hopeless": True}
    assert outs["fcfs"] == outs["priority"] == outs["slo"]


def test_reject_hopeless(make_llm, tiny_model: str) -> None:
    llm = make_llm(model=tiny_model, scheduling_policy="slo", slo_reject_hopeless=True)
    engine = llm.engine
    with pytest.raises(SloHopelessError, match="ttft_ms cannot be met") as e:
        engine.add_request([1, 2, 3], SamplingParams(max_tokens=4, slo={"ttft_ms": 1e-6}))
    assert e.value.code == "slo_unattainable" and engine.num_slo_rejected == 1
    assert not engine.has_unfinished_requests()
    rid = engine.add_request([1, 2, 3], SamplingParams(max_tokens=4, slo={"ttft_ms": 60_000}))
    while engine.has_unfinished_requests():
        engine.step()
    assert rid


@pytest.mark.slow
@needs_default
def test_default_model_tokens_do_not_depend_on_the_policy() -> None:
    outs = {}
    prompts = ["The capital of France is", "def fib(n):", "Once upon a time", "SELECT name"]
    params = [
        SamplingParams(max_tokens=12, temperature=0.0, slo={"ttft_ms": 1.0 + 500 * i})
        for i in range(4)
    ]
    for policy in ("fcfs", "slo"):
        llm = LLM(
            dtype="float32",
            quantization="none",
            batch_invariant=True,
            kv_cache_memory_gb=0.5,
            scheduling_policy=policy,
            max_num_seqs=2,
        )
        outs[policy] = [
            r.outputs[0].token_ids for r in llm.generate(prompts, params, use_tqdm=False)
        ]
    assert outs["fcfs"] == outs["slo"]

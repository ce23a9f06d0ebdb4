"""Schema fuzz: schemathesis generates requests from the server's own /openapi.json, valid ones
and invalid ones, and every answer must be documented: no 5xx, a status the operation lists,
its media type, a body matching its schema (OpenAI's error shape for errors), and every invalid
request refused with a 4xx. Derandomized, so a run is reproducible; bounded to about a minute.

Valid requests come from a copy of the document tightened for the run (small n, max_tokens and
prompt lists), so that no example spends seconds generating; invalid ones from the document as
served (any request it does not allow is refused before it generates anything).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from server_utils import Server, running_server

from tokenmill.engine.engine import LLMEngine

pytestmark = pytest.mark.slow

# examples per operation and mode; TOKENMILL_FUZZ_EXAMPLES raises it for a longer local run
EXAMPLES = int(os.environ.get("TOKENMILL_FUZZ_EXAMPLES", "100"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
# Run-only bounds on the fields that decide how long a request generates for.
CAPS = {"n": 2, "best_of": 2, "max_tokens": 4, "max_completion_tokens": 4, "min_tokens": 4}


@pytest.fixture(scope="module")
def fuzz_server(llm_engine: LLMEngine) -> Iterator[Server]:
    with running_server(llm_engine, max_pending_seqs=8) as s:
        yield s


def _integer_branch(prop: dict[str, Any]) -> dict[str, Any]:
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") == "integer":
            return branch
    raise AssertionError(f"no integer schema in {prop}")


def tightened(doc: dict[str, Any]) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    schemas = doc["components"]["schemas"]
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = schemas[name]["properties"]
        for field, cap in CAPS.items():
            if field in props:
                _integer_branch(props[field])["maximum"] = cap
        # Chat's max_tokens defaults to the whole context: never leave it out here.
        schemas[name].setdefault("required", []).append("max_tokens")
        props["max_tokens"] = _integer_branch(props["max_tokens"])
        for branch in props.get("prompt", {}).get("anyOf", []):
            if branch.get("type") == "array":
                branch["maxItems"] = 2
        if "messages" in props:
            props["messages"]["maxItems"] = 3
    return doc


def _run_operation(operation: Any, mode: GenerationMode, url: str) -> None:
    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure shows as found
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        case.call_and_validate(base_url=url, checks=CHECKS, timeout=60)

    run()


@pytest.mark.parametrize(
    "mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"]
)
def test_every_answer_is_documented(fuzz_server: Server, mode: GenerationMode) -> None:
    doc = httpx.get(f"{fuzz_server.url}/openapi.json").json()
    # Invalid requests are refused before generating anything: they get the document as served.
    schema = schemathesis.openapi.from_dict(tightened(doc) if mode.is_positive else doc)
    failures = []
    ran = []
    for result in schema.get_all_operations():
        operation = result.ok()
        ran.append(operation.label)
        try:
            _run_operation(operation, mode, fuzz_server.url)
        except Unsatisfiable:  # nothing to make invalid in a request without parameters
            assert not mode.is_positive and operation.method.lower() == "get", operation.label
        except Exception as e:  # collect every operation's failure, not just the first
            failures.append(f"{operation.label}: {e}")
    assert {"POST /v1/completions", "POST /v1/chat/completions", "POST /tokenize"} <= set(ran)
    assert not failures, "\n\n".join(failures)
    fuzz_server.wait_idle()

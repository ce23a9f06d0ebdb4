"""The router's /metrics in Prometheus text format."""

from __future__ import annotations

from tokenmill.router.routing import Router

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(router: Router) -> str:
    out: list[str] = []

    def family(name: str, kind: str, doc: str, rows: list[tuple[dict[str, str], float]]) -> None:
        out.append(f"# HELP tokenmill_router_{name} {doc}")
        out.append(f"# TYPE tokenmill_router_{name} {kind}")
        for labels, value in rows:
            text = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
            out.append(f"tokenmill_router_{name}{{{text}}} {value}" if text else
                       f"tokenmill_router_{name} {value}")  # fmt: skip

    workers = router.pool.workers
    family(
        "requests_total",
        "counter",
        "Requests sent to each worker, by outcome (2xx, 4xx, 5xx, unreachable, dropped, broken).",
        [
            ({"worker": w.url, "outcome": k}, v)
            for w in workers
            for k, v in sorted(w.requests.items())
        ],
    )
    family(
        "routing_decisions_total",
        "counter",
        "Routing decisions by reason; prefix: sent to the worker holding the request's prefix.",
        [({"reason": r}, v) for r, v in sorted(router.decisions.items())],
    )
    family(
        "retries_total",
        "counter",
        "Requests sent again to another worker after this one failed before the first byte.",
        [({"worker": w.url}, router.retries.get(w.url, 0)) for w in workers],
    )
    family(
        "worker_healthy",
        "gauge",
        "1 while a worker is in the rotation.",
        [({"worker": w.url}, int(w.healthy)) for w in workers],
    )
    family(
        "worker_outstanding_requests",
        "gauge",
        "Requests in flight on each worker.",
        [({"worker": w.url}, w.outstanding) for w in workers],
    )
    family(
        "worker_predicted_work_tokens",
        "gauge",
        "Predicted tokens still to compute per worker (prompt not prefilled + output not made).",
        [({"worker": w.url}, w.work) for w in workers],
    )
    family(
        "tree_chars",
        "gauge",
        "Characters of served text the radix tree holds per worker.",
        [({"worker": w.url}, router.tree.tenant_chars(w.url)) for w in workers],
    )
    family(
        "prompt_tokens_total",
        "counter",
        "Predicted prompt tokens of routed requests.",
        [({}, router.prompt_tokens)],
    )
    family(
        "estimated_cached_tokens_total",
        "counter",
        "Prompt tokens the router expected its chosen worker to hold cached.",
        [({}, router.estimated_cached_tokens)],
    )
    return "\n".join(out) + "\n"

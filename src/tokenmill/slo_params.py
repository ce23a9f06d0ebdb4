"""Per-request service-level objectives and multi-stage workflow membership.

`SloParams`: targets for time to first token, time per output token (after the first) and the
end-to-end deadline, each in milliseconds from the request's arrival. For a request that is one
stage of a workflow, `deadline_ms` is the time left to the whole workflow's deadline: the engine
charges the stage its share of it (see core/urgency.py). `WorkflowParams` names the workflow,
this stage's index and how many dependent stages still follow this one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenmill.errors import InvalidRequestError

MAX_SLO_MS = 86_400_000.0  # one day: longer targets are no targets
MAX_STAGES = 1024
MAX_WORKFLOW_ID_CHARS = 256


class SloHopelessError(InvalidRequestError):
    """The request cannot meet its deadline even if served first (`--slo-reject-hopeless`);
    the server answers 429: a later retry with a looser deadline may succeed."""

    code = "slo_unattainable"


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class SloParams:
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    deadline_ms: float | None = None

    def __post_init__(self) -> None:
        for name in ("ttft_ms", "tpot_ms", "deadline_ms"):
            v = getattr(self, name)
            if v is None:
                continue
            if not _is_number(v) or not 0.0 < v <= MAX_SLO_MS:
                raise InvalidRequestError(
                    f"slo.{name} must be a number in (0, {MAX_SLO_MS:.0f}] milliseconds, got {v!r}",
                    "slo",
                )
            object.__setattr__(self, name, float(v))

    @property
    def is_empty(self) -> bool:
        return self.ttft_ms is None and self.tpot_ms is None and self.deadline_ms is None

    @property
    def slo_class(self) -> str:
        """A label for metrics: which targets the request carries."""
        parts = [n for n in ("ttft", "tpot", "deadline") if getattr(self, f"{n}_ms") is not None]
        return "+".join(parts) or "none"


@dataclass(frozen=True)
class WorkflowParams:
    id: str
    stage: int = 0
    remaining_stages: int = 0  # dependent stages after this one

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not 0 < len(self.id) <= MAX_WORKFLOW_ID_CHARS:
            raise InvalidRequestError(
                f"workflow.id must be a string of 1 to {MAX_WORKFLOW_ID_CHARS} characters, "
                f"got {self.id!r}",
                "workflow",
            )
        for name in ("stage", "remaining_stages"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_STAGES:
                raise InvalidRequestError(
                    f"workflow.{name} must be an integer in [0, {MAX_STAGES}], got {v!r}",
                    "workflow",
                )


def _from(cls: type, value: Any, param: str) -> Any:
    if value is None or isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise InvalidRequestError(f"{param} must be an object, got {type(value).__name__}", param)
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(value) - known)
    if unknown:
        raise InvalidRequestError(
            f"{param} has unknown field(s) {', '.join(unknown)}; allowed: {', '.join(known)}",
            param,
        )
    if cls is WorkflowParams and "id" not in value:
        raise InvalidRequestError("workflow.id is required", param)
    return cls(**value)


def to_slo(value: SloParams | dict[str, Any] | None) -> SloParams | None:
    """An SloParams from itself or a dict (as the offline API and the server pass it)."""
    slo = _from(SloParams, value, "slo")
    return None if slo is None or slo.is_empty else slo


def to_workflow(value: WorkflowParams | dict[str, Any] | None) -> WorkflowParams | None:
    return _from(WorkflowParams, value, "workflow")


def targets_met(
    slo: SloParams, ttft: float | None, tpot: float | None, e2e: float, finished: bool = True
) -> dict[str, bool]:
    """Which targets a request met, by target name (ttft, tpot, deadline); times in seconds.
    An aborted request (not `finished`) met none; a single output token has no TPOT to miss."""
    met: dict[str, bool] = {}
    if slo.ttft_ms is not None:
        met["ttft"] = finished and ttft is not None and ttft * 1000.0 <= slo.ttft_ms
    if slo.tpot_ms is not None:
        met["tpot"] = finished and (tpot is None or tpot * 1000.0 <= slo.tpot_ms)
    if slo.deadline_ms is not None:
        met["deadline"] = finished and e2e * 1000.0 <= slo.deadline_ms
    return met

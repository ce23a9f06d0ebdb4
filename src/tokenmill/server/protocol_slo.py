"""The `slo` and `workflow` request extras: latency targets and workflow membership, turned into
the engine's SloParams and WorkflowParams (same limits, see slo_params.py)."""

from __future__ import annotations

from typing import Annotated

from pydantic import ConfigDict, Field, StrictFloat, StrictInt, StrictStr

from tokenmill.server.protocol_base import RequestModel
from tokenmill.slo_params import (
    MAX_SLO_MS,
    MAX_STAGES,
    MAX_WORKFLOW_ID_CHARS,
    SloParams,
    WorkflowParams,
)

Millis = Annotated[StrictFloat, Field(gt=0, le=MAX_SLO_MS)]
StageCount = Annotated[StrictInt, Field(ge=0, le=MAX_STAGES)]


class SloRequest(RequestModel):
    """Latency targets in milliseconds from arrival; deadline_ms of a workflow stage is the time
    left to the whole workflow's deadline."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    ttft_ms: Millis | None = Field(None, description="time to first token")
    tpot_ms: Millis | None = Field(None, description="time per output token after the first")
    deadline_ms: Millis | None = Field(None, description="end-to-end deadline")

    def params(self) -> SloParams:
        return SloParams(self.ttft_ms, self.tpot_ms, self.deadline_ms)


class WorkflowRequest(RequestModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    id: StrictStr = Field(min_length=1, max_length=MAX_WORKFLOW_ID_CHARS)
    stage: StageCount = 0
    remaining_stages: StageCount = Field(0, description="dependent stages after this one")

    def params(self) -> WorkflowParams:
        return WorkflowParams(self.id, self.stage, self.remaining_stages)

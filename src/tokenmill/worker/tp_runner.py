"""The tensor-parallel step: the driver's runner broadcasts each step's batch, the other ranks
run the same forward on their shards.

Rank 0 (the engine's process) schedules, builds the step and samples. Before its forward it
publishes the step once to the shared-memory broadcast queue: per seq (token ids, start
position, block tables, sample, draft count) and the logit rows it will ask for. Every other
rank rebuilds the identical `InputBatch` from that, runs the forward (the all-reduces pair up)
and the LM head on the same rows (the logits gather pairs up), and discards its logits.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tokenmill.core.sched_types import ModelRunnerOutput, ScheduledSeq, SchedulerOutput
from tokenmill.worker.model_runner import ModelRunner, logit_plan
from tokenmill.worker.shm_broadcast import ShmBroadcast

logger = logging.getLogger(__name__)

# A step's message: ([(token_ids, start_pos, block_ids, sample, num_draft_tokens, constrained,
# num_prompt_tokens)], sample rows, [(first row, rows)] of prompt-logprob spans); None stops
# the workers.
StepMessage = tuple[list[tuple[Any, ...]], list[int], list[tuple[int, int]]]


@dataclass(frozen=True)
class _RequestView:
    """What `build_input_batch` reads of a request (whether a seq is a constrained request's
    forced run, laid out as decode rows), so that a worker orders the rows as rank 0 does."""

    grammar: bool | None
    num_prompt_tokens: int


def step_message_bytes(max_tokens: int, max_seqs: int, num_groups: int, max_blocks: int) -> int:
    """A generous bound on one pickled step message."""
    per_seq = 64 + 10 * num_groups * max_blocks
    return (1 << 16) + (16 * max_tokens + max_seqs * per_seq) * 2


class WorkerDownError(RuntimeError):
    """A tensor-parallel rank has died or failed: the engine cannot step."""


class TPDriverRunner(ModelRunner):
    """Rank 0's runner: `execute` publishes the step to the other ranks, then runs it."""

    channel: ShmBroadcast
    step_timeout_s: float
    health_error: Callable[[], str | None]

    def attach(
        self,
        channel: ShmBroadcast,
        step_timeout_s: float,
        health_error: Callable[[], str | None],
    ) -> None:
        """`health_error()`: why a worker is down (None: all run), checked before each step
        so that a step never starts without every rank."""
        self.channel, self.step_timeout_s = channel, step_timeout_s
        self.health_error = health_error

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        error = self.health_error()
        if error is not None:
            raise WorkerDownError(error)
        batch = self.prepare(sched.seqs)
        plan = logit_plan(batch)
        seqs = [
            (s.token_ids, s.start_pos, s.block_ids, s.sample, s.num_draft_tokens,
             s.req.grammar is not None, s.req.num_prompt_tokens)
            for s in sched.seqs
        ]  # fmt: skip
        spans = [(start, n) for _, start, n, _ in plan[2]]
        self.channel.publish((seqs, plan[0], spans), self.step_timeout_s)
        return self._execute(batch, plan)


@torch.inference_mode()
def run_worker_steps(
    runner: ModelRunner, channel: ShmBroadcast, driver_alive: Callable[[], bool]
) -> None:
    """A non-zero rank's loop: runs every published step until the driver stops or dies."""
    while True:
        msg: StepMessage | None = channel.receive(driver_alive)
        if msg is None:
            return
        seq_tuples, sample_rows, spans = msg
        seqs = [
            ScheduledSeq(
                _RequestView(True if constrained else None, n_prompt),  # type: ignore[arg-type]
                toks, start, tables, sample, drafts,
            )
            for toks, start, tables, sample, drafts, constrained, n_prompt in seq_tuples
        ]  # fmt: skip
        batch = runner.prepare(seqs)
        hidden = runner.forward(batch)
        if sample_rows:
            runner.model.compute_logits(hidden[sample_rows])
        for start, n in spans:
            runner.model.compute_logits(hidden[start : start + n])

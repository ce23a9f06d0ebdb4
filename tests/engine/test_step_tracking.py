"""The step-cost model behind SLO slack and the simulator: fitted on the default model's measured
steps, its predictions track the steps it did not see -- the median of predicted / measured is
within 20% of 1 (timing: slow; on a busy host single steps stretch at random, which is why the
median and not the total is held to 20%)."""

from __future__ import annotations

import random
import statistics

import pytest

from tokenmill.config import EngineConfig
from tokenmill.core.step_model import StepCostModel, StepShape
from tokenmill.engine.engine import LLMEngine
from tokenmill.sampling_params import SamplingParams
from utils_default import needs_default

pytestmark = [pytest.mark.slow, needs_default]


def test_predicted_step_times_track_measured_ones() -> None:
    engine = LLMEngine(EngineConfig(max_num_batched_tokens=256))
    steps: list[tuple[StepShape, float]] = []
    observe = engine.scheduler.observe_step

    def record(sched_out, seconds: float) -> None:  # noqa: ANN001
        steps.append((StepShape.of(sched_out), seconds))
        observe(sched_out, seconds)

    engine.scheduler.observe_step = record  # type: ignore[method-assign]
    rng = random.Random(0)
    for wave in range(4):  # prompt chunks, mixed steps and decode batches of 1 to 10
        for _ in range(2 + 3 * wave):
            prompt = [rng.randrange(100, 30000) for _ in range(rng.choice([16, 64, 200, 400]))]
            params = SamplingParams(max_tokens=rng.randint(8, 24), ignore_eos=True)
            engine.add_request(prompt, params)
        while engine.has_unfinished_requests():
            engine.step()
    steps = steps[4:]  # the first steps build kernels
    model = StepCostModel()
    for shape, seconds in steps[0::2]:
        model.observe(shape, seconds)
    model.refit()
    held_out = steps[1::2]
    ratio = statistics.median(model.predict(s) / t for s, t in held_out)
    total = sum(model.predict(s) for s, _ in held_out) / sum(t for _, t in held_out)
    assert 0.8 <= ratio <= 1.2, (ratio, total, model.coeffs, len(held_out))

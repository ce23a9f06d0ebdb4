"""The online step-cost model behind the draft budget: the prior until two nearby row counts
are measured, then the local slope of measured step times (medians, each row count's first step
dropped), fitted near the batch size."""

from __future__ import annotations

import random

import pytest

from tokenmill.spec_decode.step_cost import StepCostModel


def prior_threshold(batch: int, c: float) -> float:
    return batch * c / (1 + batch * c)


def test_prior_until_two_nearby_row_counts():
    model = StepCostModel(0.12)
    assert model.acceptance_threshold(8) == pytest.approx(prior_threshold(8, 0.12))
    for _ in range(10):
        model.observe(8, 0.010)
    assert model.acceptance_threshold(8) == pytest.approx(prior_threshold(8, 0.12))
    model.observe(40, 0.05)  # far from batch 8: not used for its slope
    assert model.acceptance_threshold(8) == pytest.approx(prior_threshold(8, 0.12))


def test_local_slope_from_noisy_steps():
    rng = random.Random(0)
    model = StepCostModel(0.12)
    for _ in range(500):
        rows = rng.randint(1, 24)
        model.observe(rows, (0.004 + 0.001 * rows) * rng.uniform(0.95, 1.05))
    a, b = model.local_fit(8)
    assert b == pytest.approx(0.001, rel=0.15)
    # p > b B / t(B) = 0.008 / 0.012
    assert model.acceptance_threshold(8) == pytest.approx(2 / 3, rel=0.1)
    assert model.acceptance_threshold(1) < model.acceptance_threshold(8)


def test_slope_is_local_to_the_batch_size():
    """Rows cheap at small batch and dear at large batch (a GEMV turning compute-bound): each
    batch size sees the slope around it, not one line through both regimes."""
    model = StepCostModel(0.12)
    for _ in range(20):
        for rows in range(1, 7):
            model.observe(rows, 0.005 + 0.0002 * rows)
        for rows in range(16, 40):
            model.observe(rows, 0.002 + 0.002 * rows)
    assert model.local_fit(2)[1] == pytest.approx(0.0002, rel=0.05)
    assert model.local_fit(24)[1] == pytest.approx(0.002, rel=0.05)
    assert model.acceptance_threshold(2) < 0.1 < 0.9 < model.acceptance_threshold(24)


def test_bad_samples_ignored_and_free_rows_mean_always_draft():
    model = StepCostModel(0.12)
    model.observe(0, 0.01)
    model.observe(4, float("nan"))
    model.observe(5, -1.0)
    assert model.local_fit(4) is None
    for _ in range(2):
        for rows in range(1, 33):
            model.observe(rows, 0.01)  # rows cost nothing (a GPU at small batch)
    assert model.acceptance_threshold(16) == 0.0


def test_rows_costing_more_than_the_step_mean_never_draft():
    model = StepCostModel(0.12)
    for _ in range(2):
        for rows in (4, 8, 12):
            model.observe(rows, 0.001 * rows)  # all cost is per row: a = 0
    assert model.acceptance_threshold(8) == pytest.approx(1.0)
    assert model.acceptance_threshold(8, prior=True) == pytest.approx(prior_threshold(8, 0.12))


def test_first_step_of_a_row_count_and_outliers_do_not_count():
    """A row count's first step (oneDNN building kernels for a new shape) is dropped, and its
    time is a median: one slow step among normal ones moves nothing."""
    model = StepCostModel(0.12)
    model.observe(1, 0.005)
    model.observe(9, 0.5)  # first 9-row step: a kernel build
    for _ in range(5):
        model.observe(1, 0.005)
        model.observe(9, 0.007)
    model.observe(9, 0.3)  # a hiccup
    a, b = model.local_fit(1)
    assert b == pytest.approx(0.00025)
    assert model.acceptance_threshold(1) < 0.1

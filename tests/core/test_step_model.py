"""The step-cost model's running sums: observe() keeps, bit for bit, the sums of the plain
definition (each step's terms from `StepShape.features()`, the oldest step's terms subtracted
and then the new step's added, element by element), so fits, and the slo policy's decisions on
them, do not depend on how the sums are kept."""

from __future__ import annotations

import collections
import operator
import random

from tokenmill.core.step_model import StepCostModel, StepShape, _solve


def reference_terms(x: tuple[float, ...], t: float) -> list[float]:
    w = 1.0 / (t * t)
    out: list[float] = []
    for xi in x:
        wi = w * xi
        out += [wi * t, abs(xi) / t, *(wi * xj for xj in x)]
    return out


class ReferenceModel:
    """The sums and the fit as first written: two passes per step, a refit every `fit_every`."""

    def __init__(self, window: int, fit_every: int, ridge: float = 0.5) -> None:
        self.prior = StepCostModel().prior
        self.coeffs = self.prior
        self.window, self.fit_every, self.ridge = window, fit_every, ridge
        self.obs: collections.deque[list[float]] = collections.deque(maxlen=window)
        self.sums = [0.0] * 24
        self.since = 0

    def observe(self, shape: StepShape, t: float) -> None:
        if len(self.obs) == self.window:
            self.sums = list(map(operator.sub, self.sums, self.obs[0]))
        terms = reference_terms(shape.features(), t)
        self.obs.append(terms)
        self.sums = list(map(operator.add, self.sums, terms))
        self.since += 1
        if self.since >= self.fit_every:
            self.since = 0
            n = len(self.obs)
            ata = [self.sums[6 * i + 2 : 6 * i + 6] for i in range(4)]
            atb = [self.sums[6 * i] for i in range(4)]
            for i in range(4):
                w = self.ridge * max(1e-9, self.sums[6 * i + 1] / n) ** 2
                ata[i][i] += w
                atb[i] += w * self.prior[i]
            sol = _solve(ata, atb)
            if sol is not None:
                self.coeffs = (max(sol[0], 1e-6), *(max(v, 0.0) for v in sol[1:]))


def test_running_sums_and_fits_are_those_of_the_plain_definition() -> None:
    rng = random.Random(3)
    model = StepCostModel(window=16, fit_every=5)
    ref = ReferenceModel(window=16, fit_every=5)
    for _ in range(200):  # many times around the window
        seqs = rng.randint(1, 64)
        shape = StepShape(
            seqs + rng.choice([0, 0, rng.randint(1, 400)]), seqs, rng.randint(0, 90_000)
        )
        t = 0.004 + shape.tokens * 1e-4 * rng.uniform(0.5, 2.0)
        model.observe(shape, t)
        ref.observe(shape, t)
        assert model._sums == ref.sums  # bit for bit, not approximately
        assert model.coeffs == ref.coeffs
        assert model.predict(shape) == model.predict_counts(shape.tokens, shape.seqs, shape.context)
    assert model.coeffs != model.prior  # the fits ran

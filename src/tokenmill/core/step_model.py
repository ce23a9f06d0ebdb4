"""What a scheduler step costs, predicted from its shape and fitted online from measured steps.

A step's time is modelled as t = a + b * tokens + c * seqs + d * context / 1000: a fixed cost
(launch, sampling set-up), a cost per token through the weights (GEMMs: the SplitFuse budget),
a cost per sequence (sampling, bookkeeping) and attention over the KV each sequence reads. The
coefficients are a ridge least-squares fit over the last `window` measured steps, pulled towards
the prior so that a few steps of one shape cannot produce nonsense (a single batch size gives
no information about c, for example). Pure Python: the scheduler and the simulator use it.
"""

from __future__ import annotations

import collections
import math
import operator
from dataclasses import dataclass

from tokenmill.core.sched_types import SchedulerOutput


@dataclass(frozen=True)
class StepShape:
    tokens: int  # tokens run through the model (the budget used)
    seqs: int  # sequences in the step
    context: int  # KV positions read, summed over sequences

    def features(self) -> tuple[float, float, float, float]:
        return (1.0, float(self.tokens), float(self.seqs), self.context / 1000.0)

    @classmethod
    def of(cls, sched: SchedulerOutput) -> StepShape:
        ctx = sum(s.start_pos + s.num_tokens for s in sched.seqs)
        return cls(sched.num_batched_tokens, len(sched.seqs), ctx)


# The default model (135M, Q4_1) on a 2-core CPU, roughly (a busy host; quiet ones are faster):
# ~6 ms per step, ~1.5 ms per token and per sequence, ~2 ms per 1000 context positions.
DEFAULT_COEFFS = (0.006, 0.0015, 0.0015, 0.002)


class StepCostModel:
    def __init__(
        self,
        prior: tuple[float, float, float, float] = DEFAULT_COEFFS,
        *,
        window: int = 512,
        ridge: float = 0.5,
        fit_every: int = 16,
    ) -> None:
        self.prior = prior
        self.coeffs = prior
        self.window = window
        self.ridge = ridge  # weight of the prior, in steps' worth of evidence
        self.fit_every = fit_every
        # The terms of the running sums of each step in the window
        self._obs: collections.deque[list[float]] = collections.deque(maxlen=window)
        # Running sums over the window, 6 per feature i: (X^T W t)_i, sum |x_i| / t, then row i
        # of X^T W X. The weight 1 / t^2 fits relative errors: a long prefill step (or one the
        # host's load stretched) does not outweigh the many short decode steps whose time slack
        # is made of. Leaving the window subtracts exactly the terms it added, so a refit is O(1).
        self._sums = [0.0] * 24
        self._since_fit = 0

    @property
    def num_observed(self) -> int:
        return len(self._obs)

    def predict(self, shape: StepShape) -> float:
        return self.predict_counts(shape.tokens, shape.seqs, shape.context)

    def predict_counts(self, tokens: int, seqs: int, context: int) -> float:
        """`predict` of a step of this shape, without building the `StepShape`."""
        a, b, c, d = self.coeffs
        # The same sum, in the same order, as over `features()`.
        return max(1e-6, a + b * tokens + c * seqs + d * (context / 1000.0))

    def observe(self, shape: StepShape, seconds: float) -> None:
        if shape.tokens < 1 or not math.isfinite(seconds) or seconds <= 0.0:
            return
        obs = self._obs
        terms = _terms(shape.tokens, shape.seqs, shape.context, seconds)
        if len(obs) == self.window:  # the oldest leaves the window and the sums
            # (s - old) + new: the two updates of each sum, in that order, in one pass.
            sums, old = self._sums, obs[0]
            self._sums = [s - o + t for s, o, t in zip(sums, old, terms, strict=True)]
        else:
            self._sums = list(map(operator.add, self._sums, terms))
        obs.append(terms)
        self._since_fit += 1
        if self._since_fit >= self.fit_every:
            self.refit()

    def refit(self) -> None:
        """Ridge regression towards the prior: minimise sum ((x.c - t) / t)^2 + ridge * sum
        ((c_i - p_i) * s_i)^2, each coefficient scaled by the typical size of its feature."""
        self._since_fit = 0
        n_obs = len(self._obs)
        if not n_obs:
            return
        sums = self._sums
        ata = [sums[6 * i + 2 : 6 * i + 6] for i in range(4)]
        atb = [sums[6 * i] for i in range(4)]
        for i in range(4):
            w = self.ridge * max(1e-9, sums[6 * i + 1] / n_obs) ** 2
            ata[i][i] += w
            atb[i] += w * self.prior[i]
        sol = _solve(ata, atb)
        if sol is not None:
            # Negative per-unit costs are noise: clamp them, keep the fixed cost positive.
            self.coeffs = (max(sol[0], 1e-6), *(max(v, 0.0) for v in sol[1:]))


def _terms(tokens: int, seqs: int, context: int, t: float) -> list[float]:
    """One step's terms of the running sums (see `StepCostModel._sums`), from the features of
    its shape (`StepShape.features`)."""
    w = 1.0 / (t * t)
    x1, x2, x3 = float(tokens), float(seqs), context / 1000.0
    # Unrolled over the features (it runs once per step): (w x_i t, |x_i| / t, w x_i x_j ...);
    # x0 = 1.0, so w * x0 is w and multiplying by x0 changes nothing.
    w1, w2, w3 = w * x1, w * x2, w * x3
    # fmt: off
    return [
        w * t, 1.0 / t, w, w1, w2, w3,
        w1 * t, abs(x1) / t, w1, w1 * x1, w1 * x2, w1 * x3,
        w2 * t, abs(x2) / t, w2, w2 * x1, w2 * x2, w2 * x3,
        w3 * t, abs(x3) / t, w3, w3 * x1, w3 * x2, w3 * x3,
    ]
    # fmt: on


def _solve(a: list[list[float]], b: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting; None if singular."""
    n = len(b)
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[piv][col]) < 1e-18:
            return None
        m[col], m[piv] = m[piv], m[col]
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            for k in range(col, n + 1):
                m[r][k] -= f * m[col][k]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (m[r][n] - sum(m[r][k] * x[k] for k in range(r + 1, n))) / m[r][r]
    return x

"""What one more row costs in a decode step, measured online from the engine's own step times.

Around a given size, a decode step over n rows (requests plus verified drafts) takes about
t(n) = a + b n. A draft token is worth verifying when its chance of acceptance p makes up for
its row: with B requests decoding, the step yields B tokens in t(B), so one more row pays when
p t(B) / B > b, that is p > b B / t(B).

The cost of a row depends on the machine, the model and the batch: on the 2-core CPU host a
row of the default model costs ~0.2 of a one-row step at batch 1, and more at batch 8, where
the quantized GEMV turns compute-bound; on a GPU rows are nearly free until the batch is large.
So a single straight line fitted over every step is wrong at one end or the other. Instead, the
step time is kept per row count (the median of its last few steps, the first one dropped: a
new row count makes oneDNN build new kernels), and the slope at batch B is fitted over the row
counts near B: [B / 2, 2 B + 8]. Until two such row counts have been seen, the prior
`row_cost` (b / a, `speculative_draft_cost`) stands in. The Speculator drafts with the prior
now and then, so that a pessimistic estimate is measured again rather than kept forever.
"""

from __future__ import annotations

import collections
import math
import statistics

_SAMPLES = 8  # steps kept per row count; their median is its time


class StepCostModel:
    def __init__(self, prior_row_cost: float) -> None:
        self.prior_row_cost = prior_row_cost  # b / a until measured
        # rows -> recent step seconds; empty while only the (dropped) first step has been seen
        self._samples: dict[int, collections.deque[float]] = {}
        self._median: dict[int, float] = {}  # rows with samples -> their median

    def observe(self, num_rows: int, seconds: float) -> None:
        """Records one decode-only step of `num_rows` rows (drafts included)."""
        if num_rows < 1 or not math.isfinite(seconds) or seconds <= 0.0:
            return
        samples = self._samples.get(num_rows)
        if samples is None:
            self._samples[num_rows] = collections.deque(maxlen=_SAMPLES)
            return
        samples.append(seconds)
        self._median[num_rows] = statistics.median(samples)

    def local_fit(self, batch_size: int) -> tuple[float, float] | None:
        """(a, b) of t(n) = a + b n over the measured row counts near batch_size, or None."""
        lo, hi = max(1, batch_size // 2), 2 * batch_size + 8
        pts = [(n, t, len(self._samples[n])) for n, t in self._median.items() if lo <= n <= hi]
        total = sum(w for _, _, w in pts)
        if len(pts) < 2:
            return None
        mean_x = sum(w * n for n, _, w in pts) / total
        mean_y = sum(w * t for _, t, w in pts) / total
        var_x = sum(w * (n - mean_x) ** 2 for n, _, w in pts) / total
        cov = sum(w * (n - mean_x) * (t - mean_y) for n, t, w in pts) / total
        b = max(cov / var_x, 0.0)
        return mean_y - b * mean_x, b

    def acceptance_threshold(self, batch_size: int, prior: bool = False) -> float:
        """The chance of acceptance a draft token needs to be worth its row at this batch size
        (`prior`: by the prior row cost, whatever has been measured)."""
        fit = None if prior else self.local_fit(batch_size)
        if fit is None:
            cost = batch_size * self.prior_row_cost
            threshold = cost / (1.0 + cost)
        else:
            a, b = fit
            step = a + b * batch_size  # t(B): the step without drafts
            threshold = 1.0 if step <= 0.0 else min(1.0, b * batch_size / step)
        return threshold

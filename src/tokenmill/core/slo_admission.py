"""The slo policy's admission control: a request joins the batch only if it does not push a
more urgent running request past its targets.

On a CPU every sequence in a step costs about as much as the step's fixed part, so running
everyone at once (processor sharing) makes everyone late together under load. Admitting a
request r delays each running request i by about r's prompt tokens' cost plus one extra row in
each of the steps both still need: D(r, i) = p_r * b + min(n_i, n_r) * (b + c + d * ctx_r).
r is admitted only while every more urgent running request with a finite target keeps
`slack_i >= D(r, i)`, or when r itself would miss if it waited longer (slack under
`urgent_slack`); otherwise r and everything less urgent wait for this step (a request with no
target, or a hopeless one, only fills capacity no one urgent needs).
"""

from __future__ import annotations

import math

from tokenmill.core.urgency import INF, SloTracker
from tokenmill.request import Request


class SloAdmission:
    def __init__(
        self, tracker: SloTracker, running: list[Request], key: object, urgent_slack: float
    ) -> None:
        self.tracker = tracker
        self.urgent_slack = urgent_slack
        self._key = key
        # (key, slack, steps) of each running request with a finite target
        self._guarded: list[tuple[tuple, float, int]] = []
        for req in running:
            self._add(req)

    def _add(self, req: Request) -> None:
        k = self._key(req)  # type: ignore[operator]
        if k[0] or k[1] == INF:
            return  # hopeless or without targets: nothing to protect
        self._guarded.append((k, k[1] - self.tracker.now, self.tracker.remaining_steps(req)))

    def allows(self, req: Request) -> bool:
        if not self._guarded:
            return True
        t = self.tracker
        a, b, c, d = t.cost.coeffs
        k = self._key(req)  # type: ignore[operator]
        if k[0] == 1:
            return False  # doomed: only capacity no request that can make it needs
        if not k[0] and k[1] - t.now < self.urgent_slack:
            return True  # about to miss if it waits any longer: least slack goes first
        pending = t.pending(req)
        steps_r = t.remaining_steps(req)
        st = t.states.get(req.request_id)
        if st is not None and st.first_token is None and st.ttft_deadline < INF:
            # Its first token is what is urgent; after it, it is deferred while it has slack.
            steps_r = math.ceil(pending / t.budget)
        row = b + c + d * req.num_tokens / 1000.0
        prompt = pending * b + math.ceil(pending / t.budget) * c
        for gk, slack, steps_i in self._guarded:
            if gk < k and slack < prompt + min(steps_i, steps_r) * row:
                return False
        return True

    def admit(self, req: Request) -> None:
        self._add(req)

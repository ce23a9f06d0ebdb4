"""The Speculator's draft budget: full at batch 1, shrinking with the batch and with a request's
own acceptance history, never below zero, off when draft_cost is 0."""

from __future__ import annotations

import itertools

import pytest

from tokenmill.request import Request
from tokenmill.sampling_params import SamplingParams
from tokenmill.spec_decode.proposer import Proposer
from tokenmill.spec_decode.speculator import Speculator

_ids = itertools.count()


class FixedDrafts(Proposer):
    """Proposes `k` copies of token 7 (as many as allowed); records the caps it was given."""

    def __init__(self) -> None:
        self.caps: list[int] = []

    def propose(self, reqs: list[Request], max_drafts: list[int]) -> list[list[int]]:
        self.caps = list(max_drafts)
        return [[7] * k for k in max_drafts]


def decoding_request(drafted: int = 0, accepted: int = 0, spec: bool = True) -> Request:
    req = Request(
        f"d{next(_ids)}",
        [1, 2, 3],
        SamplingParams(max_tokens=100, use_speculation=spec),
        max_tokens=100,
    )
    req.output_token_ids = [4]
    req.num_computed_tokens = req.num_tokens - 1  # next step decodes
    req.num_drafted_tokens, req.num_accepted_draft_tokens = drafted, accepted
    return req


def drafts_for(batch: list[Request], cost: float) -> list[int]:
    drafts = Speculator(FixedDrafts(), 8, 4096, draft_cost=cost).propose(batch)
    assert all(r.spec_token_ids == [] for r in batch)  # proposing changes no request
    return [len(drafts.get(r.request_id, [])) for r in batch]


def test_batch_one_drafts_the_full_budget_for_a_good_history():
    assert drafts_for([decoding_request(drafted=100, accepted=90)], 0.12) == [8]


def test_budget_shrinks_with_batch_size():
    sizes = [drafts_for([decoding_request(drafted=40, accepted=28) for _ in range(b)], 0.12)[0]
             for b in (1, 2, 4, 8, 16)]  # fmt: skip
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]
    # a = 29/42: threshold at batch 8 is 0.96 / 1.96 = 0.49 -> floor(log 0.49 / log 0.69) = 1
    assert sizes[3] == 1


def test_poor_acceptance_stops_drafting_at_large_batch_only():
    poor = dict(drafted=50, accepted=10)  # a = 11/52 ~ 0.21
    assert drafts_for([decoding_request(**poor)], 0.12)[0] == 1  # threshold 0.107
    assert drafts_for([decoding_request(**poor) for _ in range(8)], 0.12) == [0] * 8


def test_new_requests_start_from_an_even_prior():
    # a = 1/2: batch 1 threshold 0.107 -> 3 drafts; batch 8 -> 1 draft
    assert drafts_for([decoding_request()], 0.12) == [3]
    assert drafts_for([decoding_request() for _ in range(8)], 0.12) == [1] * 8


def test_requests_without_speculation_count_toward_the_batch():
    batch = [decoding_request(drafted=40, accepted=28)] + [
        decoding_request(spec=False) for _ in range(7)
    ]
    assert drafts_for(batch, 0.12) == [1] + [0] * 7


@pytest.mark.parametrize("batch", [1, 8, 32])
def test_zero_cost_keeps_the_full_budget(batch):
    reqs = [decoding_request(drafted=50, accepted=0) for _ in range(batch)]
    assert drafts_for(reqs, 0.0) == [8] * batch


def test_measured_cost_rules_drafts_out_but_the_prior_is_tried_now_and_then():
    from tokenmill.spec_decode.speculator import EXPLORE_EVERY

    spec = Speculator(FixedDrafts(), 8, 4096, draft_cost=0.12)
    for _ in range(2):
        for rows in (1, 2, 3):
            spec.cost.observe(rows, 0.004 * rows)  # rows cost all: never worth a draft
    batch = [decoding_request(drafted=100, accepted=90)]
    sizes = []
    for _ in range(2 * EXPLORE_EVERY):
        drafts = spec.propose(batch)
        sizes.append(len(drafts.get(batch[0].request_id, [])))
    assert sizes.count(0) == 2 * EXPLORE_EVERY - 2
    assert sizes[EXPLORE_EVERY - 1] == sizes[2 * EXPLORE_EVERY - 1] == 8  # the prior's budget

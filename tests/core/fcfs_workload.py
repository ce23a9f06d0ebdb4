"""A fixed scheduler workload whose FCFS step-by-step schedule is pinned by a digest: prefix
hits, chunked prompts, preemption under a small KV cache and staggered arrivals. `slo` adds SLO
and workflow fields to every other request, which FCFS must ignore."""

from __future__ import annotations

import hashlib
import random

from sched_utils import FakeRunner

from tokenmill.core.kv_group import KVGroupSpec
from tokenmill.core.scheduler import Scheduler, SchedulerConfig
from tokenmill.request import Request
from tokenmill.sampling_params import SamplingParams


def fcfs_digest(policy: str = "fcfs", slo: bool = False) -> str:
    rng = random.Random(1234)
    sched = Scheduler(
        SchedulerConfig(
            max_num_batched_tokens=32,
            max_num_seqs=6,
            max_model_len=256,
            block_size=4,
            kv_groups=(KVGroupSpec(48),),
            policy=policy,
        )
    )
    runner = FakeRunner(4)
    prefixes = [[rng.randrange(1, 50) for _ in range(12)] for _ in range(3)]
    arrivals: dict[int, list[Request]] = {}
    for i in range(40):
        prompt = rng.choice(prefixes)[: rng.randrange(0, 13)]
        prompt += [rng.randrange(1, 50) for _ in range(rng.randrange(1, 40))]
        extra = {}
        if slo and i % 2:
            extra = {"slo": {"ttft_ms": 5.0, "deadline_ms": 50.0}, "workflow": {"id": f"w{i}"}}
        params = SamplingParams(max_tokens=rng.randrange(1, 12), **extra)
        req = Request(f"r{i}", prompt, params, max_tokens=params.max_tokens, arrival_time=i)
        arrivals.setdefault(rng.randrange(0, 60), []).append(req)
    log = []
    step = 0
    while step < 60 or sched.has_unfinished_requests():
        for req in arrivals.get(step, ()):
            sched.add_request(req)
        out = sched.schedule()
        log.append(
            (
                [(s.req.request_id, s.start_pos, s.num_tokens) for s in out.seqs],
                out.preempted_req_ids,
            )
        )
        sched.update_from_output(out, runner.execute(out))
        step += 1
        assert step < 5000
    return hashlib.sha256(repr(log).encode()).hexdigest()

"""Sliding-window attention in the KV cache manager: blocks behind a group's window go back to
its pool, so a request's KV in that group stays bounded by the window whatever its length, while
the KV inside the window is never touched by anyone else. A hybrid model (global and windowed
layers) keeps every block in its global group only."""

from __future__ import annotations

from sched_utils import ROOT, make_req, make_sched, mix, next_token, reference, run

from tokenmill.core.kv_group import KVGroupSpec
from tokenmill.core.sched_types import ModelRunnerOutput, SchedulerOutput
from tokenmill.core.scheduler import Scheduler

WINDOW, BLOCK = 8, 4


class WindowedRunner:
    """Like the scheduler tests' fake model, but each KV group's attention reads only what its
    layers see: the last `window` positions, or all of them for a global group. Each query
    checks those slots against the reference chain (so the KV it sees is intact) and never
    reads a slot behind its window (those blocks may belong to others)."""

    def __init__(self, sched: Scheduler) -> None:
        groups = sched.kv_cache_manager.groups
        self.windows = [g.window for g in groups]
        self.null_blocks = [g.null_block.block_id for g in groups]
        self.slots: dict[tuple[int, int, int], int] = {}

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        sampled: dict[str, list[int]] = {}
        for seq in out.seqs:
            chain = [ROOT]
            for token in seq.req.token_slice(0, seq.start_pos + seq.num_tokens):
                chain.append(mix(chain[-1], token))  # chain[p + 1]: the KV of position p
            for g, table in enumerate(seq.block_ids):
                null, window = self.null_blocks[g], self.windows[g]
                for j in range(seq.num_tokens):
                    pos = seq.start_pos + j
                    block = table[pos // BLOCK]
                    assert block != null, "a new token's slot was released"
                    self.slots[g, block, pos % BLOCK] = chain[pos + 1]
                    first = 0 if window is None else max(0, pos - window + 1)
                    for key in range(first, pos):  # the earlier keys this group's layers see
                        key_block = table[key // BLOCK]
                        assert key_block != null, f"key {key} in the window released"
                        assert self.slots[g, key_block, key % BLOCK] == chain[key + 1], "bad KV"
            if seq.sample:
                sampled[seq.req.request_id] = [next_token(chain[-1])]
        return ModelRunnerOutput(sampled)


def test_long_requests_hold_about_a_window_of_blocks() -> None:
    budget = 8
    sched = make_sched(
        sliding_window=WINDOW, block_size=BLOCK, num_blocks=24, max_num_batched_tokens=budget
    )
    kv = sched.kv_cache_manager
    # prompts 4x the window; all three at full length would need 3 x 18 blocks
    reqs = [make_req([(7 * i + t) % 50 for t in range(32)], max_tokens=40) for i in range(3)]
    bound = -(-(WINDOW + budget) // BLOCK) + 1
    most = 0

    def on_step(out: SchedulerOutput) -> None:
        nonlocal most
        for req in sched.running:
            (held,) = kv.num_held_blocks(req)
            most = max(most, held)
            assert held <= bound, (req.request_id, held)

    outputs = run(sched, [reqs], on_step=on_step, runner=WindowedRunner(sched))
    for req in reqs:
        assert outputs[req.request_id] == reference(req, sched.max_model_len)
    assert sched.num_preemptions == 0
    assert most >= WINDOW // BLOCK  # the window itself stays held
    assert kv.num_free_blocks == 24  # everything back at the end


def test_without_a_window_nothing_is_released() -> None:
    sched = make_sched(block_size=BLOCK, num_blocks=64)
    req = make_req(list(range(40)), max_tokens=4)
    run(sched, [[req]])
    assert sched.kv_cache_manager.release_out_of_window(req) == 0


def test_released_blocks_stay_reusable_by_a_later_prefix_hit() -> None:
    """A follow-up turn resends the whole conversation: the released blocks are still cached
    (free but hashed), so its prefix hits them."""
    sched = make_sched(sliding_window=WINDOW, block_size=BLOCK, num_blocks=40)
    first = make_req(list(range(40)), max_tokens=2)
    run(sched, [[first]], runner=WindowedRunner(sched))
    follow_up = make_req(list(range(40)) + first.output_token_ids + [3, 4], max_tokens=1)
    block_ids, num_hit = sched.kv_cache_manager.get_computed_blocks(follow_up)
    assert num_hit == 40 and len(block_ids[0]) == 10


def test_preemption_with_a_window_gives_the_same_tokens() -> None:
    """Ten short prompts growing to 44 tokens in 16 blocks: admitted together (a prompt needs a
    block), they outgrow the pool even with the window's releases; the preempted ones are
    recomputed and released again, with the same tokens."""
    sched = make_sched(sliding_window=WINDOW, block_size=BLOCK, num_blocks=16)
    reqs = [make_req([(5 * i + t) % 50 for t in range(4)], max_tokens=40) for i in range(10)]
    outputs = run(sched, [reqs], runner=WindowedRunner(sched))
    assert sched.num_preemptions > 0
    for req in reqs:
        assert outputs[req.request_id] == reference(req, sched.max_model_len)


def test_hybrid_model_bounds_its_windowed_group_only() -> None:
    """Global and windowed layers in separate groups: the global group keeps each request's
    every block (its layers read them all), the windowed group about a window of them; the
    tokens are the reference's, and everything goes back at the end."""
    budget = 8
    groups = (KVGroupSpec(64), KVGroupSpec(12, WINDOW))
    sched = make_sched(kv_groups=groups, block_size=BLOCK, max_num_batched_tokens=budget)
    kv = sched.kv_cache_manager
    reqs = [make_req([(3 * i + t) % 50 for t in range(32)], max_tokens=20) for i in range(2)]
    bound = -(-(WINDOW + budget) // BLOCK) + 1
    most = [0, 0]

    def on_step(out: SchedulerOutput) -> None:
        for req in sched.running:
            whole, windowed = kv.num_held_blocks(req)
            assert whole == len(kv.get_block_ids(req)[0])  # never released
            assert windowed <= bound, (req.request_id, windowed)
            most[0], most[1] = max(most[0], whole), max(most[1], windowed)

    outputs = run(sched, [reqs], on_step=on_step, runner=WindowedRunner(sched))
    for req in reqs:
        assert outputs[req.request_id] == reference(req, sched.max_model_len)
    assert most[0] >= -(-51 // BLOCK) and most[1] >= WINDOW // BLOCK
    # 12 windowed blocks do not hold both requests whole, yet nothing was preempted
    assert sched.num_preemptions == 0
    assert sched.max_model_len == min(256, 64 * BLOCK)  # the global pool caps the context
    assert kv.num_free_blocks == kv.num_blocks


def test_hybrid_prefix_hit_needs_only_the_window_in_the_windowed_group() -> None:
    """A follow-up turn hits the whole conversation in the global group while the windowed group
    serves only the window behind it (its earlier blocks were released, some evicted since)."""
    groups = (KVGroupSpec(64), KVGroupSpec(16, WINDOW))
    sched = make_sched(kv_groups=groups, block_size=BLOCK)
    first = make_req(list(range(40)), max_tokens=2)
    runner = WindowedRunner(sched)
    run(sched, [[first]], runner=runner)
    # another request takes every windowed block, evicting the released early ones
    other = make_req([49] * 30, max_tokens=1)
    run(sched, [[other]], runner=runner)
    follow_up = make_req(list(range(40)) + first.output_token_ids + [3, 4], max_tokens=3)
    (whole, windowed), num_hit = sched.kv_cache_manager.get_computed_blocks(follow_up)
    assert num_hit == 40 and len(whole) == len(windowed) == 10
    null = sched.kv_cache_manager.groups[1].null_block.block_id
    first_visible = (40 - WINDOW + 1) // BLOCK
    assert windowed[:first_visible] == [null] * first_visible
    assert null not in windowed[first_visible:]
    outputs = run(sched, [[follow_up]], runner=runner)
    assert outputs[follow_up.request_id] == reference(follow_up, sched.max_model_len)

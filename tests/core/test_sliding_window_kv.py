"""Sliding-window attention in the KV cache manager: blocks behind every layer's window go back
to the pool, so a request's KV stays bounded by the window whatever its length, while the KV
inside the window is never touched by anyone else."""

from __future__ import annotations

from sched_utils import ROOT, make_req, make_sched, mix, next_token, reference, run

from tokenmill.core.sched_types import ModelRunnerOutput, SchedulerOutput

WINDOW, BLOCK = 8, 4


class WindowedRunner:
    """Like the scheduler tests' fake model, but attention reads only the last WINDOW
    positions: each query checks those slots against the reference chain (so KV inside the
    window is intact) and never reads a slot behind it (those blocks may belong to others)."""

    def __init__(self, null_block: int) -> None:
        self.slots: dict[tuple[int, int], int] = {}
        self.null_block = null_block

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        sampled: dict[str, list[int]] = {}
        for seq in out.seqs:
            chain = [ROOT]
            for token in seq.req.token_slice(0, seq.start_pos + seq.num_tokens):
                chain.append(mix(chain[-1], token))  # chain[p + 1]: the KV of position p
            for j in range(seq.num_tokens):
                pos = seq.start_pos + j
                block = seq.block_ids[pos // BLOCK]
                assert block != self.null_block, "a new token's slot was released"
                self.slots[block, pos % BLOCK] = chain[pos + 1]
                for key in range(max(0, pos - WINDOW + 1), pos):  # the window's earlier keys
                    key_block = seq.block_ids[key // BLOCK]
                    assert key_block != self.null_block, f"key {key} in the window released"
                    assert self.slots[key_block, key % BLOCK] == chain[key + 1], "corrupt KV"
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
            held = kv.num_held_blocks(req)
            most = max(most, held)
            assert held <= bound, (req.request_id, held)

    outputs = run(sched, [reqs], on_step=on_step, runner=WindowedRunner(kv.null_block.block_id))
    for req in reqs:
        assert outputs[req.request_id] == reference(req, sched.max_model_len)
    assert sched.num_preemptions == 0
    assert most >= WINDOW // BLOCK  # the window itself stays held
    assert kv.block_pool.num_free_blocks == 24  # everything back at the end


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
    run(sched, [[first]], runner=WindowedRunner(sched.kv_cache_manager.null_block.block_id))
    follow_up = make_req(list(range(40)) + first.output_token_ids + [3, 4], max_tokens=1)
    block_ids, num_hit = sched.kv_cache_manager.get_computed_blocks(follow_up)
    assert num_hit == 40 and len(block_ids) == 10


def test_preemption_with_a_window_gives_the_same_tokens() -> None:
    """Ten short prompts growing to 44 tokens in 16 blocks: admitted together (a prompt needs a
    block), they outgrow the pool even with the window's releases; the preempted ones are
    recomputed and released again, with the same tokens."""
    sched = make_sched(sliding_window=WINDOW, block_size=BLOCK, num_blocks=16)
    reqs = [make_req([(5 * i + t) % 50 for t in range(4)], max_tokens=40) for i in range(10)]
    outputs = run(sched, [reqs], runner=WindowedRunner(sched.kv_cache_manager.null_block.block_id))
    assert sched.num_preemptions > 0
    for req in reqs:
        assert outputs[req.request_id] == reference(req, sched.max_model_len)

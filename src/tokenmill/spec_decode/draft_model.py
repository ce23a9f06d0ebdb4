"""Draft-model proposer: a smaller model with the target's vocabulary drafts greedily.

The draft model has its own ModelRunner and paged KV cache (a plain free list of blocks: its
requests never share blocks). Per request it remembers which tokens its cache holds, so each step
feeds only what changed since its last drafts: the tokens the target accepted or sampled after
them. Drafts the target rejected are dropped the same way the target drops them, by not
counting them; their slots are rewritten. One forward catches every request up and gives its
first draft token, then one decode forward per further draft token, all requests batched.

Greedy drafts are deterministic (q one-hot), so verification is exact for any temperature.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass

from tokenmill.config import EngineConfig, ModelConfig
from tokenmill.core.sched_types import ScheduledSeq, SchedulerOutput
from tokenmill.loader.model_loader import load_model
from tokenmill.request import Request
from tokenmill.sampling_params import SamplingParams
from tokenmill.spec_decode.proposer import Proposer
from tokenmill.worker.kv_cache import DEFAULT_CPU_KV_GB, KVCacheBudget
from tokenmill.worker.model_runner import ModelRunner


@dataclass
class _DraftSeq:
    shadow: Request  # what the draft runner sees: greedy, no penalties, same token ids
    blocks: list[int]  # the draft cache's blocks, position p in blocks[p // block_size]
    cached: list[int]  # tokens whose KV the draft cache holds, at positions 0 .. len - 1


class DraftModelProposer(Proposer):
    def __init__(self, runner: ModelRunner, block_size: int, num_blocks: int) -> None:
        self.runner = runner
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))
        self._seqs: dict[str, _DraftSeq] = {}
        self._ids = itertools.count()

    @classmethod
    def load(
        cls, config: EngineConfig, target: ModelConfig, max_model_len: int
    ) -> DraftModelProposer:
        """The draft model named by `config.speculative_model`, loaded like the target (same
        dtype, device and quantization rules); it must share the target's vocabulary."""
        if not config.speculative_model:
            raise ValueError("speculative='draft' needs speculative_model (a draft model path)")
        draft_config = dataclasses.replace(
            config, model=config.speculative_model, speculative=None, speculative_model=None
        )
        loaded = load_model(draft_config)
        if loaded.model_config.vocab_size != target.vocab_size:
            raise ValueError(
                f"the draft model's vocabulary ({loaded.model_config.vocab_size} tokens) differs "
                f"from the target's ({target.vocab_size}); a draft model must share it"
            )
        block_size = config.block_size
        # Room for every running request at full length plus its drafts, within the same
        # memory budget as the target's cache (a draft model's KV is usually far smaller).
        max_len = max_model_len + config.num_speculative_tokens + 1
        runner = ModelRunner(
            loaded.model_config,
            loaded.weights,
            dtype=loaded.dtype,
            max_model_len=max_len,
            kv_budget=KVCacheBudget(
                memory_gb=config.kv_cache_memory_gb or DEFAULT_CPU_KV_GB,
                max_blocks=config.max_num_seqs * math.ceil(max_len / block_size),
            ),
            block_size=block_size,
            device=config.device,
            quant=loaded.quant,
            attention_backend=config.attention_backend,
            split_kv_groups=False,  # one table per request, blocks never released (_reserve)
        )
        return cls(runner, block_size, runner.num_blocks)

    def propose(self, reqs: list[Request], max_drafts: list[int]) -> list[list[int]]:
        drafts: list[list[int]] = [[] for _ in reqs]
        live: list[tuple[int, _DraftSeq, int]] = []  # (index, its draft seq, draft budget)
        catch_up: list[ScheduledSeq] = []
        for i, (req, k) in enumerate(zip(reqs, max_drafts, strict=True)):
            seq = self._seq(req)
            tokens = req.all_token_ids
            # Keep the cached prefix the target agrees with; always feed the last token, whose
            # logits give the first draft.
            keep = min(_common_prefix(seq.cached, tokens), len(tokens) - 1)
            del seq.cached[keep:]
            # positions up to the last draft fed back (the k-th draft is never fed)
            if not self._reserve(seq, len(tokens) + k - 1):
                continue  # draft cache full: this request goes without drafts this step
            catch_up.append(ScheduledSeq(seq.shadow, tokens[keep:], keep, (seq.blocks,), True))
            seq.cached = list(tokens)
            live.append((i, seq, k))
        sampled = self._run(catch_up)
        for i, seq, _ in live:
            drafts[i].append(sampled[seq.shadow.request_id])
        for step in range(1, max((k for *_, k in live), default=0)):
            going = [(i, seq) for i, seq, k in live if k > step]
            feed = [
                ScheduledSeq(seq.shadow, [drafts[i][-1]], len(seq.cached), (seq.blocks,), True)
                for i, seq in going
            ]
            sampled = self._run(feed)
            for i, seq in going:
                seq.cached.append(drafts[i][-1])
                drafts[i].append(sampled[seq.shadow.request_id])
        return drafts

    def finish(self, req_ids: Iterable[str]) -> None:
        for req_id in req_ids:
            seq = self._seqs.pop(req_id, None)
            if seq is not None:
                self._free.extend(reversed(seq.blocks))

    def _seq(self, req: Request) -> _DraftSeq:
        seq = self._seqs.get(req.request_id)
        if seq is None:
            shadow = Request(
                f"draft-{next(self._ids)}",
                [],
                SamplingParams(temperature=0.0),
                max_tokens=1,
            )
            seq = self._seqs[req.request_id] = _DraftSeq(shadow, [], [])
        return seq

    def _reserve(self, seq: _DraftSeq, num_positions: int) -> bool:
        need = math.ceil(num_positions / self.block_size) - len(seq.blocks)
        if need > len(self._free):
            return False
        for _ in range(need):
            seq.blocks.append(self._free.pop())
        return True

    def _run(self, seqs: list[ScheduledSeq]) -> dict[str, int]:
        if not seqs:
            return {}
        out = self.runner.execute(SchedulerOutput(seqs, sum(s.num_tokens for s in seqs)))
        return {rid: ids[0] for rid, ids in out.sampled_token_ids.items()}


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n

"""Runs one scheduled step: packs inputs, runs the model, samples. Never sees text."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from tokenmill.config import ModelConfig
from tokenmill.core.kv_group import KVGroupSpec
from tokenmill.core.sched_types import ModelRunnerOutput, ScheduledSeq, SchedulerOutput
from tokenmill.errors import ModelLoadError
from tokenmill.kernels.cpu_fused import load_cpu_fused
from tokenmill.layers.attention import PagedAttention
from tokenmill.layers.attn_backends import select_backend
from tokenmill.layers.expert_cache import ExpertCache, ExpertCacheStats
from tokenmill.layers.expert_source import mapped_experts
from tokenmill.layers.linear import Linear
from tokenmill.layers.moe import offload_experts
from tokenmill.layers.tensor_parallel import TPGroup
from tokenmill.models.registry import build_model
from tokenmill.models.tp_shard import local_kv_config, shard_model
from tokenmill.quant.base import QuantScheme
from tokenmill.request import Request
from tokenmill.sampling.rejection import verify_drafts
from tokenmill.sampling.sampler import Sampler, SamplingRow, prompt_logprobs
from tokenmill.sampling_params import SamplingParams
from tokenmill.worker.cuda_graph import DecodeGraphs
from tokenmill.worker.input_batch import InputBatch, build_input_batch
from tokenmill.worker.kv_cache import (
    KVCacheBudget,
    allocate_kv_cache,
    plan_kv_groups,
    size_kv_cache,
    split_kv_blocks,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuOptions:
    """The step limits the runner plans for: CUDA graphs, the profiling forward, and the share
    of the KV cache that sliding-window layers get (which they size on every device)."""

    enforce_eager: bool = False
    max_num_seqs: int = 128  # the largest decode batch: CUDA graphs are captured up to it
    max_num_batched_tokens: int = 512  # the profiling forward's size


@dataclass(frozen=True)
class ExpertOffload:
    """MoE expert offloading (see layers/expert_cache.py)."""

    memory_gb: float
    policy: str = "lru"
    prefetch: bool = False
    miss_bits: int | None = None  # mixed-precision misses (lossy): 4 or 2
    miss_threshold: float = 0.2


class ModelRunner:
    def __init__(
        self,
        model_config: ModelConfig,
        weights: Iterable[tuple[str, torch.Tensor]],
        *,
        dtype: torch.dtype,
        max_model_len: int,
        kv_budget: KVCacheBudget,
        block_size: int,
        device: str = "cpu",
        quant: QuantScheme = None,
        batch_invariant: bool = False,
        attention_backend: str = "auto",
        gpu: GpuOptions | None = None,
        split_kv_groups: bool = True,
        experts: ExpertOffload | None = None,
        tp: TPGroup | None = None,
    ) -> None:
        """`split_kv_groups`: a model that mixes sliding-window and global layers gets a KV
        cache group per window (its windowed layers' blocks are released as they slide out);
        False keeps one group and one block table for every layer. `experts`: the MoE expert
        offloading options (None: every expert resident). `tp`: this rank's place in a
        tensor-parallel group (None: the whole model here); every rank builds its runner at
        the same time, since the KV cache size is agreed between them."""
        self.model_config = model_config
        self.dtype = dtype
        self.device = device
        self.block_size = block_size
        self.max_model_len = max_model_len
        gpu = gpu or GpuOptions()
        # Picked once: every attention layer runs this backend and every step builds its metadata.
        self.attn_backend = select_backend(
            attention_backend,
            device,
            head_dim=model_config.head_dim,
            dtype=dtype,
            batch_invariant=batch_invariant,
        )
        try:
            # Parameters allocated where they will live; offloaded experts left in the
            # checkpoint's memory map until a slot loads them.
            with torch.device(device), mapped_experts(experts is not None):
                self.model = build_model(model_config, dtype, max_model_len, quant)
            self.model.load_weights(weights)
        except torch.OutOfMemoryError as e:
            raise ModelLoadError(
                f"the model's weights do not fit on {device} ({e}); use a smaller model, a "
                "quantized checkpoint, or another device"
            ) from e
        self.model.eval()
        kv_config = model_config  # the heads this process's KV cache holds
        if tp is not None:
            kv_config = local_kv_config(model_config, shard_model(self.model, tp))
        self._process_weights(batch_invariant)
        self.expert_cache: ExpertCache | None = None
        if experts is not None:
            self.expert_cache = offload_experts(
                self.model, int(experts.memory_gb * 2**30), experts.policy, experts.prefetch,
                device, experts.miss_bits, experts.miss_threshold,
            )  # fmt: skip
            if self.expert_cache is not None:
                cache = self.expert_cache
                logger.info(
                    "expert offloading: %d of %d experts resident (%d slots x %.1f MiB), %s%s",
                    cache.num_slots, sum(len(x) for x in cache.layers), cache.num_slots,
                    cache.expert_bytes / 2**20, experts.policy,
                    " + prefetch" if experts.prefetch else "",
                )  # fmt: skip
                if cache.low_precision is not None:
                    logger.info(
                        "expert misses under routing weight %g run int%d copies (%.1f MiB "
                        "beside the budget)", experts.miss_threshold, experts.miss_bits,
                        cache.low_precision_bytes / 2**20,
                    )  # fmt: skip
        if device == "cpu" and dtype == torch.bfloat16:
            load_cpu_fused()  # built (or loaded from cache) now, not inside the first request
        self.attn_layers = [m for m in self.model.modules() if isinstance(m, PagedAttention)]
        self.kv_layout = plan_kv_groups(
            [attn.sliding_window for attn in self.attn_layers], split_kv_groups
        )
        # The budget in blocks of every layer, which the groups then share out.
        self.kv_config = kv_config
        if tp is not None:
            tp.startup_barrier()  # every rank loaded: the profiling forward's collectives run
        self.num_blocks = size_kv_cache(
            kv_budget, kv_config, block_size, dtype, max_model_len, device,
            profile=lambda: self._profile_run(gpu),
        )  # fmt: skip
        if tp is not None:  # ranks with fewer KV heads could hold more: the smallest rules
            self.num_blocks = tp.startup_min(self.num_blocks)
        counts = split_kv_blocks(
            self.num_blocks, self.kv_layout, block_size, gpu.max_num_seqs,
            gpu.max_num_batched_tokens,
        )  # fmt: skip
        self.kv_groups = tuple(
            KVGroupSpec(n, g.sliding_window) for n, g in zip(counts, self.kv_layout, strict=True)
        )
        # One more block per group than the scheduler knows of: the null block that released
        # entries point at and CUDA graphs' padding rows write to. No request ever owns it.
        self.null_blocks = counts
        self.kv_caches = [
            allocate_kv_cache(kv_config, n + 1, block_size, dtype, device, len(g.layers))
            for n, g in zip(counts, self.kv_layout, strict=True)
        ]
        self._bind_cache(self.kv_caches)
        self.sampler = Sampler()
        # Decode-only steps on the GPU run padded to a graph's batch size over static buffers;
        # enforce_eager runs the very same padded batches without capturing, so each matmul and
        # attention launch sees the same shapes and the tokens are identical.
        self.graphs: DecodeGraphs | None = None
        if self.expert_cache is not None:
            self.expert_cache.stats = ExpertCacheStats()  # not the profiling forward's
        # Offloaded experts are looked up on the host in every step: no CUDA graphs.
        graphs_ok = self.attn_backend.cuda_graphs and self.expert_cache is None
        if device.startswith("cuda") and graphs_ok and tp is None:
            self.graphs = self.decode_graphs(gpu.max_num_seqs, capture=not gpu.enforce_eager)

    def decode_graphs(self, max_batch: int, capture: bool) -> DecodeGraphs | None:
        """CUDA graphs of decode steps up to max_batch rows (`capture=False`: the same padded
        static buffers, run eagerly); None where the attention backend cannot be captured."""
        max_blocks = -(-self.max_model_len // self.block_size)
        buffers = [
            self.attn_backend.graph_buffers(max_batch, max_blocks, null, self.device)
            for null in self.null_blocks
        ]
        if any(b is None for b in buffers):
            return None
        return DecodeGraphs(
            self.model,
            buffers,  # type: ignore[arg-type]  # none is None
            max_batch=max_batch,
            block_size=self.block_size,
            null_blocks=self.null_blocks,
            device=self.device,
            capture=capture,
        )

    def _process_weights(self, batch_invariant: bool) -> None:
        weight_bytes: dict[str, int] = {}
        for module in self.model.modules():
            if isinstance(module, Linear):
                module.quant_method.process_after_loading(module)
                module.batch_invariant = batch_invariant
                kind = module.quant_method.describe(module)
                weight_bytes[kind] = weight_bytes.get(kind, 0) + module.weight_bytes
        logger.info(
            "linear weights: %s",
            ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sorted(weight_bytes.items())),
        )

    def _bind_cache(self, kv_caches: list[torch.Tensor]) -> None:
        for g, (group, cache) in enumerate(zip(self.kv_layout, kv_caches, strict=True)):
            for j, i in enumerate(group.layers):
                # [num_blocks, block_size, H_kv, D] each
                self.attn_layers[i].bind(self.attn_backend, cache[j, 0], cache[j, 1], g)

    def prepare(self, seqs: list[ScheduledSeq]) -> InputBatch:
        """The packed tensors and attention metadata of one step."""
        return build_input_batch(seqs, self.block_size, self.device, self.attn_backend)

    @torch.inference_mode()
    def _profile_run(self, gpu: GpuOptions) -> None:
        """The largest step: max_num_batched_tokens prompt tokens in sequences of at most
        max_model_len, with a throw-away cache just big enough, then max_num_seqs logit rows."""
        num_tokens = gpu.max_num_batched_tokens
        seqs, block = [], 0
        for start in range(0, num_tokens, self.max_model_len):
            n = min(self.max_model_len, num_tokens - start)
            used = -(-n // self.block_size)
            table = list(range(block, block + used))
            seqs.append(_profile_seq(n, (table,) * len(self.kv_layout)))
            block += used
        cfg = self.kv_config
        cache = [
            allocate_kv_cache(cfg, block, self.block_size, self.dtype, self.device, len(g.layers))
            for g in self.kv_layout
        ]
        self._bind_cache(cache)
        batch = self.prepare(seqs)
        hidden = self.model(batch.input_ids, batch.positions, batch.ctx)
        rows = min(gpu.max_num_seqs, num_tokens)
        logits = self.model.compute_logits(hidden[:rows])
        torch.softmax(logits, dim=-1)  # the sampler's biggest temporary
        del cache, hidden, logits

    def forward(self, batch: InputBatch) -> torch.Tensor:
        if self.graphs is not None and self.graphs.can_run(batch):
            return self.graphs.run(batch)
        return self.model(batch.input_ids, batch.positions, batch.ctx)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        batch = self.prepare(sched.seqs)
        return self._execute(batch, logit_plan(batch))

    def _execute(self, batch: InputBatch, plan: LogitPlan) -> ModelRunnerOutput:
        hidden = self.forward(batch)  # [T, hidden]
        sample_rows, sample_seqs, plp_spans = plan
        out = ModelRunnerOutput(sampled_token_ids={})
        if sample_rows:
            logits = self.model.compute_logits(hidden[sample_rows])  # [num_rows, vocab]
            rows = [
                SamplingRow(
                    params=s.req.sampling_params,
                    seed=s.req.seed,
                    prompt_token_ids=s.req.prompt_token_ids,
                    output_token_ids=s.req.output_token_ids,
                    eos_token_ids=s.req.eos_token_ids,
                    grammar=s.req.grammar,  # type: ignore[arg-type]  (a token-level matcher)
                )
                for s in sample_seqs
            ]
            drafts = [s.draft_token_ids for s in sample_seqs]
            token_ids, logprobs = verify_drafts(self.sampler, logits, rows, drafts)
            for s, toks, lps in zip(sample_seqs, token_ids, logprobs, strict=True):
                out.sampled_token_ids[s.req.request_id] = toks
                if lps is not None:
                    out.logprobs[s.req.request_id] = lps
        for s, start, n, targets in plp_spans:
            logits = self.model.compute_logits(hidden[start : start + n])  # [n, vocab]
            k = s.req.sampling_params.prompt_logprobs or 0
            out.prompt_logprobs[s.req.request_id] = prompt_logprobs(logits, targets, k)
        return out


# (sample rows, their seqs, prompt-logprob spans: (seq, first row, rows, target ids))
LogitPlan = tuple[list[int], list[ScheduledSeq], list[tuple[ScheduledSeq, int, int, list[int]]]]


def logit_plan(batch: InputBatch) -> LogitPlan:
    """Rows whose logits the step needs: the last row of every sampling seq and the rows of
    its drafts, and the prompt rows of seqs that asked for prompt logprobs."""
    sample_rows: list[int] = []
    sample_seqs: list[ScheduledSeq] = []
    plp_spans: list[tuple[ScheduledSeq, int, int, list[int]]] = []
    for s, start in zip(batch.seqs, batch.token_starts, strict=True):
        if s.sample:
            end = start + s.num_tokens
            sample_rows.extend(range(end - 1 - s.num_draft_tokens, end))
            sample_seqs.append(s)
        k = s.req.sampling_params.prompt_logprobs
        if k is not None:
            num_prompt = s.req.num_prompt_tokens
            n = min(s.start_pos + s.num_tokens, num_prompt - 1) - s.start_pos
            if n > 0:
                targets = s.req.prompt_token_ids[s.start_pos + 1 : s.start_pos + 1 + n]
                plp_spans.append((s, start, n, targets))
    return sample_rows, sample_seqs, plp_spans


def _profile_seq(num_tokens: int, block_ids: tuple[list[int], ...]) -> ScheduledSeq:
    req = Request("profile", [0] * num_tokens, SamplingParams(max_tokens=1), max_tokens=1)
    return ScheduledSeq(req, req.prompt_token_ids, 0, block_ids, sample=True)

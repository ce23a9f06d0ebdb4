"""Runs one scheduled step: packs inputs, runs the model, samples. Never sees text."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

from tokenmill.config import ModelConfig
from tokenmill.core.sched_types import ModelRunnerOutput, ScheduledSeq, SchedulerOutput
from tokenmill.layers.attention import PagedAttention
from tokenmill.layers.attn_backends.cpu_ext import (
    load_cpu_attention,
    paged_decode_attention,
    paged_prefill_attention,
    supports,
)
from tokenmill.layers.fused import load_cpu_fused
from tokenmill.layers.linear import Linear
from tokenmill.models.registry import build_model
from tokenmill.sampling.rejection import verify_drafts
from tokenmill.sampling.sampler import Sampler, SamplingRow, prompt_logprobs
from tokenmill.worker.input_batch import build_input_batch
from tokenmill.worker.kv_cache import allocate_kv_cache

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(
        self,
        model_config: ModelConfig,
        weights: Iterable[tuple[str, torch.Tensor]],
        *,
        dtype: torch.dtype,
        max_model_len: int,
        num_blocks: int,
        block_size: int,
        device: str = "cpu",
        batch_invariant: bool = False,
        use_cpu_kernels: bool = True,
    ) -> None:
        self.model_config = model_config
        self.dtype = dtype
        self.device = device
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.model = build_model(model_config, dtype, max_model_len).to(device)
        self.model.load_weights(weights)
        self.model.eval()
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
        if device == "cpu" and dtype == torch.bfloat16:
            load_cpu_fused()  # built (or loaded from cache) now, not inside the first request
        self.kv_cache = allocate_kv_cache(model_config, num_blocks, block_size, dtype, device)
        decode_kernel = None
        kernel_ok = supports(model_config.head_dim, dtype)
        if device == "cpu" and use_cpu_kernels and kernel_ok and load_cpu_attention() is not None:
            decode_kernel = paged_decode_attention
        attn_layers = [m for m in self.model.modules() if isinstance(m, PagedAttention)]
        for i, attn in enumerate(attn_layers):
            attn.k_cache = self.kv_cache[i, 0]  # [num_blocks, block_size, H_kv, D]
            attn.v_cache = self.kv_cache[i, 1]
            attn.decode_kernel = decode_kernel
            if batch_invariant and decode_kernel is not None:
                attn.prefill_kernel = paged_prefill_attention
        self.sampler = Sampler()

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        batch = build_input_batch(sched.seqs, self.block_size, self.device)
        hidden = self.model(batch.input_ids, batch.positions, batch.ctx)  # [T, hidden]

        # Rows whose logits we need: the last row of every sampling seq and the rows of its
        # drafts, and the prompt rows of seqs that asked for prompt logprobs.
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

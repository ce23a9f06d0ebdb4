"""Runs one scheduled step: packs inputs, runs the model, samples. Never sees text."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from tokenmill.config import ModelConfig
from tokenmill.core.sched_types import ModelRunnerOutput, ScheduledSeq, SchedulerOutput
from tokenmill.errors import ModelLoadError
from tokenmill.layers.attention import PagedAttention
from tokenmill.layers.attn_backends import triton_available
from tokenmill.layers.attn_backends.cpu_ext import (
    load_cpu_attention,
    paged_decode_attention,
    paged_prefill_attention,
    supports,
)
from tokenmill.layers.fused import load_cpu_fused
from tokenmill.layers.linear import Linear
from tokenmill.models.registry import build_model
from tokenmill.request import Request
from tokenmill.sampling.rejection import verify_drafts
from tokenmill.sampling.sampler import Sampler, SamplingRow, prompt_logprobs
from tokenmill.sampling_params import SamplingParams
from tokenmill.worker.cuda_graph import DecodeGraphs
from tokenmill.worker.gpu_memory import kv_blocks_from_free_memory
from tokenmill.worker.input_batch import InputBatch, build_input_batch
from tokenmill.worker.kv_cache import allocate_kv_cache

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuOptions:
    enforce_eager: bool = False
    memory_utilization: float = 0.9
    max_num_seqs: int = 128  # the largest decode batch: CUDA graphs are captured up to it
    max_num_batched_tokens: int = 512  # the profiling forward's size


class ModelRunner:
    def __init__(
        self,
        model_config: ModelConfig,
        weights: Iterable[tuple[str, torch.Tensor]],
        *,
        dtype: torch.dtype,
        max_model_len: int,
        num_blocks: int | None,
        block_size: int,
        device: str = "cpu",
        batch_invariant: bool = False,
        use_cpu_kernels: bool = True,
        attention_backend: str = "auto",
        gpu: GpuOptions | None = None,
    ) -> None:
        """`num_blocks` None: size the KV cache from the GPU's free memory (cuda only)."""
        self.model_config = model_config
        self.dtype = dtype
        self.device = device
        self.block_size = block_size
        self.max_model_len = max_model_len
        gpu = gpu or GpuOptions()
        on_cuda = device.startswith("cuda")
        backend = _attention_backend(attention_backend, device, use_cpu_kernels)
        self.unified = backend in ("triton", "unified-ref")
        try:
            with torch.device(device):  # parameters allocated where they will live
                self.model = build_model(model_config, dtype, max_model_len)
            self.model.load_weights(weights)
        except torch.OutOfMemoryError as e:
            raise ModelLoadError(
                f"the model's weights do not fit on {device} ({e}); use a smaller model, a "
                "quantized checkpoint, or another device"
            ) from e
        self.model.eval()
        self._process_weights(batch_invariant)
        if device == "cpu" and dtype == torch.bfloat16:
            load_cpu_fused()  # built (or loaded from cache) now, not inside the first request
        attn_layers = [m for m in self.model.modules() if isinstance(m, PagedAttention)]
        for attn in attn_layers:
            _bind_kernels(attn, backend, dtype, batch_invariant)
        if num_blocks is None:
            if not on_cuda:
                raise ValueError("num_blocks is required off the GPU")
            num_blocks = kv_blocks_from_free_memory(
                lambda: self._profile_run(gpu, attn_layers), model_config, block_size, dtype,
                max_model_len, gpu.memory_utilization, torch.device(device),
            )  # fmt: skip
        self.num_blocks = num_blocks
        # One more block than the scheduler knows of: the null block that CUDA graphs' padding
        # rows write to. No request ever owns it.
        self.null_block = num_blocks
        self.kv_cache = allocate_kv_cache(model_config, num_blocks + 1, block_size, dtype, device)
        self._bind_cache(attn_layers, self.kv_cache)
        self.sampler = Sampler()
        # Decode-only steps on the GPU run padded to a graph's batch size over static buffers;
        # enforce_eager runs the very same padded batches without capturing, so each matmul and
        # attention launch sees the same shapes and the tokens are identical.
        self.graphs: DecodeGraphs | None = None
        if on_cuda and backend == "triton":
            self.graphs = DecodeGraphs(
                self.model,
                max_batch=gpu.max_num_seqs,
                max_blocks=-(-max_model_len // block_size),
                block_size=block_size,
                null_block=self.null_block,
                device=device,
                capture=not gpu.enforce_eager,
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

    @staticmethod
    def _bind_cache(attn_layers: list[PagedAttention], kv_cache: torch.Tensor) -> None:
        for i, attn in enumerate(attn_layers):
            attn.k_cache = kv_cache[i, 0]  # [num_blocks, block_size, H_kv, D]
            attn.v_cache = kv_cache[i, 1]

    @torch.inference_mode()
    def _profile_run(self, gpu: GpuOptions, attn_layers: list[PagedAttention]) -> None:
        """The largest step: max_num_batched_tokens prompt tokens in sequences of at most
        max_model_len, with a throw-away cache just big enough, then max_num_seqs logit rows."""
        num_tokens = gpu.max_num_batched_tokens
        seqs, block = [], 0
        for start in range(0, num_tokens, self.max_model_len):
            n = min(self.max_model_len, num_tokens - start)
            used = -(-n // self.block_size)
            seqs.append(_profile_seq(n, list(range(block, block + used))))
            block += used
        cfg = self.model_config
        cache = allocate_kv_cache(cfg, block, self.block_size, self.dtype, self.device)
        self._bind_cache(attn_layers, cache)
        batch = build_input_batch(seqs, self.block_size, self.device, unified=self.unified)
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
        batch = build_input_batch(sched.seqs, self.block_size, self.device, self.unified)
        hidden = self.forward(batch)  # [T, hidden]

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


def _attention_backend(name: str, device: str, use_cpu_kernels: bool) -> str:
    """Resolves "auto" and checks the choice against the device."""
    on_cuda = device.startswith("cuda")
    if name == "auto":
        if on_cuda:
            return "triton" if triton_available() else "sdpa"
        cpu_ok = use_cpu_kernels and load_cpu_attention() is not None
        return "cpu" if cpu_ok else "sdpa"
    if name == "cpu" and on_cuda:
        raise ValueError("attention_backend='cpu' runs on the CPU only; use triton or sdpa")
    if name == "cpu" and load_cpu_attention() is None:
        raise ValueError("attention_backend='cpu': the C++ attention kernel could not be built")
    if name == "triton" and not triton_available():
        raise ValueError("attention_backend='triton' needs the triton package (pip install triton)")
    if name == "triton" and not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "attention_backend='triton' runs on a CUDA device (on the CPU only under Triton's "
            "slow interpreter, TRITON_INTERPRET=1, for tests); use cpu or sdpa here"
        )
    return name


def _bind_kernels(
    attn: PagedAttention, backend: str, dtype: torch.dtype, batch_invariant: bool
) -> None:
    if backend == "cpu" and supports(attn.head_dim, dtype):  # else the reference path
        attn.decode_kernel = paged_decode_attention
        if batch_invariant:
            attn.prefill_kernel = paged_prefill_attention
    elif backend == "triton":
        from tokenmill.layers.attn_backends.triton_attn import paged_attention

        # The decode path splits long rows over as many programs as fill the GPU, a count that
        # depends on the batch; batch-invariant mode keeps one split per row.
        attn.unified_kernel = (
            functools.partial(paged_attention, num_splits=1) if batch_invariant else paged_attention
        )
    elif backend == "unified-ref":
        from tokenmill.layers.attn_backends.unified_ref import reference_paged_attention

        attn.unified_kernel = reference_paged_attention


def _profile_seq(num_tokens: int, block_ids: list[int]) -> ScheduledSeq:
    req = Request("profile", [0] * num_tokens, SamplingParams(max_tokens=1), max_tokens=1)
    return ScheduledSeq(req, req.prompt_token_ids, 0, block_ids, sample=True)

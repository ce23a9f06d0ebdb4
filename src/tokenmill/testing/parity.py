"""Parity with transformers: run tokenmill and a transformers model on the same token ids, then
compare their logits (or greedy tokens).

Our side runs the model's own forward over the paged KV cache and keeps the logits of every
prompt position (the engine itself only computes the positions it samples): `prefill_logits`
for a bare model with its cache attached, `engine_prefill_logits` for an `LLM`'s model and
cache. The transformers side (`hf_logits`, `hf_greedy`, `hf_model_from_gguf`) imports
transformers lazily: it is a test dependency. `logits_diff`, `assert_logits_close` and
`assert_prefill_matches_hf` compare.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tokenmill.config import ModelConfig
from tokenmill.core.sched_types import ScheduledSeq
from tokenmill.layers.attention import PagedAttention
from tokenmill.layers.attn_backends.base import AttentionBackend
from tokenmill.layers.attn_backends.sdpa import SdpaBackend
from tokenmill.request import Request
from tokenmill.sampling_params import SamplingParams
from tokenmill.worker.input_batch import build_input_batch
from tokenmill.worker.kv_cache import allocate_kv_cache

if TYPE_CHECKING:
    from tokenmill.engine.llm import LLM


def bind_kv_cache(
    model: torch.nn.Module,
    cfg: ModelConfig,
    block_size: int,
    backend: AttentionBackend | None = None,
    num_blocks: int = 64,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Gives every attention layer of a bare model (no runner) its slice of a fresh CPU paged
    cache and `backend` (the PyTorch reference by default), as the runner does; returns the
    cache [layers, 2, num_blocks, block_size, H_kv, D]."""
    backend = backend or SdpaBackend()
    kv = allocate_kv_cache(cfg, num_blocks, block_size, dtype, "cpu")
    layers = [m for m in model.modules() if isinstance(m, PagedAttention)]
    for i, attn in enumerate(layers):
        attn.bind(backend, kv[i, 0], kv[i, 1])
    return kv


@torch.inference_mode()
def prefill_logits(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    block_tables: Sequence[Sequence[int]],
    block_size: int,
    device: str = "cpu",
    chunk: int | None = None,
) -> list[torch.Tensor]:
    """Our model's float32 logits at every position of each prompt: [len(prompt), vocab] each.

    All prompts run together, `chunk` tokens of each per forward step (a whole prompt in one
    step when None), so every chunk after the first reads the earlier ones' KV through the paged
    cache. Prompt i is written to the blocks block_tables[i] (enough of them for the prompt) of
    the KV cache bound to `model`'s attention layers (in every KV cache group they are bound
    to), through their attention backend.
    """
    layers = [m for m in model.modules() if isinstance(m, PagedAttention)]
    num_groups = 1 + max(attn.kv_group for attn in layers)
    tables = [(list(table),) * num_groups for table in block_tables]
    return _prefill_logits(model, prompts, tables, block_size, device, chunk)


def _prefill_logits(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    block_tables: Sequence[tuple[list[int], ...]],
    block_size: int,
    device: str,
    chunk: int | None,
) -> list[torch.Tensor]:
    """`prefill_logits` with a block table per KV cache group for each prompt."""
    backend = next(m.backend for m in model.modules() if isinstance(m, PagedAttention))
    assert backend is not None, "bind the attention layers to a backend and a cache first"
    step = chunk or max((len(p) for p in prompts), default=1)
    reqs = [
        Request(f"parity{i}", list(p), SamplingParams(max_tokens=1), max_tokens=1)
        for i, p in enumerate(prompts)
    ]
    index = {req.request_id: i for i, req in enumerate(reqs)}
    parts: list[list[torch.Tensor]] = [[] for _ in reqs]
    done = [0] * len(reqs)
    while any(d < req.num_prompt_tokens for d, req in zip(done, reqs, strict=True)):
        seqs = []
        for i, (req, table) in enumerate(zip(reqs, block_tables, strict=True)):
            start, ids = done[i], req.prompt_token_ids
            if start < len(ids):
                end = min(start + step, len(ids))
                seqs.append(ScheduledSeq(req, ids[start:end], start, table, end == len(ids)))
        batch = build_input_batch(seqs, block_size, device, backend)
        hidden = model(batch.input_ids, batch.positions, batch.ctx)
        logits = model.compute_logits(hidden).float()
        for seq, first in zip(batch.seqs, batch.token_starts, strict=True):
            i = index[seq.req.request_id]
            parts[i].append(logits[first : first + seq.num_tokens])
            done[i] += seq.num_tokens
    return [torch.cat(p) for p in parts]


def engine_prefill_logits(
    llm: LLM, prompts: Sequence[Sequence[int]], chunk: int | None = None
) -> list[torch.Tensor]:
    """`prefill_logits` through an engine's own model and KV cache. The blocks are borrowed from
    each KV cache group's pool and given back, so no cached prefix is overwritten; the engine
    must be idle (nothing else steps it meanwhile)."""
    runner = llm.engine.runner
    pools = [g.pool for g in llm.engine.scheduler.kv_cache_manager.groups]
    bs = runner.block_size
    counts = [-(-len(p) // bs) for p in prompts]
    borrowed = [pool.get_new_blocks(sum(counts)) for pool in pools]
    try:
        group_ids = [iter(b.block_id for b in blocks) for blocks in borrowed]
        tables = [tuple([next(ids) for _ in range(n)] for ids in group_ids) for n in counts]
        return _prefill_logits(runner.model, prompts, tables, bs, runner.device, chunk)
    finally:
        for pool, blocks in zip(pools, borrowed, strict=True):
            pool.free_blocks(blocks)


def greedy_tokens(llm: LLM, prompts: Sequence[Sequence[int]], max_tokens: int) -> list[list[int]]:
    """Our greedy continuation of each prompt, exactly `max_tokens` tokens: the end tokens are
    masked (min_tokens) as transformers' min_new_tokens does, so both sides stop alike."""
    params = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, temperature=0.0)
    outs = llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
    return [list(out.outputs[0].token_ids) for out in outs]


def hf_logits(model: Any, token_ids: Sequence[int]) -> torch.Tensor:
    """A transformers causal LM's float32 logits at every position of one prompt."""
    with torch.inference_mode():
        return model(torch.tensor([list(token_ids)], device=model.device)).logits[0].float()


def hf_greedy(
    model: Any, token_ids: Sequence[int], max_new_tokens: int, pad_token_id: int = 0
) -> list[int]:
    """transformers' greedy continuation of one prompt, exactly `max_new_tokens` tokens (the end
    tokens masked by min_new_tokens, as `greedy_tokens` does on our side)."""
    ids = torch.tensor([list(token_ids)], device=model.device)
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_token_id,
        )
    return out[0, len(token_ids) :].tolist()


def hf_model_from_gguf(path: Path, dtype: torch.dtype = torch.float32) -> Any:
    """transformers' own model from a GGUF file (dequantized by transformers), in eval mode."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, torch_dtype=dtype
    )
    return model.eval()


def logits_diff(ours: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """How far `ours` is from `ref` ([positions, vocab] each): the largest and the mean absolute
    difference, the reference's largest magnitude (logit_scale, for relative tolerances) and the
    fraction of positions whose top token agrees."""
    ours, ref = ours.float(), ref.float()
    diff = (ours - ref).abs()
    return {
        "max_abs_diff": diff.max().item(),
        "mean_abs_diff": diff.mean().item(),
        "logit_scale": ref.abs().max().item(),
        "top1_agree": (ours.argmax(-1) == ref.argmax(-1)).float().mean().item(),
    }


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor, *, atol: float, rtol: float) -> None:
    """torch.testing.assert_close(ours, ref, atol, rtol), its message followed by `logits_diff`."""
    torch.testing.assert_close(
        ours, ref, atol=atol, rtol=rtol, msg=lambda m: f"{m}\n{logits_diff(ours, ref)}"
    )


def assert_prefill_matches_hf(
    model: torch.nn.Module,
    hf_model: Any,
    prompts: Sequence[Sequence[int]],
    block_size: int,
    chunk: int | None = None,
) -> None:
    """`prefill_logits` of `model` (prompt i in the 16 blocks from 16 i on) within 1e-4 of
    `hf_logits` of `hf_model` at every position of every prompt."""
    tables = [list(range(i * 16, (i + 1) * 16)) for i in range(len(prompts))]
    ours = prefill_logits(model, prompts, tables, block_size, chunk=chunk)
    for p, got in zip(prompts, ours, strict=True):
        assert_logits_close(got, hf_logits(hf_model, p), atol=1e-4, rtol=1e-4)

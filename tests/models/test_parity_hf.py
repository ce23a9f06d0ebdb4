"""Logit parity with transformers' own implementation on tiny random-weight models (fp32)."""

from __future__ import annotations

import pytest
import torch

from tokenmill.config import ModelConfig
from tokenmill.core.sched_types import ScheduledSeq
from tokenmill.layers.attn_backends.sdpa import SdpaBackend
from tokenmill.models.registry import build_model
from tokenmill.request import Request
from tokenmill.sampling_params import SamplingParams
from tokenmill.worker.input_batch import build_input_batch
from tokenmill.worker.kv_cache import allocate_kv_cache

transformers = pytest.importorskip("transformers")

BLOCK = 4

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)

CONFIGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False)),
    "llama3-rope-tied": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            tie_word_embeddings=True,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
}

BACKEND = SdpaBackend()  # the PyTorch reference attention


def make_hf(name: str):
    cfg_cls, model_cls, extra = CONFIGS[name]
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_cls)(**TINY, **extra)
    cfg.architectures = [model_cls]
    hf = getattr(transformers, model_cls)(cfg).eval()
    if name == "qwen2":  # random q/k/v biases, so the bias path is really tested
        for layer in hf.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    return cfg, hf


def make_ours(cfg, hf):
    mcfg = ModelConfig.from_hf_dict(cfg.to_dict())
    model = build_model(mcfg, torch.float32, 256)
    model.load_weights(hf.state_dict().items())
    kv = allocate_kv_cache(mcfg, 64, BLOCK, torch.float32, "cpu")
    layers = [m for m in model.modules() if type(m).__name__ == "PagedAttention"]
    for i, attn in enumerate(layers):
        attn.bind(BACKEND, kv[i, 0], kv[i, 1])
    return model


def run_chunks(model, prompts: list[list[int]], chunk: int) -> list[torch.Tensor]:
    """Runs all prompts together, `chunk` tokens of each per step; returns logits per prompt."""
    reqs = [Request(f"r{i}", p, SamplingParams(max_tokens=1)) for i, p in enumerate(prompts)]
    tables = [list(range(i * 16, (i + 1) * 16)) for i in range(len(prompts))]
    logits: list[list[torch.Tensor]] = [[] for _ in prompts]
    done = [0] * len(prompts)
    while any(d < len(p) for d, p in zip(done, prompts, strict=True)):
        seqs = []
        for i, (r, p) in enumerate(zip(reqs, prompts, strict=True)):
            if done[i] < len(p):
                n = min(chunk, len(p) - done[i])
                seqs.append(ScheduledSeq(r, p[done[i] : done[i] + n], done[i], tables[i], False))
        batch = build_input_batch(seqs, BLOCK, "cpu", BACKEND)
        with torch.inference_mode():
            hidden = model(batch.input_ids, batch.positions, batch.ctx)
            out = model.compute_logits(hidden)
        for s, start in zip(batch.seqs, batch.token_starts, strict=True):
            i = int(s.req.request_id[1:])
            logits[i].append(out[start : start + s.num_tokens])
            done[i] += s.num_tokens
    return [torch.cat(parts) for parts in logits]


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("chunk", [1000, 5, 1])
def test_logits_match_transformers(name: str, chunk: int) -> None:
    cfg, hf = make_hf(name)
    model = make_ours(cfg, hf)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (23, 7, 40)]
    ours = run_chunks(model, prompts, chunk)
    for p, got in zip(prompts, ours, strict=True):
        with torch.no_grad():
            ref = hf(torch.tensor([p])).logits[0]
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)

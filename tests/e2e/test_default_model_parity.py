"""SmolLM2 from the GGUF, loaded by both tokenmill and transformers: logits and greedy tokens."""

from __future__ import annotations

import pytest
import torch

from tokenmill import SamplingParams
from tokenmill.loader.model_source import default_model_path
from tokenmill.testing.parity import (
    assert_logits_close,
    engine_prefill_logits,
    greedy_tokens,
    hf_greedy,
    hf_logits,
    hf_model_from_gguf,
)

pytestmark = pytest.mark.slow  # the default model, end to end

transformers = pytest.importorskip("transformers")

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "List three primary colors:",
    "The quick brown fox",
    "Water boils at a temperature of",
    "In 1492, Christopher Columbus",
    "<|im_start|>user\nWhat is 12 * 7?<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def hf_model():
    return hf_model_from_gguf(default_model_path())


def test_logits_match_transformers(default_llm_fp32, hf_model) -> None:
    """Raw logits of every prompt position, prompt run in 3 chunks through the paged cache."""
    tok = default_llm_fp32.get_tokenizer()
    ids = tok.encode("Paged attention splits the KV cache into fixed-size blocks, so", False)
    # KV blocks borrowed from the pool, so no cached prefix is overwritten
    (got,) = engine_prefill_logits(default_llm_fp32, [ids], chunk=7)
    assert_logits_close(got, hf_logits(hf_model, ids), atol=2e-4, rtol=1e-4)


def test_prompt_logprobs_match_transformers(default_llm_fp32, hf_model) -> None:
    tok = default_llm_fp32.get_tokenizer()
    ids = tok.encode(
        "The history of the printing press begins in 1440, when", add_special_tokens=False
    )
    out = default_llm_fp32.generate(
        [ids], SamplingParams(max_tokens=1, prompt_logprobs=5, temperature=0), use_tqdm=False
    )[0]
    ref = torch.log_softmax(hf_logits(hf_model, ids), -1)
    assert out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(ids)
    for pos, entry in enumerate(out.prompt_logprobs[1:]):
        expected_top = ref[pos].topk(5)
        for tok_id, val in zip(
            expected_top.indices.tolist(), expected_top.values.tolist(), strict=True
        ):
            assert abs(entry[tok_id].logprob - val) < 1e-3
        actual = ids[pos + 1]
        assert abs(entry[actual].logprob - ref[pos, actual].item()) < 1e-3


def test_greedy_matches_transformers_generate(default_llm_fp32, hf_model) -> None:
    tok = default_llm_fp32.get_tokenizer()
    prompt_ids = [tok.encode(p, add_special_tokens=False) for p in PROMPTS]
    # the end tokens masked on both sides (min_tokens, min_new_tokens): 64 tokens each
    outs = greedy_tokens(default_llm_fp32, prompt_ids, 64)
    for ids, out in zip(prompt_ids, outs, strict=True):
        assert out == hf_greedy(hf_model, ids, 64), f"diverged for {tok.decode(ids)!r}"

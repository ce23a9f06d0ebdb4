"""SmolLM2 from the GGUF, loaded by both tokenmill and transformers: logits and greedy tokens."""

from __future__ import annotations

import pytest
import torch

from tokenmill import SamplingParams
from tokenmill.loader.model_source import default_model_path

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
    path = default_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, torch_dtype=torch.float32
    )
    return model.eval()


def test_logits_match_transformers(default_llm_fp32, hf_model) -> None:
    """Raw logits of every prompt position, prompt run in 3 chunks through the paged cache."""
    from tokenmill.core.sched_types import ScheduledSeq
    from tokenmill.request import Request

    runner = default_llm_fp32.engine.runner
    tok = default_llm_fp32.get_tokenizer()
    ids = tok.encode("Paged attention splits the KV cache into fixed-size blocks, so", False)
    req = Request("parity", ids, SamplingParams(max_tokens=1))
    pool = default_llm_fp32.engine.scheduler.kv_cache_manager.block_pool
    blocks = pool.get_new_blocks(8)  # taken from the pool so no cached prefix is overwritten
    table = [b.block_id for b in blocks]
    got = []
    with torch.inference_mode():
        for start in range(0, len(ids), 7):
            chunk = ids[start : start + 7]
            batch = runner.prepare([ScheduledSeq(req, chunk, start, table, False)])
            hidden = runner.model(batch.input_ids, batch.positions, batch.ctx)
            got.append(runner.model.compute_logits(hidden))
        ref = hf_model(torch.tensor([ids])).logits[0].float()
    pool.free_blocks(blocks)
    torch.testing.assert_close(torch.cat(got), ref, atol=2e-4, rtol=1e-4)


def test_prompt_logprobs_match_transformers(default_llm_fp32, hf_model) -> None:
    tok = default_llm_fp32.get_tokenizer()
    ids = tok.encode(
        "The history of the printing press begins in 1440, when", add_special_tokens=False
    )
    out = default_llm_fp32.generate(
        [ids], SamplingParams(max_tokens=1, prompt_logprobs=5, temperature=0), use_tqdm=False
    )[0]
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), -1)
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
    # min_tokens masks the end tokens, as transformers' min_new_tokens does.
    params = SamplingParams(max_tokens=64, min_tokens=64, temperature=0.0)
    outs = default_llm_fp32.generate(prompt_ids, params, use_tqdm=False)
    for ids, out in zip(prompt_ids, outs, strict=True):
        with torch.no_grad():
            ref = hf_model.generate(
                torch.tensor([ids]),
                max_new_tokens=64,
                min_new_tokens=64,
                do_sample=False,
                pad_token_id=0,
            )[0, len(ids) :].tolist()
        assert out.outputs[0].token_ids == ref, f"diverged for {tok.decode(ids)!r}"

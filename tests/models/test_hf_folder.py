"""Loading HF folders end to end: greedy parity with transformers, and clear load errors."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.errors import ModelLoadError
from tokenmill.models.registry import SUPPORTED_ARCHITECTURES
from utils_tiny import make_tiny_hf_folder

transformers = pytest.importorskip("transformers")

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village, there lived",
    "1, 2, 3,",
]
NUM_TOKENS = 24

CASES = [
    ("LlamaForCausalLM", False),
    ("Qwen2ForCausalLM", True),  # sharded: several safetensors files plus an index
    ("MistralForCausalLM", False),
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-hf")
    return {arch: make_tiny_hf_folder(root, arch, sharded=sharded) for arch, sharded in CASES}


@pytest.fixture
def llama_copy(folders, tmp_path) -> Path:
    """A private copy of the tiny Llama folder that a test may break."""
    dst = tmp_path / "broken"
    shutil.copytree(folders["LlamaForCausalLM"], dst)
    return dst


def _hf_greedy(folder: Path, prompt_ids: list[int]) -> list[int]:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=NUM_TOKENS,
            do_sample=False,
        )
    return out[0, len(prompt_ids) :].tolist()


@pytest.mark.parametrize(("arch", "sharded"), CASES, ids=[a for a, _ in CASES])
def test_greedy_matches_transformers(folders, make_llm, arch: str, sharded: bool) -> None:
    folder = folders[arch]
    if sharded:
        assert (folder / "model.safetensors.index.json").is_file()
        assert len(list(folder.glob("*.safetensors"))) > 1
    llm = make_llm(model=str(folder), dtype="float32")
    assert llm.engine.model_config.architecture == arch
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    outs = llm.generate(
        PROMPTS, SamplingParams(temperature=0, max_tokens=NUM_TOKENS), use_tqdm=False
    )
    for prompt, out in zip(PROMPTS, outs, strict=True):
        # our tokenizer, built from the folder, agrees with transformers' tokenizer
        assert out.prompt_token_ids == hf_tok(prompt)["input_ids"], prompt
        ref = _hf_greedy(folder, out.prompt_token_ids)
        got = out.outputs[0].token_ids
        assert got == ref, f"{arch} {prompt!r}: tokenmill {got} != transformers {ref}"
        if len(got) == NUM_TOKENS:
            assert out.outputs[0].finish_reason == "length"


def test_unknown_architecture_lists_supported(llama_copy: Path) -> None:
    cfg_path = llama_copy / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as ei:
        LLM(model=str(llama_copy), dtype="float32")
    msg = str(ei.value)
    assert "GPT2LMHeadModel" in msg
    for arch in SUPPORTED_ARCHITECTURES:
        assert arch in msg
    assert {"LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"} <= set(
        SUPPORTED_ARCHITECTURES
    )


def test_truncated_safetensors_names_the_file(llama_copy: Path) -> None:
    weights = llama_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError) as ei:
        LLM(model=str(llama_copy), dtype="float32")
    assert isinstance(ei.value, ValueError)
    assert "model.safetensors" in str(ei.value)


def test_missing_tensor_raises(llama_copy: Path) -> None:
    from safetensors.torch import load_file, save_file

    weights = llama_copy / "model.safetensors"
    tensors = load_file(str(weights))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError) as ei:
        LLM(model=str(llama_copy), dtype="float32")
    msg = str(ei.value)
    assert "missing" in msg
    assert "layers.1.mlp.down_proj" in msg


def test_unknown_hub_id_fails_fast_offline(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    # huggingface_hub reads the variable at import time
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    t0 = time.perf_counter()
    with pytest.raises(ValueError) as ei:
        LLM(model="no-such-org/no-such-model-xyz")
    assert time.perf_counter() - t0 < 10
    assert "no-such-org/no-such-model-xyz" in str(ei.value)

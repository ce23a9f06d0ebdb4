"""SqueezeLLM checkpoints: calibrate + quantize + save + load gives the logits of the same method
applied in memory; `tokenmill quantize` on a tiny model; the GGUF tokenizer written as HF files."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

import pytest
import torch

from tokenmill import LLM, SamplingParams, quantize
from tokenmill.cli import main
from tokenmill.data import US_FOUNDING_TEXTS, read_text
from tokenmill.engine.tokenizer import Tokenizer
from tokenmill.errors import ModelLoadError
from tokenmill.layers.linear import Linear, MergedLinear
from tokenmill.loader.model_source import ModelSource, default_model_path
from tokenmill.quant.base import make_quant_method
from tokenmill.quant.squeezellm import SqueezeLLMMethod, load_cpu_lut
from tokenmill.quant.unquantized import UnquantizedMethod
from tokenmill.quantize import (
    collect_sensitivity,
    quantize_checkpoint,
    quantize_model,
    save_tokenizer,
)
from utils_tiny import make_tiny_hf_folder

needs_kernel = pytest.mark.skipif(
    load_cpu_lut() is None, reason="the SqueezeLLM CPU kernel cannot be built here"
)
CALIBRATION = (
    "When in the Course of human events, it becomes necessary for one people to dissolve the "
    "political bands which have connected them with another. Four score and seven years ago. "
) * 4
TEXT = "The quick brown fox jumps over the lazy dog. In the beginning was the word."
SMALL = dict(dtype="float32", kv_cache_memory_gb=0.1, max_model_len=256)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    # Qwen2: q/k/v biases, so biases of fused quantized layers are saved and reloaded too
    return make_tiny_hf_folder(
        tmp_path_factory.mktemp("sq"), "Qwen2ForCausalLM", hidden_size=128, intermediate_size=256
    )


def prompt_logprobs(llm: LLM) -> torch.Tensor:
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    out = llm.generate([TEXT], params, use_tqdm=False)[0]
    ids = out.prompt_token_ids
    return torch.tensor(
        [d[t].logprob for d, t in zip(out.prompt_logprobs[1:], ids[1:], strict=True)]
    )


def linears(llm: LLM) -> dict[str, Linear]:
    model = llm.engine.runner.model
    return {n: m for n, m in model.named_modules() if isinstance(m, Linear)}


@needs_kernel
def test_checkpoint_round_trip_equals_in_memory(tiny_folder, tmp_path) -> None:
    out = tmp_path / "sq4"
    summary = quantize_checkpoint(str(tiny_folder), out, CALIBRATION, bits=4, sparsity=0.01,
                                  window=32)  # fmt: skip
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "squeezellm" and qcfg["bits"] == 4
    loaded = LLM(model=str(out), **SMALL)
    methods = {n: m.quant_method for n, m in linears(loaded).items()}
    assert isinstance(methods.pop("lm_head"), UnquantizedMethod)
    assert all(isinstance(m, SqueezeLLMMethod) and m.bits == 4 for m in methods.values())
    got_bytes = sum(m.weight_bytes for n, m in linears(loaded).items() if n != "lm_head")
    # fusing shards drops all but one leading 0 of their CSR row pointers (int32)
    merged = sum(len(m.shard_names) - 1 for m in linears(loaded).values()
                 if isinstance(m, MergedLinear))  # fmt: skip
    assert got_bytes == summary["quantized_bytes"] - 4 * merged

    # The same quantization applied in memory to the dense model.
    mem = LLM(model=str(tiny_folder), **SMALL)
    model = mem.engine.runner.model
    ids = mem.get_tokenizer().encode(CALIBRATION)
    quantized, _ = quantize_model(model, collect_sensitivity(mem, ids, 32), 4, 0.01)
    for name, layer in linears(mem).items():
        if name == "lm_head":
            continue
        parent = name.rsplit(".", 1)[0]
        layer.quant_method = make_quant_method("squeezellm")  # the dense model's layer, requantized
        if isinstance(layer, MergedLinear):
            for shard in layer.shard_names:
                layer.load_quantized(quantized[f"{parent}.{shard}"], shard)
        else:
            layer.load_quantized(quantized[name])
        layer.quant_method.process_after_loading(layer)
    assert torch.equal(prompt_logprobs(loaded), prompt_logprobs(mem))


@pytest.mark.slow  # calibrates, quantizes, then loads the checkpoint five ways: heavy
@needs_kernel
def test_quantize_cli_on_tiny_model(tiny_folder, tmp_path, capsys) -> None:
    text_file = tmp_path / "calibration.txt"
    text_file.write_text(CALIBRATION)
    out = tmp_path / "sq3"
    argv = ["quantize", str(tiny_folder), "--bits", "3", "--calibration-text", str(text_file),
            "--out", str(out), "--window", "32", "--sparsity", "0.01"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["bits"] == 3 and summary["outliers"] > 0
    # 3-bit codes sit in 4-bit slots: at least half a byte per weight
    assert summary["bytes_per_weight"] >= 0.5
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors",
                                                "tokenizer.json"}  # fmt: skip
    quant = LLM(model=str(out), **SMALL)
    assert {m.quant_method.describe(m) for n, m in linears(quant).items() if n != "lm_head"} == {
        "squeezellm3"
    }
    # quantization="none" dequantizes the same weights: equal up to float32 summation order
    dense = LLM(model=str(out), quantization="none", **SMALL)
    assert all(isinstance(m.quant_method, UnquantizedMethod) for m in linears(dense).values())
    got, ref = prompt_logprobs(quant), prompt_logprobs(dense)
    assert torch.allclose(got, ref, atol=1e-3)
    # against the original dense weights: close, not equal (random tiny weights, 3 bits)
    orig = prompt_logprobs(LLM(model=str(tiny_folder), **SMALL))
    assert 0 < (got - orig).abs().mean() < 0.5
    with pytest.raises(ModelLoadError, match="cannot be requantized"):
        LLM(model=str(out), quantization="int4", **SMALL)
    # quantization="squeezellm" takes the checkpoint as it is, and refuses anything else
    explicit = LLM(model=str(out), quantization="squeezellm", **SMALL)
    assert torch.equal(prompt_logprobs(explicit), got)
    for other in (str(tiny_folder), None):  # a plain HF folder, the default GGUF
        with pytest.raises(ModelLoadError, match="needs a SqueezeLLM checkpoint"):
            LLM(model=other, quantization="squeezellm", **SMALL)


def test_quantize_cli_calibrates_on_the_packaged_text_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --calibration-text the text comes from the package (tokenmill.data), so any
    install has it; the source tree's folders are never looked in."""
    seen: list[tuple[object, ...]] = []

    def fake_quantize_checkpoint(*args: object) -> dict[str, str]:
        seen.append(args)
        return {"ok": "yes"}

    monkeypatch.setattr(quantize, "quantize_checkpoint", fake_quantize_checkpoint)
    assert main(["quantize", "tiny", "--out", str(tmp_path / "out")]) == 0
    assert json.loads(capsys.readouterr().out) == {"ok": "yes"}
    ((model, out, text, *_),) = seen
    assert (model, out) == ("tiny", tmp_path / "out")
    assert text == read_text() and "Four score and seven years ago" in text
    assert files("tokenmill.data").joinpath(US_FOUNDING_TEXTS).is_file()


def test_gguf_tokenizer_saved_as_hf_files(tmp_path) -> None:
    gguf = default_model_path()
    tok = Tokenizer.from_gguf(gguf)
    save_tokenizer(tok, ModelSource("gguf", gguf, "default"), tmp_path)
    back = Tokenizer.from_pretrained(tmp_path)
    text = TEXT + " <|im_start|>user\nHi 123 ünïcode<|im_end|>"
    assert back.encode(text) == tok.encode(text)
    assert back.decode(tok.encode(text)) == tok.decode(tok.encode(text))
    assert (back.bos_token_id, back.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
    assert back.eos_token_ids == tok.eos_token_ids
    assert back.chat_template == tok.chat_template

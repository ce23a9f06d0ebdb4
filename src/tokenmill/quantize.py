"""`tokenmill quantize`: calibrate a model on a text file and write a SqueezeLLM checkpoint.

The model is loaded dense in float32; the calibration text runs through it in windows while
forward pre-hooks on the decoder's Linear layers accumulate E[x_k^2] per input channel (the
sensitivity of squeezellm_quant); each decoder linear weight (fused q/k/v and gate/up split back
into their HF matrices) is then quantized and the folder written: config.json with
`quantization_config`, the tokenizer, model.safetensors. `LLM(model=folder)` loads it.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from tokenmill.data import read_text
from tokenmill.layers.linear import Linear, MergedLinear
from tokenmill.quant.squeezellm import SqueezeLLMWeights
from tokenmill.quant.squeezellm_fit import quantize_squeezellm

logger = logging.getLogger(__name__)

_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "generation_config.json", "chat_template.jinja", "vocab.json", "merges.txt",
)  # fmt: skip


def decoder_linears(model: torch.nn.Module) -> dict[str, Linear]:
    """The Linear layers inside the decoder blocks (not the LM head)."""
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, Linear) and n.startswith("model.layers.")
    }


def collect_sensitivity(llm: Any, ids: list[int], window: int) -> dict[str, torch.Tensor]:
    """E[x_k^2] over the calibration tokens for the input of every decoder linear."""
    from tokenmill.sampling_params import SamplingParams

    sums: dict[str, list[Any]] = {}

    def make_hook(name: str):  # noqa: ANN202
        def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            acc = sums.setdefault(name, [torch.zeros(x.shape[1], dtype=torch.float64), 0])
            acc[0] += (x * x).sum(0).double()
            acc[1] += x.shape[0]

        return hook

    model = llm.engine.runner.model
    hooks = [m.register_forward_pre_hook(make_hook(n)) for n, m in decoder_linears(model).items()]
    try:
        chunks = [ids[i : i + window] for i in range(0, len(ids), window)]
        prompts = [{"prompt_token_ids": c} for c in chunks if len(c) > 1]
        params = SamplingParams(max_tokens=1, temperature=0.0)
        llm.generate(prompts, params, use_tqdm=False)
    finally:
        for h in hooks:
            h.remove()
    return {n: (s / max(count, 1)).float() for n, (s, count) in sums.items()}


def quantize_model(
    model: torch.nn.Module,
    sensitivity: dict[str, torch.Tensor],
    bits: int,
    sparsity: float,
) -> tuple[dict[str, SqueezeLLMWeights], dict[str, torch.Tensor]]:
    """(HF prefix -> quantized weight, HF name -> dense tensor) for a dense loaded model."""
    quantized: dict[str, SqueezeLLMWeights] = {}
    dense: dict[str, torch.Tensor] = {}
    linears = decoder_linears(model)
    for name, layer in linears.items():
        parent = name.rsplit(".", 1)[0]
        w = layer.weight.data.float()
        sens = sensitivity.get(name)
        if isinstance(layer, MergedLinear):  # back to the checkpoint's separate matrices
            shards = [(f"{parent}.{s}", *layer.shard_offset(s)) for s in layer.shard_names]
        else:
            shards = [(name, 0, layer.out_features)]
        for prefix, start, end in shards:
            quantized[prefix] = quantize_squeezellm(w[start:end], sens, bits, sparsity)
            if layer.bias is not None:
                dense[f"{prefix}.bias"] = layer.bias.data[start:end].float().clone()
    skip = {f"{n}.{k}" for n in linears for k in ("weight", "bias")}
    for name, p in model.named_parameters():  # shared (tied) parameters are listed once
        if name not in skip:
            dense[name] = p.data.float().clone()
    return quantized, dense


def save_tokenizer(tokenizer: Any, source: Any, out: Path) -> None:
    """An HF folder's tokenizer files are copied; a GGUF file's tokenizer (built by
    Tokenizer.from_gguf) is written as tokenizer.json plus its special tokens and template."""
    if source.kind == "hf":
        for name in _TOKENIZER_FILES:
            if (source.path / name).is_file():
                shutil.copy(source.path / name, out / name)
        return
    tokenizer.backend.save(str(out / "tokenizer.json"))
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for key in ("bos_token", "eos_token"):
        if getattr(tokenizer, key) is not None:
            config[key] = getattr(tokenizer, key)
    if tokenizer.chat_template:
        config["chat_template"] = tokenizer.chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    eos = sorted(tokenizer.eos_token_ids)
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))


def quantize_checkpoint(
    model: str | None,
    out: Path,
    calibration_text: str,
    bits: int = 4,
    sparsity: float = 0.0045,
    window: int = 512,
    max_tokens: int = 8192,
) -> dict[str, Any]:
    """Calibrates, quantizes and writes `out`; returns a summary (bytes, timings)."""
    from tokenmill.engine.llm import LLM
    from tokenmill.loader.model_source import read_hf_config, resolve_model
    from tokenmill.loader.squeezellm import save_squeezellm

    source = resolve_model(model)
    if source.kind == "gguf":
        from tokenmill.loader.gguf import read_gguf

        hf_config = read_gguf(source.path).hf_config()
    else:
        hf_config = read_hf_config(source.path)
    start = time.perf_counter()
    llm = LLM(model=model, quantization="none", dtype="float32", max_model_len=window + 8,
              kv_cache_memory_gb=0.25)  # fmt: skip
    ids = llm.get_tokenizer().encode(calibration_text)[:max_tokens]
    if len(ids) < 2:
        raise ValueError("the calibration text is too short (fewer than 2 tokens)")
    sensitivity = collect_sensitivity(llm, ids, window)
    calibrated = time.perf_counter()
    quantized, dense = quantize_model(llm.engine.runner.model, sensitivity, bits, sparsity)
    done = time.perf_counter()
    extra = {"sparsity": sparsity, "calibration_tokens": len(ids),
             "sensitivity": "diagonal input Hessian E[x^2]"}  # fmt: skip
    save_squeezellm(out, hf_config, quantized, dense, extra)
    save_tokenizer(llm.get_tokenizer(), source, out)
    weights = sum(sq.shape[0] * sq.shape[1] for sq in quantized.values())
    nbytes = sum(sq.nbytes() for sq in quantized.values())
    return {
        "out": str(out), "bits": bits, "calibration_tokens": len(ids),
        "quantized_weights": weights, "quantized_bytes": nbytes,
        "bytes_per_weight": nbytes / weights,
        "outliers": sum(sq.val.numel() for sq in quantized.values()),
        "calibration_s": round(calibrated - start, 1), "quantize_s": round(done - calibrated, 1),
    }  # fmt: skip


def run(args: Any) -> int:
    """The CLI command (arguments from cli.build_parser)."""
    if args.method != "squeezellm":
        raise ValueError(f"unknown quantization method {args.method!r}")
    if args.calibration_text is None:
        text = read_text()
    else:
        text_path = Path(args.calibration_text)
        if not text_path.is_file():
            raise ValueError(f"calibration text {text_path} not found")
        text = text_path.read_text()
    summary = quantize_checkpoint(
        args.model_arg, Path(args.out), text, args.bits, args.sparsity,
        args.window, args.calibration_tokens,
    )  # fmt: skip
    print(json.dumps(summary, indent=2))
    return 0

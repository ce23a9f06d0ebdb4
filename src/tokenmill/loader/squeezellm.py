"""SqueezeLLM checkpoints: a HF folder whose config.json has
`"quantization_config": {"quant_method": "squeezellm", "bits": 3 | 4, ...}` and whose safetensors
hold, for each quantized linear `<prefix>` (HF names, e.g. model.layers.0.self_attn.q_proj),
the tensors `<prefix>.sq_<part>` for part in squeezellm.PARTS, next to the dense rest
(embeddings, norms, biases, an untied lm_head) under their usual names.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from tokenmill.errors import ModelLoadError
from tokenmill.loader.safetensors import safetensors_files
from tokenmill.quant.squeezellm import PARTS, SqueezeLLMWeights

QUANT_METHOD = "squeezellm"


def squeezellm_bits(hf_config: dict[str, Any]) -> int | None:
    """The bits of a SqueezeLLM checkpoint's config, or None for any other checkpoint."""
    qcfg = hf_config.get("quantization_config") or {}
    if qcfg.get("quant_method") != QUANT_METHOD:
        return None
    bits = qcfg.get("bits")
    if bits not in (3, 4):
        raise ModelLoadError(f"SqueezeLLM checkpoint with bits={bits!r}; expected 3 or 4")
    return int(bits)


def iter_squeezellm(
    folder: Path, dtype: torch.dtype, bits: int, dense: bool = False
) -> Iterator[tuple[str, Any]]:
    """(name, tensor) with every quantized linear as ("<prefix>.weight", SqueezeLLMWeights), or
    its dequantized weight in `dtype` when `dense`. Dense tensors are cast to `dtype`; the
    quantized parts keep their stored integer / fp16 / fp32 types."""
    from safetensors import SafetensorError, safe_open

    pending: dict[str, dict[str, torch.Tensor]] = {}
    for file in safetensors_files(folder):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    prefix, _, part = name.rpartition(".sq_")
                    if not prefix or part not in PARTS:
                        yield name, f.get_tensor(name).to(dtype)
                        continue
                    group = pending.setdefault(prefix, {})
                    group[part] = f.get_tensor(name)
                    if len(group) == len(PARTS):  # complete: hand it on now
                        del pending[prefix]
                        try:
                            sq = SqueezeLLMWeights.from_tensors(group, bits)
                        except ValueError as e:
                            raise ModelLoadError(f"{prefix}: {e}") from e
                        yield f"{prefix}.weight", sq.dequantize().to(dtype) if dense else sq
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ModelLoadError(f"{file}: corrupt or truncated safetensors file ({e})") from e
    if pending:
        name, parts = next(iter(pending.items()))
        missing = sorted(set(PARTS) - set(parts))
        raise ModelLoadError(f"SqueezeLLM weight {name!r} lacks tensors {missing}")


def save_squeezellm(
    out: Path,
    hf_config: dict[str, Any],
    quantized: dict[str, SqueezeLLMWeights],
    dense: dict[str, torch.Tensor],
    extra_config: dict[str, Any],
) -> None:
    """Writes config.json and model.safetensors (the tokenizer is the caller's)."""
    from safetensors.torch import save_file

    bits = {sq.bits for sq in quantized.values()}
    if len(bits) != 1:
        raise ValueError(f"expected one bit width across the checkpoint, got {sorted(bits)}")
    tensors = {k: v.contiguous() for k, v in dense.items()}
    for prefix, sq in quantized.items():
        for part, t in sq.tensors().items():
            tensors[f"{prefix}.sq_{part}"] = t.contiguous()
    out.mkdir(parents=True, exist_ok=True)
    config = dict(hf_config)
    config["quantization_config"] = {"quant_method": QUANT_METHOD, "bits": bits.pop(),
                                     **extra_config}  # fmt: skip
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})

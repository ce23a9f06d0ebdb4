"""`tokenmill generate | chat | serve | router | quantize`. Flags are generated from config
dataclasses."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import types
from typing import Any, Union, get_args, get_origin, get_type_hints

from tokenmill.config import EngineConfig
from tokenmill.sampling_params import SamplingParams

# Sampling flags exposed on the command line (the rest are API-only: logit_bias, n, ...).
_SAMPLING_FLAGS = (
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


def _engine_config(args: argparse.Namespace) -> EngineConfig:
    names = {f.name for f in dataclasses.fields(EngineConfig)}
    kw = {k: v for k, v in vars(args).items() if k in names}
    if kw.get("seed") is None:  # --seed was the (unset) sampling seed
        kw.pop("seed", None)
    return EngineConfig(**kw)


def _sampling_params(args: argparse.Namespace, **overrides: Any) -> SamplingParams:
    kw = {k: getattr(args, k) for k in _SAMPLING_FLAGS if getattr(args, k, None) is not None}
    kw.update(overrides)
    return SamplingParams(**kw)


class _ListArchitectures(argparse.Action):
    """`--list-architectures`: print the model architectures we load, then exit (like
    --version). The registry is imported only here: it imports torch."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        from tokenmill.loader.gguf_config import ALSO_READ_AS
        from tokenmill.loader.gguf_config import SUPPORTED_ARCHITECTURES as GGUF_ARCHS
        from tokenmill.models.registry import SUPPORTED_ARCHITECTURES

        print("HF folders (config.json architectures):")
        for arch in SUPPORTED_ARCHITECTURES:
            print(f"  {arch}")
        print("GGUF files (general.architecture):")
        for arch, hf_arch in GGUF_ARCHS.items():
            also = f" ({ALSO_READ_AS[arch]})" if arch in ALSO_READ_AS else ""
            print(f"  {arch} -> {hf_arch}{also}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmill", description=__doc__)
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument(
        "--list-architectures",
        action=_ListArchitectures,
        help="list the supported model architectures and exit",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete prompts offline (arguments or a JSONL file)")
    gen.add_argument("prompts", nargs="*", help="prompt strings")
    gen.add_argument("--file", help='JSONL file: one {"prompt": ...} or a JSON string per line')
    gen.add_argument("--chat-template", action="store_true", help="wrap prompts as user turns")
    gen.add_argument("--json", action="store_true", help="print one JSON object per result")

    chat = sub.add_parser("chat", help="interactive chat with streaming output")
    chat.add_argument("--system", default=None, help="system prompt")

    for p in (gen, chat):
        # --seed is the sampling seed; the engine seed (for unseeded requests) keeps its default
        add_dataclass_flags(p, EngineConfig, skip=("seed",))
        add_dataclass_flags(p, SamplingParams, only=_SAMPLING_FLAGS)
    gen.set_defaults(max_tokens=64, temperature=0.0)
    chat.set_defaults(max_tokens=512, temperature=0.7, top_p=0.9)

    from tokenmill.server.config import ServerConfig  # plain dataclass: no fastapi import

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server (FastAPI + uvicorn)")
    serve.add_argument(
        "model_arg", nargs="?", metavar="MODEL", help="model to serve (default: SmolLM2-135M)"
    )
    add_dataclass_flags(serve, EngineConfig)
    add_dataclass_flags(serve, ServerConfig)
    from tokenmill.router.config import RouterConfig  # plain dataclass: no starlette import
    from tokenmill.router.policy import POLICIES

    serve.add_argument(
        "--data-parallel-size",
        type=int,
        default=1,
        help="engine replicas, each a server on a private port with its share of --num-threads, "
        "behind one router on --host/--port (default: 1)",
    )
    serve.add_argument(
        "--router-policy",
        default="cache_aware",
        choices=POLICIES,
        help="how the data-parallel front end picks a replica (default: cache_aware)",
    )
    serve.add_argument(
        "--router-option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a `tokenmill router` option for the data-parallel front end, e.g. "
        "balance_abs_requests=8 (repeatable)",
    )

    router = sub.add_parser(
        "router", help="cache-aware OpenAI-compatible proxy over tokenmill servers (--worker URL)"
    )
    add_dataclass_flags(router, RouterConfig)

    quant = sub.add_parser("quantize", help="calibrate and write a quantized checkpoint")
    quant.add_argument(
        "model_arg", nargs="?", metavar="MODEL", help="model to quantize (default: SmolLM2-135M)"
    )
    quant.add_argument("--method", default="squeezellm", choices=["squeezellm"])
    quant.add_argument("--bits", type=int, default=4, choices=[3, 4])
    quant.add_argument(
        "--calibration-text",
        default=None,
        help="a text file (default: the public-domain text shipped in tokenmill.data; prefer "
        "one other than the evaluation text)",
    )
    quant.add_argument("--calibration-tokens", type=int, default=8192, help="at most this many")
    quant.add_argument("--window", type=int, default=512, help="tokens per calibration pass")
    quant.add_argument("--sparsity", type=float, default=0.0045, help="outlier fraction")
    quant.add_argument("--out", required=True, help="output folder")

    from tokenmill.sim.cli import add_parsers as add_sim_parsers

    add_sim_parsers(sub)
    return parser


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompts)
    if args.file:
        with open(args.file) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SystemExit(f"{args.file}:{lineno}: not valid JSON ({e})") from e
                prompts.append(item["prompt"] if isinstance(item, dict) else str(item))
    if not prompts:
        raise SystemExit("no prompts: pass them as arguments or with --file")
    return prompts


def cmd_generate(args: argparse.Namespace) -> int:
    from tokenmill.engine.llm import LLM

    prompts = _read_prompts(args)
    params = _sampling_params(args)
    cfg = _engine_config(args)
    llm = LLM(**dataclasses.asdict(cfg))
    if args.chat_template:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
    else:
        outputs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outputs, strict=True):
        for c in out.outputs:
            if args.json:
                print(
                    json.dumps(
                        {
                            "prompt": prompt,
                            "text": c.text,
                            "token_ids": c.token_ids,
                            "finish_reason": c.finish_reason,
                        }
                    )
                )
            else:
                print(f"### {prompt}\n{c.text}\n")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from tokenmill.engine.engine import LLMEngine

    engine = LLMEngine(_engine_config(args))
    tok = engine.tokenizer
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    interactive = sys.stdin.isatty()
    print(
        f"tokenmill chat with {engine.model_name} ({engine.dtype}). "
        "/reset clears the history, /exit or Ctrl-D quits.",
        file=sys.stderr,
    )
    while True:
        try:
            line = input("> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if not line.strip():
            continue
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": line})
        prompt_ids = tok.encode_chat(
            history, allow_special_in_content=engine.config.allow_special_tokens_in_content
        )
        rid = engine.add_request(prompt_ids, _sampling_params(args))
        reply = ""
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    text = out.outputs[0].text
                    print(text[len(reply) :], end="", flush=True)
                    reply = text
        except KeyboardInterrupt:
            engine.abort_request(rid)
        print(flush=True)
        history.append({"role": "assistant", "content": reply})


def cmd_serve(args: argparse.Namespace) -> int:
    from tokenmill.server.config import ServerConfig

    if args.model_arg is not None:
        if args.model is not None and args.model != args.model_arg:
            raise ValueError(f"two models given: {args.model_arg!r} and --model {args.model!r}")
        args.model = args.model_arg
    names = {f.name for f in dataclasses.fields(ServerConfig)}
    server_cfg = ServerConfig(**{k: v for k, v in vars(args).items() if k in names})
    engine_cfg = _engine_config(args)
    if args.data_parallel_size < 1:
        raise ValueError(f"data_parallel_size must be >= 1, got {args.data_parallel_size}")
    if args.data_parallel_size == 1:
        from tokenmill.server.launch import serve

        serve(engine_cfg, server_cfg)
        return 0
    # The front end loads no model (nor torch): the replicas do.
    from tokenmill.router.config import RouterConfig, router_options
    from tokenmill.router.launch import serve_data_parallel

    replica_args = [
        *dataclass_flags(engine_cfg, skip=("num_threads",)),
        *dataclass_flags(server_cfg, skip=("host", "port")),
    ]
    router_cfg = RouterConfig(
        host=server_cfg.host,
        port=server_cfg.port,
        **{
            "policy": args.router_policy,
            "health_interval_s": 2.0,
            "uvicorn_log_level": server_cfg.uvicorn_log_level,
            **router_options(args.router_option),
        },
    )
    serve_data_parallel(replica_args, args.data_parallel_size, engine_cfg.num_threads, router_cfg)
    return 0


def cmd_router(args: argparse.Namespace) -> int:
    from tokenmill.router.config import RouterConfig
    from tokenmill.router.launch import run_router

    names = {f.name for f in dataclasses.fields(RouterConfig)}
    config = RouterConfig(**{k: v for k, v in vars(args).items() if k in names})
    if not config.worker:
        raise ValueError("router needs at least one --worker URL")
    run_router(config)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from tokenmill.quantize import run

    return run(args)


def main(argv: list[str] | None = None) -> int:
    from tokenmill.sim import cli as sim_cli

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        commands = {
            "generate": cmd_generate,
            "chat": cmd_chat,
            "serve": cmd_serve,
            "router": cmd_router,
            "quantize": cmd_quantize,
            "simulate": sim_cli.cmd_simulate,
            "make-trace": sim_cli.cmd_make_trace,
        }
        return commands[args.command](args)
    except ValueError as e:  # user errors: bad flags, bad model, bad request
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

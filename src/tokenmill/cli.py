"""`tokenmill generate | chat | serve | router | quantize`. Flags are generated from config
dataclasses."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from tokenmill import cli_commands
from tokenmill.cli_flags import SAMPLING_FLAGS, add_dataclass_flags
from tokenmill.config import EngineConfig
from tokenmill.sampling_params import SamplingParams


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
        add_dataclass_flags(p, SamplingParams, only=SAMPLING_FLAGS)
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


def main(argv: list[str] | None = None) -> int:
    from tokenmill.sim import cli as sim_cli

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        commands = {
            "generate": cli_commands.cmd_generate,
            "chat": cli_commands.cmd_chat,
            "serve": cli_commands.cmd_serve,
            "router": cli_commands.cmd_router,
            "quantize": cli_commands.cmd_quantize,
            "simulate": sim_cli.cmd_simulate,
            "make-trace": sim_cli.cmd_make_trace,
        }
        return commands[args.command](args)
    except ValueError as e:  # user errors: bad flags, bad model, bad request
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The handlers of `tokenmill generate | chat | serve | router | quantize`: each takes the
parsed arguments and returns the exit status."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from tokenmill.cli_flags import dataclass_flags, engine_config_of, sampling_params_of


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
    params = sampling_params_of(args)
    cfg = engine_config_of(args)
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

    engine = LLMEngine(engine_config_of(args))
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
        rid = engine.add_request(prompt_ids, sampling_params_of(args))
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
    engine_cfg = engine_config_of(args)
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

"""`python -m tokenmill generate | chat` in a subprocess, on the default model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

TIMEOUT = 120


def tokenmill(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "tokenmill", *args],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env,
    )


@pytest.mark.slow
def test_generate_json() -> None:
    prompt = "The capital of France is"
    r = tokenmill("generate", prompt, "--max-tokens", "8", "--dtype", "float32", "--json")
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, r.stdout
    obj = json.loads(lines[0])
    assert obj["prompt"] == prompt
    assert len(obj["token_ids"]) == 8
    assert all(isinstance(t, int) for t in obj["token_ids"])
    assert obj["finish_reason"] == "length"
    assert "Paris" in obj["text"]  # greedy is the CLI default


@pytest.mark.slow
def test_generate_file_and_chat_template(tmp_path) -> None:
    f = tmp_path / "prompts.jsonl"
    f.write_text('{"prompt": "What is the capital of France?"}\n\n"Name a color."\n')
    r = tokenmill(
        "generate", "--file", str(f), "--chat-template", "--max-tokens", "6",
        "--dtype", "float32", "--json",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    objs = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    assert [o["prompt"] for o in objs] == ["What is the capital of France?", "Name a color."]
    assert all(1 <= len(o["token_ids"]) <= 6 and o["text"].strip() for o in objs)


@pytest.mark.slow
def test_chat_replies_and_exits() -> None:
    r = tokenmill(
        "chat", "--max-tokens", "8", "--temperature", "0", "--dtype", "float32",
        stdin="Hello\n/exit\n",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip(), f"no reply; stderr: {r.stderr}"
    assert "SmolLM2" in r.stderr  # the banner goes to stderr, the reply to stdout


def test_generate_help_lists_engine_flags() -> None:
    r = tokenmill("generate", "--help")
    assert r.returncode == 0, r.stderr
    for flag in (
        "--max-num-batched-tokens",
        "--kv-cache-memory-gb",
        "--max-model-len",
        "--dtype",
        "--max-tokens",
        "--temperature",
        "--seed",
    ):
        assert flag in r.stdout, flag


def test_bad_flag_value_exits_2_naming_the_field() -> None:
    r = tokenmill("generate", "hello", "--temperature", "-1", "--max-tokens", "2")
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "temperature" in r.stderr
    assert "Traceback" not in r.stderr


def test_bad_flag_type_exits_2() -> None:
    r = tokenmill("generate", "hello", "--max-tokens", "many")
    assert r.returncode == 2
    assert "max-tokens" in r.stderr


def test_no_prompts_is_an_error() -> None:
    r = tokenmill("generate", "--max-tokens", "2")
    assert r.returncode != 0
    assert "no prompts" in r.stderr


def test_prefix_caching_flags() -> None:
    from tokenmill.cli import build_parser
    from tokenmill.cli_flags import engine_config_of

    parser = build_parser()
    for command in ("generate", "chat", "serve"):
        args = ["x"] if command == "generate" else []
        assert engine_config_of(parser.parse_args([command, *args])).enable_prefix_caching
        for off in ("--no-prefix-caching", "--no-enable-prefix-caching"):
            cfg = engine_config_of(parser.parse_args([command, *args, off]))
            assert cfg.enable_prefix_caching is False
    cfg = engine_config_of(parser.parse_args(["serve", "--cache-aware-max-waiting", "0"]))
    assert cfg.cache_aware_max_waiting == 0

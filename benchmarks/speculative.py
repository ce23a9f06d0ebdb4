"""Speculative decoding on the CPU: speculation off vs n-gram lookup vs SuffixDecoding, same run.

Workloads (the default model, greedy):
- repetitive: the model repeats or continues text it has seen -- "repeat your previous answer"
  turns (regenerate-with-previous-answer), an edit of a given code block, continuing a log of
  tool-call JSON lines and a file of near-identical functions;
- chat: plain questions, nothing to copy.
Each workload runs at batch 1 (one request at a time) and with all its requests at once
(--concurrency, default 8). All engines are loaded side by side and the modes take turns per
request (batch 1) or per batch, so load from other processes hits them alike. The suffix
proposer's global tree of earlier outputs is emptied before each (workload, batch) cell, so a
cell never drafts from its own previous run.

    python benchmarks/speculative.py [--max-tokens 128] [--modes off,ngram,suffix] [--out out.json]

Reported per cell: output tokens/s, speedup vs off, acceptance rate, tokens per decode step,
proposer time per engine step vs step time, and how many outputs equal the off mode's.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field

from common import host_info  # noqa: I001  (benchmarks/ is run as a script folder)

from tokenmill import LLM, SamplingParams
from tokenmill.spec_decode.speculator import build_proposer
from tokenmill.spec_decode.suffix import SuffixProposer

CODE = """def load_users(path):
    with open(path) as f:
        rows = [line.strip().split(",") for line in f]
    users = []
    for row in rows:
        if len(row) != 3:
            continue
        name, email, age = row
        users.append({"name": name, "email": email, "age": int(age)})
    return users
"""

QUESTIONS = [
    "What is the capital of France? Answer in two sentences.",
    "Explain what a hash table is.",
    "Give me three tips for learning to play the guitar.",
    "Why is the sky blue?",
    "Write a short poem about the sea.",
    "What are the health benefits of walking every day?",
    "How does a refrigerator keep food cold?",
    "Describe the water cycle in simple words.",
]

CITIES = ["Paris", "Berlin", "Tokyo", "Lima", "Oslo", "Cairo", "Austin", "Delhi", "Rome", "Kyiv"]


def _tool_log(i: int) -> str:
    lines = [
        json.dumps(
            {
                "tool": "get_weather",
                "arguments": {"city": c, "unit": "celsius", "days": 3},
                "id": f"call_{i}_{j}",
            }
        )
        for j, c in enumerate(CITIES[i % 3 : i % 3 + 6])
    ]
    return "Tool calls issued by the agent, one JSON object per line:\n" + "\n".join(lines) + "\n"


def _functions(i: int) -> str:
    names = ["user", "order", "invoice", "product", "payment", "account", "ticket", "review"]
    out = ["import sqlite3\n\n"]
    for name in names[i % 2 : i % 2 + 5]:
        out.append(
            f"def get_{name}_by_id(conn: sqlite3.Connection, {name}_id: int) -> dict | None:\n"
            f'    row = conn.execute("SELECT * FROM {name}s WHERE id = ?", ({name}_id,))'
            ".fetchone()\n"
            f"    return dict(row) if row else None\n\n\n"
        )
    return "".join(out)


@dataclass
class Workload:
    name: str
    prompts: list[list[int]]


def build_workloads(llm: LLM, num: int, previous: dict[str, str]) -> list[Workload]:
    tok = llm.get_tokenizer()

    def chat(messages: list[dict[str, str]]) -> list[int]:
        text = tok.apply_chat_template(messages, add_generation_prompt=True)
        return tok.encode(text, add_special_tokens=False)

    repetitive: list[list[int]] = []
    for i in range(num):
        kind = i % 4
        if kind == 0:  # regenerate with the previous answer in context
            q = QUESTIONS[i % len(QUESTIONS)]
            repetitive.append(
                chat(
                    [
                        {"role": "user", "content": q},
                        {"role": "assistant", "content": previous[q]},
                        {"role": "user", "content": "Please repeat your previous answer exactly."},
                    ]
                )
            )
        elif kind == 1:  # edit a given code block
            repetitive.append(
                chat(
                    [
                        {
                            "role": "user",
                            "content": "Repeat this code exactly, but rename `load_users` to "
                            f"`read_users_{i}`:\n```python\n{CODE}```",
                        }
                    ]
                )
            )
        elif kind == 2:  # tool-call JSON, continued
            repetitive.append(tok.encode(_tool_log(i), add_special_tokens=False))
        else:  # near-identical functions, continued
            repetitive.append(tok.encode(_functions(i), add_special_tokens=False))
    chat_prompts = [
        chat([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] + f" (#{i})"}])
        for i in range(num)
    ]
    return [Workload("repetitive", repetitive), Workload("chat", chat_prompts)]


@dataclass
class Cell:
    tokens: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # process CPU time: robust to other processes sharing the cores
    drafted: int = 0
    accepted: int = 0
    decode_steps: int = 0
    decode_tokens: int = 0
    propose_s: float = 0.0
    steps: int = 0
    step_s: float = 0.0
    outputs: list[list[int]] = field(default_factory=list)


class Timed:
    """Wraps an engine's step and its speculator's propose with wall-clock counters."""

    def __init__(self, llm: LLM) -> None:
        self.llm = llm
        self.propose_s = 0.0
        self.step_s = 0.0
        self.steps = 0
        engine = llm.engine
        step = engine.step

        def timed_step():
            t = time.perf_counter()
            try:
                return step()
            finally:
                self.step_s += time.perf_counter() - t
                self.steps += 1

        engine.step = timed_step
        spec = engine.speculator
        if spec is not None:
            propose = spec.propose

            def timed_propose(running):
                t = time.perf_counter()
                try:
                    return propose(running)
                finally:
                    self.propose_s += time.perf_counter() - t

            spec.propose = timed_propose

    def reset_global_tree(self) -> None:
        engine = self.llm.engine
        spec = engine.speculator
        if spec is not None and isinstance(spec.proposer, SuffixProposer):
            spec.proposer = build_proposer(engine.config, engine.model_config, engine.max_model_len)

    def run(self, prompts: list[list[int]], params: SamplingParams, cell: Cell) -> None:
        stats = self.llm.engine.scheduler.spec_stats
        before = (
            stats.num_drafted_tokens,
            stats.num_accepted_tokens,
            stats.num_decode_steps,
            stats.num_decode_tokens,
            self.propose_s,
            self.steps,
            self.step_s,
        )
        t, c = time.perf_counter(), time.process_time()
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        cell.seconds += time.perf_counter() - t
        cell.cpu_seconds += time.process_time() - c
        cell.outputs += [list(o.outputs[0].token_ids) for o in outs]
        cell.tokens += sum(len(o.outputs[0].token_ids) for o in outs)
        cell.drafted += stats.num_drafted_tokens - before[0]
        cell.accepted += stats.num_accepted_tokens - before[1]
        cell.decode_steps += stats.num_decode_steps - before[2]
        cell.decode_tokens += stats.num_decode_tokens - before[3]
        cell.propose_s += self.propose_s - before[4]
        cell.steps += self.steps - before[5]
        cell.step_s += self.step_s - before[6]


def _threshold(llm: LLM, batch: int) -> float | None:
    spec = llm.engine.speculator
    if spec is None or spec.cost is None:
        return None
    return round(spec.cost.acceptance_threshold(batch), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--modes", default="off,ngram,suffix")
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--num-speculative-tokens", type=int, default=8)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--kv-cache-memory-gb", type=float, default=0.25)
    ap.add_argument(
        "--num-threads",
        type=int,
        default=None,
        help="torch threads (1 makes CPU-time figures meaningful on a shared machine)",
    )
    ap.add_argument(
        "--repeats", type=int, default=1, help="runs per cell; the fastest run of each mode counts"
    )
    ap.add_argument(
        "--draft-model", default=None, help="the draft model of mode 'draft' (same vocabulary)"
    )
    ap.add_argument("--out", default=None, help="also write the results to this JSON file")
    args = ap.parse_args()

    modes = args.modes.split(",")
    engines: dict[str, Timed] = {}
    for mode in modes:
        llm = LLM(
            dtype=args.dtype,
            kv_cache_memory_gb=args.kv_cache_memory_gb,
            speculative=None if mode == "off" else mode,
            speculative_model=args.draft_model if mode == "draft" else None,
            num_speculative_tokens=args.num_speculative_tokens,
            num_threads=args.num_threads,
        )
        engines[mode] = Timed(llm)
    first = engines[modes[0]].llm
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    warm = SamplingParams(max_tokens=4, temperature=0.0)
    for timed in engines.values():
        timed.llm.generate([{"prompt_token_ids": [1, 2, 3, 4]}], warm, use_tqdm=False)

    # The model's own answers, for the "repeat your previous answer" requests.
    tok = first.get_tokenizer()
    previous = {}
    for q in QUESTIONS:
        text = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
        ids = tok.encode(text, add_special_tokens=False)
        out = first.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
        previous[q] = out.outputs[0].text
    workloads = build_workloads(first, args.num_prompts, previous)

    results = []
    for wl in workloads:
        for batch in (1, args.concurrency):
            runs: dict[str, list[Cell]] = {m: [] for m in modes}
            groups = [wl.prompts[i : i + batch] for i in range(0, len(wl.prompts), batch)]
            for r in range(args.repeats):
                for timed in engines.values():
                    timed.reset_global_tree()  # every run starts from the same state
                round_cells = {m: Cell() for m in modes}
                for g, group in enumerate(groups):
                    shift = (g + r) % len(modes)
                    for mode in modes[shift:] + modes[:shift]:  # take turns going first
                        engines[mode].run(group, params, round_cells[mode])
                for mode in modes:
                    runs[mode].append(round_cells[mode])
            cells = {m: min(runs[m], key=lambda c: c.seconds) for m in modes}
            base = cells[modes[0]]
            for mode in modes:
                c = cells[mode]
                all_tok_s = [round(x.tokens / x.seconds, 1) for x in runs[mode]]
                same = sum(a == b for a, b in zip(c.outputs, base.outputs, strict=True))
                row = {
                    "workload": wl.name,
                    "batch": batch,
                    "mode": mode,
                    "output_tokens": c.tokens,
                    "seconds": round(c.seconds, 2),
                    "tok_s": round(c.tokens / c.seconds, 2),
                    "speedup": round((c.tokens / c.seconds) / (base.tokens / base.seconds), 3),
                    "cpu_tok_s": round(c.tokens / c.cpu_seconds, 2),
                    "cpu_speedup": round(
                        (c.tokens / c.cpu_seconds) / (base.tokens / base.cpu_seconds), 3
                    ),
                    "acceptance_rate": round(c.accepted / c.drafted, 3) if c.drafted else 0.0,
                    "tokens_per_decode_step": round(c.decode_tokens / c.decode_steps, 3)
                    if c.decode_steps
                    else 0.0,
                    "drafted": c.drafted,
                    "accepted": c.accepted,
                    "propose_us_per_step": round(1e6 * c.propose_s / c.steps, 1) if c.steps else 0,
                    "step_ms": round(1e3 * c.step_s / c.steps, 2) if c.steps else 0,
                    "outputs_equal_to_off": f"{same}/{len(c.outputs)}",
                    # the acceptance chance a draft token needed at this batch size, at the end
                    "draft_threshold": _threshold(engines[mode].llm, batch),
                    "tok_s_per_run": all_tok_s,
                }
                results.append(row)
                print(json.dumps(row), flush=True)

    print()
    print(
        "| workload | batch | mode | tok/s | speedup | CPU-time tok/s | CPU speedup | accept "
        "| tok/step | propose µs/step | step ms | = off |"
    )
    print("|" + "---|" * 12)
    for r in results:
        print(
            f"| {r['workload']} | {r['batch']} | {r['mode']} | {r['tok_s']} | {r['speedup']}x | "
            f"{r['cpu_tok_s']} | {r['cpu_speedup']}x | "
            f"{r['acceptance_rate']} | {r['tokens_per_decode_step']} | "
            f"{r['propose_us_per_step']} | {r['step_ms']} | {r['outputs_equal_to_off']} |"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "host": host_info(), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()

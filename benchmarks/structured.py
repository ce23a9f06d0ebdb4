"""Structured output on the CPU: JSON-Schema-constrained vs free decoding, and grammar compile
time cold vs cached.

Decoding: the default model, greedy, chat prompts asking for an order as JSON. "json" requests
carry a schema (a list of up to 12 line items, each a bounded name, a quantity and a unit);
"free" requests have none and run to the same max_tokens (EOS ignored), so both modes decode the
same kind of step. "json" runs with forced runs (the engine's default: tokens the grammar allows
alone are appended unsampled), "json_unforced" with them off (max_forced_tokens=0), on the same
engine; "differing" counts the requests whose tokens differ between the two (none with batch
invariance, the default; with --no-batch-invariant a forced run's matmuls have more rows than a
decode's, and the last bits, hence near-tie argmaxes, may differ as between batch sizes).
Batch 1 runs the requests one at a time, batch 16 all at once. The modes take turns and the best of
--repeats runs counts (other processes' load hits all alike). Reported: output tokens/s, tokens
per request, and engine steps.

Compile: a fresh StructuredOutputManager (the vocabulary's TokenizerInfo built once, timed on
its own), then --num-schemas distinct schemas compiled cold (a cache miss each: xgrammar's own
cache is off) and again cached (the manager's cache hit).

llama.cpp side by side (`--llama-bin DIR`, see structured_llama.py): the same requests against
`DIR/llama-server` with its `json_schema` field; a table of tokens/s per target, batch and mode,
and each target's json/free ratio.

    python benchmarks/structured.py [--max-tokens 64] [--repeats 3] [--no-batch-invariant]
        [--llama-bin DIR] [--out out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

from common import host_info, write_results  # noqa: I001  (benchmarks/ is run as a script folder)

from tokenmill import LLM, SamplingParams, StructuredOutputsParams
from tokenmill.loader.model_source import default_model_path

ITEM = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "qty": {"type": "integer", "minimum": 1, "maximum": 99},
        "unit": {"enum": ["kg", "g", "piece", "box"]},
    },
    "required": ["name", "qty", "unit"],
}
SCHEMA = {
    "type": "object",
    "properties": {
        "customer": {"type": "string", "maxLength": 20},
        "items": {"type": "array", "items": ITEM, "minItems": 1, "maxItems": 12},
        "express": {"type": "boolean"},
    },
    "required": ["customer", "items", "express"],
}
FOODS = ["apples", "rice", "coffee", "flour", "tea", "eggs", "cheese", "olives"]


def messages(i: int) -> list[dict]:
    foods = ", ".join(FOODS[i % 4 : i % 4 + 4])
    return [{"role": "user", "content": f"Customer {i} orders {foods}. Write the order as JSON."}]


def run(
    llm: LLM, batch: int, num: int, params: SamplingParams, max_forced: int
) -> tuple[float, list[list[int]], int, float, list[tuple[str, str | None]]]:
    """(seconds, each request's output tokens, engine steps, CPU seconds of this process, each
    request's text and finish reason) for
    `num` requests, `batch` at a time, with at most `max_forced` forced tokens per step. CPU
    time counts the work done whatever else loads the host (a rough guide where wall time is
    spread by other processes)."""
    sched = llm.engine.scheduler
    # The scheduler reads this per step; switching it on one engine keeps weights and kernels
    # the same for both modes.
    sched.config = dataclasses.replace(sched.config, max_forced_tokens=max_forced)
    steps = [0]
    schedule = sched.schedule

    def counting_schedule(*a, **kw):  # type: ignore[no-untyped-def]
        steps[0] += 1
        return schedule(*a, **kw)

    sched.schedule = counting_schedule  # type: ignore[method-assign]
    t0, c0, tokens, texts = time.perf_counter(), time.process_time(), [], []
    try:
        for start in range(0, num, batch):
            convs = [messages(i) for i in range(start, min(num, start + batch))]
            outs = llm.chat(convs, params, use_tqdm=False)
            tokens += [list(o.outputs[0].token_ids) for o in outs]
            texts += [(o.outputs[0].text, o.outputs[0].finish_reason) for o in outs]
    finally:
        del sched.schedule  # the class's method again
    return time.perf_counter() - t0, tokens, steps[0], time.process_time() - c0, texts


def validity(texts: list[tuple[str, str | None]]) -> tuple[int, int]:
    """(outputs that ended by the grammar and parse and validate against SCHEMA, outputs that
    ended by the grammar); an output cut by max_tokens is incomplete, not invalid."""
    import jsonschema

    done = [text for text, reason in texts if reason == "stop"]
    valid = 0
    for text in done:
        try:
            jsonschema.validate(json.loads(text), SCHEMA)
        except (ValueError, jsonschema.ValidationError):
            continue
        valid += 1
    return valid, len(done)


def bench_decode(args: argparse.Namespace, llm: LLM) -> list[dict]:
    json_params = SamplingParams(
        temperature=0,
        max_tokens=args.max_tokens,
        structured_outputs=StructuredOutputsParams(json=SCHEMA),
    )
    max_forced = llm.engine.scheduler.config.max_forced_tokens or 16
    modes = {  # mode -> (params, max_forced_tokens)
        "free": (
            SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True),
            max_forced,
        ),
        "json": (json_params, max_forced),
        "json_unforced": (json_params, 0),
    }
    run(llm, 16, 16, json_params, max_forced)  # warm-up: kernels, the vocabulary, the grammar
    rows = []
    for batch, num in ((1, args.num_single), (16, 16)):
        best: dict[str, tuple[float, int, int, float]] = {}
        outputs: dict[str, list[list[int]]] = {}
        texts: dict[str, list[tuple[str, str | None]]] = {}
        for _ in range(args.repeats):
            for mode, (params, forced) in modes.items():
                secs, toks, steps, cpu, texts[mode] = run(llm, batch, num, params, forced)
                outputs[mode] = toks
                n = sum(map(len, toks))
                if mode not in best or n / secs > best[mode][1] / best[mode][0]:
                    best[mode] = (secs, n, steps, cpu)
        pairs = zip(outputs["json"], outputs["json_unforced"], strict=True)
        differing = sum(a != b for a, b in pairs)
        for mode, (secs, toks, steps, cpu) in best.items():
            row = {"target": "tokenmill", "batch": batch, "mode": mode, "requests": num}
            row["seconds"] = secs
            row.update(output_tokens=toks, tok_s=toks / secs, tokens_per_request=toks / num)
            row.update(steps=steps, differing=differing if mode.startswith("json") else None)
            row.update(cpu_seconds=cpu, tok_per_cpu_s=toks / cpu)
            rows.append(row)
            print(json.dumps(row))
    # Validity: the same 16 requests with room to finish (at --max-tokens most are cut short).
    long_params = dataclasses.replace(json_params, max_tokens=args.validity_max_tokens)
    _, toks, _, _, done = run(llm, 16, 16, long_params, max_forced)
    valid, complete = validity(done)
    row = {"target": "tokenmill", "batch": 16, "mode": "validity", "requests": 16}
    row["complete"] = complete
    row.update(valid=valid, max_tokens=args.validity_max_tokens, output_tokens=sum(map(len, toks)))
    rows.append(row)
    print(json.dumps(row))
    return rows


def bench_compile(args: argparse.Namespace, llm: LLM) -> dict:
    from tokenmill.structured import StructuredOutputManager, tokenizer_info

    engine = llm.engine
    backend, eos = engine.tokenizer.backend, engine.eos_token_ids
    vocab_size = engine.model_config.vocab_size
    t0 = time.perf_counter()
    info = tokenizer_info(backend, eos, vocab_size)
    info_s = time.perf_counter() - t0
    manager = StructuredOutputManager(lambda: info)
    manager.compiler  # noqa: B018  (built here, outside the timings below)
    specs = []
    for i in range(args.num_schemas):  # distinct schemas: a renamed property each
        schema = json.loads(json.dumps(SCHEMA).replace('"customer"', f'"customer_{i}"'))
        specs.append(StructuredOutputsParams(json=schema))
    cold, cached = [], []
    for spec in specs:
        t = time.perf_counter()
        manager.validate(spec)
        cold.append(time.perf_counter() - t)
    for spec in specs:
        t = time.perf_counter()
        manager.validate(spec)
        cached.append(time.perf_counter() - t)
    manager.close()
    result = {
        "tokenizer_info_ms": info_s * 1e3,
        "cold_ms_median": statistics.median(cold) * 1e3,
        "cold_ms_max": max(cold) * 1e3,
        "cached_ms_median": statistics.median(cached) * 1e3,
        "num_schemas": len(specs),
    }
    print(json.dumps(result))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--num-single", type=int, default=4, help="requests run at batch 1")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--num-schemas", type=int, default=20)
    ap.add_argument(
        "--validity-max-tokens", type=int, default=512, help="room for the validity pass"
    )
    ap.add_argument(
        "--batch-invariant",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the engine's option (default on, as in the engine)",
    )
    ap.add_argument("--llama-bin", default=None, help="llama.cpp's bin folder (llama-server)")
    ap.add_argument("--llama-port", type=int, default=8323)
    ap.add_argument("--out", default="benchmarks/results/structured.json")
    ap.add_argument("--no-tokenmill", action="store_true", help="llama-server's runs only")
    args = ap.parse_args()
    results: dict = {"decode": []}
    if not args.no_tokenmill:
        llm = LLM(batch_invariant=args.batch_invariant)
        results = {"compile": bench_compile(args, llm), "decode": bench_decode(args, llm)}
        del llm  # the cores go to llama-server alone
    if args.llama_bin:
        from structured_llama import bench_llama

        log = Path(args.out).with_suffix(".llama-server.log")
        log.parent.mkdir(parents=True, exist_ok=True)
        results["decode"] += bench_llama(args, str(default_model_path()), SCHEMA, messages, log)
    print_table(results["decode"])
    results["host"] = host_info()
    write_results(args, results)


def print_table(rows: list[dict]) -> None:
    """tokens/s per target, batch and mode; json/free: the constrained run's speed relative to
    the free one's (the target: >= 1 with forced runs), by wall time and, for tokenmill, by
    this process's CPU time."""
    by = {(r["target"], r["batch"], r["mode"]): r for r in rows}
    print(f"{'target':<10} {'batch':>5} {'free':>8} {'json':>8} {'unforced':>9} {'json/free':>9}"
          f" {'(cpu)':>6}")  # fmt: skip
    for target, batch in sorted({(t, b) for t, b, _ in by}):
        free, js, unf = (by.get((target, batch, m)) for m in ("free", "json", "json_unforced"))
        cells = [f"{r['tok_s']:8.1f}" if r else f"{'-':>8}" for r in (free, js)]
        cells.append(f"{unf['tok_s']:9.1f}" if unf else f"{'-':>9}")
        ratio = f"{js['tok_s'] / free['tok_s']:9.2f}" if free and js else f"{'-':>9}"
        cpu = "-"
        if free and js and "tok_per_cpu_s" in js:
            cpu = f"{js['tok_per_cpu_s'] / free['tok_per_cpu_s']:.2f}"
        print(f"{target:<10} {batch:>5} {' '.join(cells)} {ratio} {cpu:>6}")


if __name__ == "__main__":
    main()

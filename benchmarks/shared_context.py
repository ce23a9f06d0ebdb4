"""A small SCBench (arXiv 2412.10319): KV reuse across turns and across requests.

One ~2,000-token shared document (a key-value store in the style of SCBench's Retr.KV, with
prose between the entries), asked about in two modes:
  (a) multi-turn: 5 questions, one after the other, in one conversation; each turn's prompt is
      the previous prompt + the model's answer (token ids appended, never re-tokenized) + the
      next question;
  (b) multi-request: 8 independent questions on the same document, sent together.
Both run with prefix caching on and off in the same process (same model and settings
otherwise, each mode from a cold cache), alternately, `--repeats` times; times are medians.
Reported per turn / request: TTFT, end-to-end time, cached prompt tokens; per mode: the prefix
hit rate and whether the greedy answers are token-identical either way. The history uses the
model's own answers. The default model is far too small to retrieve the values correctly: this
measures the mechanics, not accuracy.

    python benchmarks/shared_context.py [--doc-tokens 2000] [--max-tokens 32] [--repeats 3]
                                        [--no-batch-invariant] [--out out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass

from common import host_info  # noqa: I001  (benchmarks/ is run as a script folder)

from tokenmill import LLM, SamplingParams
from tokenmill.engine.engine import LLMEngine

FILLER = (
    "The archive keeps these records for the research office. Each entry was checked twice by "
    "the evening staff before it was copied into the ledger, and nothing may be changed later."
)


@dataclass
class Timed:
    ttft_s: float
    e2e_s: float
    num_prompt_tokens: int
    num_cached_tokens: int
    token_ids: list[int]
    text: str


def make_document(tok, num_tokens: int, seed: int = 0) -> tuple[str, dict[str, str]]:
    """Key-value records with filler prose until the document has ~`num_tokens` tokens."""
    rng = random.Random(seed)
    records: dict[str, str] = {}
    parts: list[str] = []
    while len(tok.encode("\n".join(parts), add_special_tokens=False)) < num_tokens:
        key, value = f"{rng.getrandbits(32):08x}", f"{rng.getrandbits(32):08x}"
        records[key] = value
        parts.append(f'Record "{key}": "{value}". {FILLER}')
    return "\n".join(parts), records


def run_batch(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> list[Timed]:
    """Adds all prompts at once and steps the engine; TTFT is measured from the add."""
    t0 = time.perf_counter()
    rids = [engine.add_request(p, params) for p in prompts]
    first: dict[str, float] = {}
    done: dict[str, tuple[float, object]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            now = time.perf_counter()
            if out.outputs[0].token_ids and out.request_id not in first:
                first[out.request_id] = now
            if out.finished:
                done[out.request_id] = (now, out)
    results = []
    for rid, prompt in zip(rids, prompts, strict=True):
        end, out = done[rid]
        c = out.outputs[0]  # type: ignore[attr-defined]
        results.append(
            Timed(
                ttft_s=first.get(rid, end) - t0,
                e2e_s=end - t0,
                num_prompt_tokens=len(prompt),
                num_cached_tokens=out.num_cached_tokens,  # type: ignore[attr-defined]
                token_ids=list(c.token_ids),
                text=c.text,
            )
        )
    return results


def turn_suffix(tok, history: list[dict[str, str]], answer: str, question: str) -> list[int]:
    """Token ids that follow the model's answer in the next turn's prompt: the end of the
    assistant turn, the next user turn and the generation prompt (the template's own text)."""
    before = tok.apply_chat_template(history, add_generation_prompt=True) + answer
    after = tok.apply_chat_template(
        [*history, {"role": "assistant", "content": answer}, {"role": "user", "content": question}]
    )
    if not after.startswith(before):
        raise ValueError("the chat template does not render the history as a prefix")
    return tok.encode(after[len(before) :], add_special_tokens=False)


def multi_turn(
    engine: LLMEngine, doc: str, questions: list[str], params: SamplingParams
) -> list[Timed]:
    tok = engine.tokenizer
    history = [{"role": "user", "content": f"Document:\n{doc}\n\nQuestion: {questions[0]}"}]
    prompt = tok.encode(tok.apply_chat_template(history), add_special_tokens=False)
    results = []
    for i, question in enumerate(questions):
        if i:
            prev = results[-1]
            answer_ids = [t for t in prev.token_ids if t not in engine.eos_token_ids]
            prompt = prompt + answer_ids + turn_suffix(tok, history, prev.text, question)
            history += [
                {"role": "assistant", "content": prev.text},
                {"role": "user", "content": question},
            ]
        (result,) = run_batch(engine, [prompt], params)
        results.append(result)
    return results


def multi_request(
    engine: LLMEngine, doc: str, questions: list[str], params: SamplingParams
) -> list[Timed]:
    tok = engine.tokenizer
    prompts = [
        tok.encode(
            tok.apply_chat_template(
                [{"role": "user", "content": f"Document:\n{doc}\n\nQuestion: {q}"}]
            ),
            add_special_tokens=False,
        )
        for q in questions
    ]
    return run_batch(engine, prompts, params)


def make_engine(args, cache: bool) -> LLMEngine:
    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        batch_invariant=args.batch_invariant,
        enable_prefix_caching=cache,
        num_threads=args.num_threads,
    )
    llm.generate("Warm-up: say hello.", SamplingParams(max_tokens=4), use_tqdm=False)
    return llm.engine


def run_modes(engine: LLMEngine, doc: str, turns: list[str], reqs: list[str], args) -> dict:
    """Both modes once, each from a cold prefix cache."""
    kv = engine.scheduler.kv_cache_manager
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    out: dict = {"dtype": str(engine.dtype)}
    modes = (("multi_turn", multi_turn, turns), ("multi_request", multi_request, reqs))
    for name, fn, questions in modes:
        kv.reset_prefix_cache()
        q0, h0 = kv.prefix_queries, kv.prefix_hits
        t0 = time.perf_counter()
        results = fn(engine, doc, questions, params)
        out[name] = {
            "total_s": time.perf_counter() - t0,
            "hit_rate": (kv.prefix_hits - h0) / max(1, kv.prefix_queries - q0),
            "results": [asdict(r) for r in results],
        }
    return out


def median_of(runs: list[dict]) -> dict:
    """The first run's answers and counts with each time replaced by its median over the runs
    (the repeats are alternated between cache on and off, so load on the machine hits both)."""
    out = json.loads(json.dumps(runs[0]))
    for mode in ("multi_turn", "multi_request"):
        out[mode]["total_s"] = statistics.median(r[mode]["total_s"] for r in runs)
        for i, res in enumerate(out[mode]["results"]):
            for key in ("ttft_s", "e2e_s"):
                res[key] = statistics.median(r[mode]["results"][i][key] for r in runs)
            same = all(r[mode]["results"][i]["token_ids"] == res["token_ids"] for r in runs)
            assert same, "greedy answers changed between repeats"
    return out


def report(on: dict, off: dict, turns: list[str], reqs: list[str]) -> dict:
    summary: dict = {}
    print(f"\n(a) multi-turn: {len(turns)} questions in one conversation (dtype {on['dtype']})")
    print("turn  prompt  cached  TTFT on  TTFT off  ratio   e2e on  e2e off  same answer")
    ratios = []
    a_on, a_off = on["multi_turn"]["results"], off["multi_turn"]["results"]
    for i, (x, y) in enumerate(zip(a_on, a_off, strict=True)):
        ratio = x["ttft_s"] / y["ttft_s"]
        if i:
            ratios.append(ratio)
        same = x["token_ids"] == y["token_ids"]
        print(
            f"{i + 1:>4}  {x['num_prompt_tokens']:>6}  {x['num_cached_tokens']:>6}  "
            f"{x['ttft_s']:>7.3f}  {y['ttft_s']:>8.3f}  {ratio:>5.3f}  {x['e2e_s']:>7.3f}  "
            f"{y['e2e_s']:>7.3f}  {same}"
        )
    summary["multi_turn"] = {
        "max_ttft_ratio_turns_2_on": max(ratios) if ratios else None,
        "total_s_on": on["multi_turn"]["total_s"],
        "total_s_off": off["multi_turn"]["total_s"],
        "hit_rate_on": on["multi_turn"]["hit_rate"],
        "answers_identical": all(
            x["token_ids"] == y["token_ids"] for x, y in zip(a_on, a_off, strict=True)
        ),
    }
    s = summary["multi_turn"]
    print(
        f"total {s['total_s_on']:.2f} s on / {s['total_s_off']:.2f} s off; hit rate "
        f"{s['hit_rate_on']:.3f}; TTFT ratio of turns 2..{len(turns)}: max "
        f"{s['max_ttft_ratio_turns_2_on']:.3f} (target <= 0.2); answers identical: "
        f"{s['answers_identical']}"
    )

    print(f"\n(b) multi-request: {len(reqs)} questions on the same document, sent together")
    print(" req  prompt  cached  TTFT on  TTFT off   e2e on  e2e off  same answer")
    b_on, b_off = on["multi_request"]["results"], off["multi_request"]["results"]
    for i, (x, y) in enumerate(zip(b_on, b_off, strict=True)):
        print(
            f"{i + 1:>4}  {x['num_prompt_tokens']:>6}  {x['num_cached_tokens']:>6}  "
            f"{x['ttft_s']:>7.3f}  {y['ttft_s']:>8.3f}  {x['e2e_s']:>7.3f}  {y['e2e_s']:>7.3f}  "
            f"{x['token_ids'] == y['token_ids']}"
        )
    summary["multi_request"] = {
        "mean_ttft_s_on": statistics.mean(x["ttft_s"] for x in b_on),
        "mean_ttft_s_off": statistics.mean(y["ttft_s"] for y in b_off),
        "total_s_on": on["multi_request"]["total_s"],
        "total_s_off": off["multi_request"]["total_s"],
        "hit_rate_on": on["multi_request"]["hit_rate"],
        "answers_identical": all(
            x["token_ids"] == y["token_ids"] for x, y in zip(b_on, b_off, strict=True)
        ),
    }
    s = summary["multi_request"]
    print(
        f"mean TTFT {s['mean_ttft_s_on']:.3f} s on / {s['mean_ttft_s_off']:.3f} s off; total "
        f"{s['total_s_on']:.2f} s on / {s['total_s_off']:.2f} s off; hit rate "
        f"{s['hit_rate_on']:.3f}; answers identical: {s['answers_identical']}"
    )
    print("\nanswers (cache on), multi-turn:")
    for i, x in enumerate(a_on):
        print(f"  {i + 1}. {x['text']!r}")
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct (GGUF)")
    p.add_argument("--dtype", default="auto")
    p.add_argument(
        "--batch-invariant",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the engine's option (default on, as in the engine)",
    )
    p.add_argument("--num-threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--doc-tokens", type=int, default=2000)
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32, help="answer length cap (greedy)")
    p.add_argument("--repeats", type=int, default=3, help="runs per setting; medians reported")
    p.add_argument("--out", default=None, help="write all figures to this JSON file")
    args = p.parse_args()

    from tokenmill.engine.tokenizer import Tokenizer
    from tokenmill.loader.model_source import default_model_path

    tok = (
        Tokenizer.from_gguf(default_model_path())
        if args.model is None
        else LLM(model=args.model).get_tokenizer()
    )
    doc, records = make_document(tok, args.doc_tokens)
    keys = list(records)
    rng = random.Random(1)
    asked = rng.sample(keys, min(len(keys), args.turns + args.requests))
    question = 'What is the value of record "{}"? Answer with the value only.'
    turns = [question.format(k) for k in asked[: args.turns]]
    reqs = [question.format(k) for k in asked[args.turns :]]
    num_doc = len(tok.encode(doc, add_special_tokens=False))
    print(f"document: {num_doc} tokens, {len(records)} records", flush=True)

    engines = {cache: make_engine(args, cache) for cache in (True, False)}
    runs: dict[bool, list[dict]] = {True: [], False: []}
    for r in range(args.repeats):
        for cache, engine in engines.items():
            t = time.perf_counter()
            runs[cache].append(run_modes(engine, doc, turns, reqs, args))
            label = "on" if cache else "off"
            dt = time.perf_counter() - t
            print(f"run {r + 1}/{args.repeats}, cache {label}: {dt:.1f} s", flush=True)
    on, off = median_of(runs[True]), median_of(runs[False])
    summary = report(on, off, turns, reqs)
    if args.out:
        doc = {"args": vars(args), "host": host_info(), "on": on, "off": off, "summary": summary}
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()

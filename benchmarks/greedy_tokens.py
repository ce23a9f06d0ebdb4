"""Greedy tokens of the default model under several engine configurations, for comparing two
commits: a refactoring must leave every token unchanged.

    python benchmarks/greedy_tokens.py --out A.json      # on each commit
    python benchmarks/greedy_tokens.py --compare A.json B.json

Configurations: the default (bf16 on AVX-512 BF16 CPUs, Q4_1 blocks, C++ kernels), chunked
prefill (16-token budget), fp32, int8 requantized at load, n-gram speculative decoding, and
batch invariance off (on by default); 8 prompts decoded together, 40 tokens each, EOS ignored.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import write_results

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
    "List three colours:",
    "Explain paged attention in one sentence.",
    "1, 2, 3, 4,",
    "Once upon a time",
    "The quick brown fox",
]
CONFIGS: dict[str, dict] = {
    "default": {},
    "chunked": {"max_num_batched_tokens": 16},
    "fp32": {"dtype": "float32"},
    "int8": {"quantization": "int8"},
    "ngram": {"speculative": "ngram"},
    "not-invariant": {"batch_invariant": False},
}


def run(max_tokens: int) -> dict[str, list[list[int]]]:
    from tokenmill import LLM, SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    tokens = {}
    for name, kwargs in CONFIGS.items():
        llm = LLM(**kwargs)
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
        tokens[name] = [list(out.outputs[0].token_ids) for out in outs]
        del llm
    return tokens


def compare(a_path: str, b_path: str) -> int:
    a, b = (json.loads(Path(p).read_text())["results"] for p in (a_path, b_path))
    differ = 0
    for name in a:
        same = sum(x == y for x, y in zip(a[name], b.get(name, []), strict=False))
        print(f"{name}: {same}/{len(a[name])} prompts identical")
        differ += same != len(a[name])
    return 1 if differ else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-tokens", type=int, default=40)
    ap.add_argument("--out", default="benchmarks/results/greedy_tokens.json")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"))
    args = ap.parse_args()
    if args.compare:
        sys.exit(compare(*args.compare))
    tokens = run(args.max_tokens)
    write_results(args, tokens)
    print({name: sum(map(len, t)) for name, t in tokens.items()})


if __name__ == "__main__":
    main()

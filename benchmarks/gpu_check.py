"""The one prepared GPU check: correctness and speed of the CUDA path in one run.

    python benchmarks/gpu_check.py [--budget-s 330] [--out PATH] [--hf-requests 256]
    python benchmarks/gpu_check.py --smoke --out /tmp/gpu_check.json   # CPU, tiny shapes

Random-weight models with the real shapes of Llama-3.2-1B and Qwen2.5-0.5B are saved as HF
folders (bf16 safetensors, synthetic offline tokenizer), so nothing is downloaded. Sections run
in priority order; each is skipped when less of the budget is left than its estimate, is
interrupted (SIGALRM) when it would overrun the budget, and records its traceback on failure
without stopping the others. The JSON (default $OUT/gpu_check.json, else
benchmarks/results/gpu_check.json) is rewritten after every section. --smoke runs the same code
paths on the CPU: no CUDA graphs (both "eager" and "graph" engines run eagerly), bandwidth by
wall clock, Triton under its interpreter.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

T_START = time.monotonic()  # the budget counts from here, before torch's import
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ runs as a script folder

import gpu_models as gm  # noqa: E402  (imports torch, not triton)

# graph_batch: (prompts, prompt len lo, hi, max_tokens lo, hi); decode: (prompt, generated);
# thr: (requests, prompt lo, hi, output lo, hi, max_num_seqs, max_num_batched_tokens)
GPU = dict(
    max_model_len=2048, kv_gb=4.0, graph_batch=(16, 16, 700, 16, 64), decode=(128, 256),
    thr=(512, 128, 1024, 128, 512, 256, 8192), parity_lens=(17, 300),
    greedy=((8, 64, 256, 700), 32), attn_ctx=1500,
    min_s=dict(build_models=25, eager_vs_graph=40, bandwidth=5, decode_batch1=25, throughput=60,
               logits_parity=40, greedy_agreement=15, triton_attention=10, pytest_gpu=30,
               quant_matmul=20, attention_bench=20),
    max_s=dict(throughput=150, pytest_gpu=100),  # else 120
)  # fmt: skip
SMOKE = dict(
    max_model_len=256, kv_gb=0.05, graph_batch=(6, 4, 60, 4, 12), decode=(16, 24),
    thr=(12, 8, 64, 4, 24, 8, 128), parity_lens=(5, 40), greedy=((4, 20, 50), 8), attn_ctx=40,
    min_s={}, max_s={},
)  # fmt: skip


class SectionTimeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise SectionTimeout("the time budget ran out inside this section")


class Check:
    """The run's state: folders, models and engines shared by sections, and the JSON."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.t0 = args, T_START
        self.p = SMOKE if args.smoke else GPU
        self.device = "cpu" if args.smoke else "cuda"
        self.shapes = gm.TINY_SHAPES if args.smoke else gm.SHAPES
        self.llama = next(iter(self.shapes))  # the 1B shape: speed sections use it
        self.tmp = Path(tempfile.mkdtemp(prefix="tokenmill-gpu-check-"))
        self.folders: dict[str, str] = {}
        self.hf: dict[str, object] = {}  # shape (or shape-fp32) -> transformers model on device
        self.engines: dict[str, tuple] = {}  # key -> (LLM, info)
        meta = {**gm.run_meta(ROOT), "smoke": args.smoke, "budget_s": args.budget_s}
        self.out: dict = {"meta": {**meta, "argv": sys.argv[1:]}, "sections": {}}

    def remaining(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.t0)

    def section(self, name: str, fn) -> None:
        rec: dict = {"status": "running", "result": {}}
        self.out["sections"][name] = rec
        self.write()  # if the whole process is killed, the JSON shows where
        need, left, t = self.p["min_s"].get(name, 2), self.remaining(), time.monotonic()
        if left < need:
            rec.update(status="skipped", reason=f"{left:.0f} s left, needs ~{need} s")
        else:
            cap = min(left, self.p["max_s"].get(name, 120))  # one section cannot take it all
            signal.setitimer(signal.ITIMER_REAL, max(cap, 1.0))
            try:
                rec["status"] = fn(self, rec["result"]) or "ok"
            except SectionTimeout:
                rec.update(status="timeout", error=traceback.format_exc(limit=-8))
            except Exception:
                rec.update(status="error", error=traceback.format_exc())
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        rec["elapsed_s"] = round(time.monotonic() - t, 2)
        print(f"[{time.monotonic() - self.t0:6.1f}s] {name}: {rec['status']}", flush=True)
        self.write()

    def write(self) -> None:
        path = Path(self.args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.out, indent=1, default=str))
        tmp.replace(path)

    def engine(self, key: str, shape: str, **kw) -> tuple:
        """A cached (LLM, info); kw over this run's defaults; CUDA-only fields off the GPU."""
        if key not in self.engines:
            base = dict(device=self.device, dtype="bfloat16", max_model_len=self.p["max_model_len"],
                        kv_cache_memory_gb=self.p["kv_gb"], max_num_seqs=16)  # fmt: skip
            base.update(kw)
            if self.device == "cpu":
                base.pop("enforce_eager", None)
            self.engines[key] = gm.make_llm(self.folders[shape], **base)
        return self.engines[key]

    def hf_model(self, shape: str, dtype: str):
        if dtype == "float32" and f"{shape}-fp32" not in self.hf:
            self.hf[f"{shape}-fp32"] = copy.deepcopy(self.hf[shape]).float()
        return self.hf[f"{shape}-fp32" if dtype == "float32" else shape]

    def drop(self, prefix: str = "") -> None:
        """Frees cached engines whose key starts with prefix, and the fp32 HF copies."""
        for k in [k for k in self.engines if k.startswith(prefix)]:
            del self.engines[k]
        for k in [k for k in self.hf if k.endswith("-fp32")]:
            del self.hf[k]
        gm.free_memory()

    def timed(self, fn) -> tuple[float, object]:
        gm.sync(self.device)
        t = time.perf_counter()
        out = fn()
        gm.sync(self.device)
        return time.perf_counter() - t, out

    def vocab(self) -> int:  # prompts valid for every shape
        return min(cfg["vocab_size"] for _, cfg in self.shapes.values())


# -- sections, in priority order after build_models -------------------------------------------
def build_models(c: Check, res: dict) -> None:
    import torch

    for i, (name, shape) in enumerate(c.shapes.items()):
        t = time.perf_counter()
        model = gm.build_hf_model(shape, c.device, torch.bfloat16, seed=i)
        info = gm.save_hf_folder(model, c.tmp / name)
        c.hf[name], c.folders[name] = model, info["folder"]
        n = sum(p.numel() for p in model.parameters())
        res[name] = {**info, "params": n, "build_s": time.perf_counter() - t}
    res["headline"] = ", ".join(f"{k} {v['params'] / 1e6:.1f}M params" for k, v in res.items())


def eager_vs_graph(c: Check, res: dict) -> str:
    n, lo, hi, out_lo, out_hi = c.p["graph_batch"]
    prompts = gm.random_prompts(n, lo, hi, c.vocab(), seed=1)
    rng = random.Random(2)
    outs = [rng.randint(out_lo, out_hi) for _ in prompts]  # the decode batch walks the buckets
    res.update(num_prompts=n, prompt_lens=[len(p) for p in prompts], max_tokens=outs)
    tokens = {}
    for mode, eager in (("eager", True), ("graph", False)):
        llm, res[f"{mode}_engine"] = c.engine(mode, c.llama, enforce_eager=eager, max_num_seqs=n)
        tokens[mode] = gm.tm_generate(llm, prompts, outs)
    res.update(gm.agreement(tokens["eager"], tokens["graph"]))
    res["identical"] = res["num_fully_agree"] == n
    info = res["graph_engine"]  # graph_replays: decode steps that replayed a captured graph
    res["graphs_active"] = info["cuda_graphs"] and info.get("graph_replays", 0) > 0
    res["headline"] = f"identical {res['num_fully_agree']}/{n}, graphs {res['graphs_active']}"
    return "ok" if res["identical"] else "fail"


def bandwidth(c: Check, res: dict) -> None:
    nbytes, reps = (2**26 if c.args.smoke else 2 * 2**30), 10
    gbps = gm.copy_bandwidth_gbps(c.device, nbytes, reps)
    model = c.hf[c.llama]
    weights = gm.decode_weight_bytes(model)
    kv_tok = gm.kv_bytes_per_token(model.config)
    prompt, gen = c.p["decode"]
    kv_read = kv_tok * (prompt + gen / 2)  # a decode step's KV read at the run's mean context
    res.update(copy_bytes=nbytes, reps=reps, copy_GBps=gbps, **weights, kv_bytes_per_token=kv_tok)
    res["timer"] = "cuda events" if c.device == "cuda" else "wall clock"
    res["roofline_tok_s"] = gbps * 1e9 / weights["total_bytes"]
    res["roofline_with_kv_tok_s"] = gbps * 1e9 / (weights["total_bytes"] + kv_read)
    res["headline"] = f"{gbps:.0f} GB/s, roofline {res['roofline_tok_s']:.0f} tok/s"


def decode_batch1(c: Check, res: dict) -> None:
    prompt_len, gen = c.p["decode"]
    prompt = gm.random_prompts(1, 0, 0, c.vocab(), seed=3, fixed=prompt_len)
    res.update(prompt_len=prompt_len, gen_tokens=gen)
    roof = c.out["sections"].get("bandwidth", {}).get("result", {}).get("roofline_tok_s")

    def rate(run) -> dict:  # decode tok/s: (gen - 1) tokens in the time past the first token
        run(4)  # warm-up
        t1, _ = c.timed(lambda: run(1))
        tn, _ = c.timed(lambda: run(gen))
        r = {"total_s": tn, "first_token_s": t1, "decode_tok_s": (gen - 1) / max(tn - t1, 1e-9)}
        if roof:
            r["roofline_fraction"] = r["decode_tok_s"] / roof
        return r

    for mode, eager in (("graph", False), ("eager", True)):
        llm, info = c.engine(mode, c.llama, enforce_eager=eager)
        before = info.get("graph_replays", 0)
        r = rate(lambda m, llm=llm: gm.tm_generate(llm, prompt, m))
        replays = info.get("graph_replays", 0) - before
        res[f"tokenmill_{mode}"] = {**r, "cuda_graphs": info["cuda_graphs"], "replays": replays}
    hf = c.hf[c.llama]
    res["transformers"] = rate(lambda m: gm.hf_generate(hf, prompt, m))
    g = res["tokenmill_graph"]
    res["meets_50pct_roofline"] = g["roofline_fraction"] >= 0.5 if roof else None
    res["headline"] = (
        f"graph {g['decode_tok_s']:.0f} tok/s"
        + (f" ({g['roofline_fraction']:.0%} of roofline)" if roof else "")
        + f", eager {res['tokenmill_eager']['decode_tok_s']:.0f}"
        + f", hf {res['transformers']['decode_tok_s']:.0f}"
    )


def throughput(c: Check, res: dict) -> None:
    n, plo, phi, olo, ohi, max_seqs, max_tokens = c.p["thr"]
    prompts = gm.random_prompts(n, plo, phi, c.vocab(), seed=4)
    rng = random.Random(5)
    outs = [rng.randint(olo, ohi) for _ in prompts]
    c.drop()  # the KV cache is sized from free memory: nothing else may hold an engine's
    kv = {"kv_cache_memory_gb": 0.25} if c.args.smoke else {}  # cuda: the default sizing
    llm, res["engine"] = gm.make_llm(
        c.folders[c.llama], device=c.device, dtype="bfloat16", max_model_len=c.p["max_model_len"],
        max_num_seqs=max_seqs, max_num_batched_tokens=max_tokens, **kv,
    )  # fmt: skip
    warm = gm.random_prompts(8, plo, phi, c.vocab(), seed=99)  # not in the prefix cache later
    gm.tm_generate(llm, warm, 8)  # warm-up: kernels compiled, graphs replayed once
    secs, got = c.timed(lambda: gm.tm_generate(llm, prompts, outs))
    n_in, n_out = sum(map(len, prompts)), sum(map(len, got))
    tm = res["tokenmill"] = {
        "requests": n, "elapsed_s": secs, "prompt_tokens": n_in, "output_tokens": n_out,
        "requested_output_tokens": sum(outs), "output_tok_s": n_out / secs,
        "total_tok_s": (n_in + n_out) / secs,
        "preemptions": getattr(llm.engine.scheduler, "num_preemptions", None),
    }  # fmt: skip
    llm = got = None
    gm.free_memory()
    hft = res["transformers"] = {}  # filled per batch: a timeout keeps the finished ones
    k, bsz = min(c.args.hf_requests, n), c.args.hf_batch or max_seqs
    try:
        gm.hf_batched(c.hf[c.llama], prompts[:k], outs[:k], bsz, c.timed, hft)
    finally:
        if hft.get("output_tok_s"):
            res["ratio_output_tok_s"] = tm["output_tok_s"] / hft["output_tok_s"]
            res["ratio_total_tok_s"] = tm["total_tok_s"] / hft["total_tok_s"]
            res["meets_5x"] = res["ratio_output_tok_s"] >= 5
    res["headline"] = (
        f"tokenmill {tm['output_tok_s']:.0f} out tok/s, hf {hft.get('output_tok_s', 0):.0f}, "
        f"x{res.get('ratio_output_tok_s', 0):.1f}"
    )


def logits_parity(c: Check, res: dict) -> str:
    import torch

    from tokenmill.testing import parity

    lens = c.p["parity_lens"]
    prompts = [gm.random_prompts(1, 0, 0, c.vocab(), seed=6 + n, fixed=n)[0] for n in lens]
    res["prompt_lens"] = list(lens)
    failed = []
    for shape in c.shapes:
        ref32 = None
        for dtype in ("float32", "bfloat16"):
            llm, _ = c.engine(f"parity-{shape}-{dtype}", shape, dtype=dtype, max_num_seqs=4,
                              enable_prefix_caching=False)  # fmt: skip
            ours = torch.cat(parity.engine_prefill_logits(llm, prompts))
            ref = torch.cat([parity.hf_logits(c.hf_model(shape, dtype), p) for p in prompts])
            r = res[f"{shape}/{dtype}"] = parity.logits_diff(ours, ref)
            scale = r["logit_scale"]
            if dtype == "float32":
                ref32 = ref
                r["tolerance"] = "max_abs_diff <= 1e-3 * logit_scale"
                r["pass"] = r["max_abs_diff"] <= 1e-3 * scale
            else:  # ours in bf16 may be off the fp32 truth by at most ~2x what HF's bf16 is
                r["ours_vs_fp32"] = (ours - ref32).abs().max().item()
                r["hf_bf16_vs_fp32"] = (ref - ref32).abs().max().item()
                r["tolerance"] = "ours_vs_fp32 <= max(2 * hf_bf16_vs_fp32, 1e-2 * logit_scale)"
                r["pass"] = r["ours_vs_fp32"] <= max(2 * r["hf_bf16_vs_fp32"], 1e-2 * scale)
            if not r["pass"]:
                failed.append(f"{shape}/{dtype}")
    res["headline"] = "all pass" if not failed else "FAIL " + ", ".join(failed)
    return "fail" if failed else "ok"


def greedy_agreement(c: Check, res: dict) -> str:
    from tokenmill.testing import parity

    lens, gen = c.p["greedy"]
    prompts = [gm.random_prompts(1, 0, 0, c.vocab(), seed=20 + n, fixed=n)[0] for n in lens]
    res.update(prompt_lens=list(lens), gen_tokens=gen, rule="fp32 must agree fully")
    ok, heads = True, []
    try:
        for shape in c.shapes:
            for dtype in ("float32", "bfloat16"):
                llm, _ = c.engine(f"parity-{shape}-{dtype}", shape, dtype=dtype, max_num_seqs=4,
                                  enable_prefix_caching=False)  # fmt: skip
                ours = parity.greedy_tokens(llm, prompts, gen)  # HF: one at a time
                hf = c.hf_model(shape, dtype)
                ref = [parity.hf_greedy(hf, p, gen) for p in prompts]
                r = res[f"{shape}/{dtype}"] = gm.agreement(ours, ref)
                short = "fp32" if dtype == "float32" else "bf16"
                heads.append(f"{shape} {short} {r['num_fully_agree']}/{len(prompts)}")
                if dtype == "float32":  # bf16 may diverge after a near-tie
                    ok &= r["num_fully_agree"] == len(prompts)
    finally:
        c.drop("parity-")
    res["headline"] = "fully agree: " + ", ".join(heads)
    return "ok" if ok else "fail"


def triton_attention(c: Check, res: dict) -> str:
    try:
        from tokenmill.kernels import triton_attention as ta

        kernel, oracle = ta.paged_attention, ta.reference_paged_attention
    except (ImportError, AttributeError) as e:
        res["missing"] = repr(e)
        return "missing"
    res.update(gm.check_paged_attention(kernel, oracle, c.shapes, c.device, c.p["attn_ctx"]))
    ok = all(r["pass"] for r in res.values())
    res["headline"] = f"{len(res)} cases, " + ("all pass" if ok else "FAIL")
    return "ok" if ok else "fail"


def pytest_gpu(c: Check, res: dict) -> str:
    c.drop()
    status, out = gm.run_pytest(ROOT, min(c.args.pytest_timeout, max(c.remaining() - 2, 5)))
    res.update(out)
    return status


def call_bench(c: Check, res: dict, module: str, name: str) -> str:
    """Calls the benchmark function of a script in benchmarks/ that other work is writing."""
    fn = gm.find_bench(module, (name,))
    if isinstance(fn, str):
        res["missing"] = fn
        return "missing"
    params = inspect.signature(fn).parameters
    kw = {k: v for k, v in {"device": c.device, "tiny": c.args.smoke}.items() if k in params}
    res["function"] = f"{module}.{fn.__name__}({kw})"
    out = fn(**kw)
    res["data"] = out if isinstance(out, dict) else {"value": out}
    res["headline"] = f"{fn.__name__}: {len(res['data'])} entries"


ATTN_BENCH = "benchmark_paged_attention"
SECTIONS = {  # build_models first (everything needs its folders), then priority order
    "build_models": build_models,
    "eager_vs_graph": eager_vs_graph,  # 2c
    "bandwidth": bandwidth,  # 3
    "decode_batch1": decode_batch1,  # 4
    "throughput": throughput,  # 5
    "logits_parity": logits_parity,  # 2a
    "greedy_agreement": greedy_agreement,  # 2b
    "triton_attention": triton_attention,  # 2d
    "pytest_gpu": pytest_gpu,
    "quant_matmul": lambda c, r: call_bench(c, r, "gpu_quant", "bench_quant_matmul"),  # 6
    "attention_bench": lambda c, r: call_bench(c, r, "gpu_attention", ATTN_BENCH),  # 7
}


def summary(c: Check) -> None:
    rows = []
    for name, s in c.out["sections"].items():
        err = (s.get("error") or "").strip().splitlines()
        note = s["result"].get("headline") or s.get("reason") or (err[-1] if err else "")
        note = note or s["result"].get("missing", "")
        rows.append({"section": name, "status": s["status"], "seconds": s["elapsed_s"],
                     "note": note})  # fmt: skip
    c.out["summary"] = rows
    m = c.out["meta"]
    print(f"\n{m['card'] or 'CPU (smoke)'} | torch {m['torch']} | triton {m['triton']} | "
          f"transformers {m['transformers']} | {time.monotonic() - c.t0:.0f} s")  # fmt: skip
    for r in rows:
        print(f"{r['section']:17s} {r['status']:8s} {r['seconds']:7.1f}s  {str(r['note'])[:90]}")


def main() -> None:
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "benchmarks/results"
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes (for the tests)")
    ap.add_argument("--budget-s", type=float, default=None, help="default 330 (smoke: 60)")
    ap.add_argument("--out", default=str(out_dir / "gpu_check.json"))
    ap.add_argument("--hf-requests", type=int, default=256, help="transformers' share of 5")
    ap.add_argument("--hf-batch", type=int, default=None, help="default: max_num_seqs (256)")
    ap.add_argument("--pytest-timeout", type=float, default=90.0)
    ap.add_argument("--only", default=None, help="comma list of sections (build_models implied)")
    args = ap.parse_args()
    if args.budget_s is None:
        args.budget_s = 60.0 if args.smoke else 330.0
    if args.smoke:  # before any triton import: kernels get defined under the interpreter
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not gm.torch.cuda.is_available():
        ap.error("torch sees no CUDA GPU; on the CPU run --smoke")
    wanted = set(args.only.split(",")) | {"build_models"} if args.only else set(SECTIONS)
    unknown = wanted - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; known: {list(SECTIONS)}")
    signal.signal(signal.SIGALRM, _on_alarm)
    c = Check(args)
    try:
        for name, fn in SECTIONS.items():
            if name in wanted:
                c.section(name, fn)
    finally:
        c.engines.clear()
        c.hf.clear()
        shutil.rmtree(c.tmp, ignore_errors=True)
        summary(c)
        c.write()


if __name__ == "__main__":
    main()

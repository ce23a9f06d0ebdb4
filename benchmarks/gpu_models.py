"""Helpers of benchmarks/gpu_check.py: random-weight HF model folders with real shapes (no hub
access needed), an offline synthetic tokenizer, engine construction that tolerates the
EngineConfig of before and after the CUDA path, and transformers-side throughput runs. Logit
and greedy parity with transformers come from tokenmill.testing.parity, as in the tests."""

from __future__ import annotations

import dataclasses
import gc
import random
import time
from pathlib import Path
from typing import Any

import torch
from common import hf_generate, host_info  # benchmarks/ is on the path (gpu_check puts it there)

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
# name -> (architecture, transformers config kwargs); bos/eos/pad ids are the tokenizer's 1/2/0
SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-3.2-1b": (
        "LlamaForCausalLM",
        dict(
            vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
            num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5,
            rope_theta=500000.0, rope_scaling=LLAMA3_ROPE, tie_word_embeddings=True,
            max_position_embeddings=131072,
        ),
    ),
    "qwen2.5-0.5b": (
        "Qwen2ForCausalLM",
        dict(
            vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
            num_attention_heads=14, num_key_value_heads=2, rms_norm_eps=1e-6,
            rope_theta=1000000.0, tie_word_embeddings=True, max_position_embeddings=32768,
            use_sliding_window=False,
        ),
    ),
}  # fmt: skip
_TINY = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
)  # fmt: skip
TINY_SHAPES = {
    "tiny-llama": ("LlamaForCausalLM", {**SHAPES["llama-3.2-1b"][1], **_TINY}),
    "tiny-qwen2": ("Qwen2ForCausalLM", {**SHAPES["qwen2.5-0.5b"][1], **_TINY}),
}
NUM_SPECIAL = 3  # <unk>=0 (also padding), <s>=1, </s>=2; prompts use ids >= NUM_SPECIAL


def synthetic_tokenizer(vocab_size: int):
    """A WordLevel tokenizer over "<unk>", "<s>", "</s>", "t3" .. "t{vocab-1}" (built offline)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"t{i}": i for i in range(NUM_SPECIAL, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="<unk>",
    )  # fmt: skip


def build_hf_model(shape: tuple[str, dict[str, Any]], device: str, dtype: torch.dtype, seed: int):
    """A random-weight transformers model of `shape`, initialised on `device` (fast on a GPU)."""
    import transformers

    arch, kwargs = shape
    config_cls = {"LlamaForCausalLM": "LlamaConfig", "Qwen2ForCausalLM": "Qwen2Config"}[arch]
    cfg = getattr(transformers, config_cls)(
        **kwargs, bos_token_id=1, eos_token_id=2, pad_token_id=0
    )
    cfg.architectures = [arch]
    torch.manual_seed(seed)
    with torch.device(device):
        model = getattr(transformers, arch)(cfg)
    model = model.to(device=device, dtype=dtype).eval()  # in case init ignored the device
    if arch == "Qwen2ForCausalLM":  # random q/k/v biases, so the bias path is really used
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (
                    layer.self_attn.q_proj,
                    layer.self_attn.k_proj,
                    layer.self_attn.v_proj,
                ):
                    torch.nn.init.normal_(proj.bias, std=0.05)
    return model


def save_hf_folder(model, folder: Path) -> dict[str, Any]:
    """config.json + model.safetensors + the synthetic tokenizer; returns what it wrote."""
    t = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    synthetic_tokenizer(model.config.vocab_size).save_pretrained(str(folder))
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    return {"folder": str(folder), "bytes": size, "save_s": time.perf_counter() - t}


def decode_weight_bytes(model, bytes_per_param: int = 2) -> dict[str, int]:
    """Weight bytes one batch-1 decode step reads: every nn.Linear (the decoder's projections
    and the LM head; a tied head is the embedding matrix, counted once, since the embedding
    lookup reads one row only). Biases and norm weights included; they are negligible."""
    linear = head = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            n = module.weight.numel() + (module.bias.numel() if module.bias is not None else 0)
            if name.endswith("lm_head"):
                head += n
            else:
                linear += n
    norms = sum(
        p.numel() for n, p in model.named_parameters() if p.dim() == 1 and "norm" in n.lower()
    )
    return {
        "decoder_linear_bytes": linear * bytes_per_param,
        "lm_head_bytes": head * bytes_per_param,
        "norm_bytes": norms * bytes_per_param,
        "total_bytes": (linear + head + norms) * bytes_per_param,
    }


def copy_bandwidth_gbps(device: str, nbytes: int, reps: int) -> float:
    """Device-to-device copy of `nbytes`, `reps` times: GB/s counting read + write bytes (CUDA
    events on a GPU, wall clock elsewhere)."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            dst.copy_(src)
        end.record()
        end.synchronize()
        secs = start.elapsed_time(end) / 1e3
    else:
        t = time.perf_counter()
        for _ in range(reps):
            dst.copy_(src)
        secs = time.perf_counter() - t
    return 2 * nbytes * reps / secs / 1e9


def kv_bytes_per_token(cfg, bytes_per_elem: int = 2) -> int:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * bytes_per_elem


def random_prompts(
    n: int, lo: int, hi: int, vocab: int, seed: int, fixed: int | None = None
) -> list[list[int]]:
    rng = random.Random(seed)
    return [
        [rng.randrange(NUM_SPECIAL, vocab) for _ in range(fixed or rng.randint(lo, hi))]
        for _ in range(n)
    ]


def engine_kwargs(**wanted: Any) -> tuple[dict[str, Any], list[str]]:
    """The keywords EngineConfig has (the CUDA path's fields may not be there yet), and the
    names dropped."""
    from tokenmill.config import EngineConfig

    names = {f.name for f in dataclasses.fields(EngineConfig)}
    kept = {k: v for k, v in wanted.items() if k in names}
    return kept, sorted(set(wanted) - names)


def make_llm(folder: str, **wanted: Any):
    """tokenmill.LLM over `folder` with the supported subset of `wanted`; returns (llm, info)."""
    from tokenmill import LLM

    kwargs, dropped = engine_kwargs(**wanted)
    t = time.perf_counter()
    llm = LLM(model=folder, **kwargs)
    runner = llm.engine.runner
    info = {
        "load_s": time.perf_counter() - t,
        "kwargs": {k: v for k, v in kwargs.items()},
        "dropped_kwargs": dropped,
        "num_kv_blocks": getattr(llm.engine, "num_blocks", None),
        "attention_backend": runner.attn_backend.name,
        # eager mode keeps the padded decode buffers but captures nothing (capture=False)
        "cuda_graphs": getattr(getattr(runner, "graphs", None), "capture", False),
        "dtype": str(llm.engine.dtype),
    }
    graphs = getattr(runner, "graphs", None)
    if graphs is not None and hasattr(graphs, "run"):  # count the decode steps that replay
        info["graph_replays"], run = 0, graphs.run

        def counted(batch):
            info["graph_replays"] += 1
            return run(batch)

        graphs.run = counted
    return llm, info


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def tm_generate(llm, prompts: list[list[int]], max_tokens: list[int] | int) -> list[list[int]]:
    """Greedy output token ids of each prompt, exactly max_tokens of them (ignore_eos)."""
    from tokenmill import SamplingParams

    outs = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in outs]
    res = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [r.outputs[0].token_ids for r in res]


def hf_batched(model, prompts, outs, batch_size: int, timed, stats: dict[str, Any]) -> None:
    """Offline throughput of transformers generate: batches of prompts sorted by length, left
    padded, each generating its longest requested output for every row; only requested tokens
    count as output. `timed(fn) -> (seconds, result)`; `stats` is updated after every batch."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    hf_generate(model, prompts[:2], 2)  # warm-up
    note = "sorted by length, left padded, every row generates the batch's longest output"
    stats.update(requests=0, elapsed_s=0.0, prompt_tokens=0, useful_output_tokens=0,
                 generated_tokens=0, batch_size=batch_size, note=note)  # fmt: skip
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        longest = max(outs[j] for j in idx)
        batch = [prompts[j] for j in idx]
        secs, _ = timed(lambda b=batch, m=longest: hf_generate(model, b, m))
        stats["requests"] += len(idx)
        stats["elapsed_s"] += secs
        stats["prompt_tokens"] += sum(map(len, batch))
        stats["useful_output_tokens"] += sum(outs[j] for j in idx)
        stats["generated_tokens"] += longest * len(idx)
        useful = stats["useful_output_tokens"]
        stats["output_tok_s"] = useful / stats["elapsed_s"]
        stats["total_tok_s"] = (stats["prompt_tokens"] + useful) / stats["elapsed_s"]


def agreement(a: list[list[int]], b: list[list[int]]) -> dict[str, Any]:
    """How many outputs agree fully, and each pair's agreeing prefix length."""
    prefixes = []
    for x, y in zip(a, b, strict=True):
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        prefixes.append(n)
    full = sum(p == len(x) == len(y) for p, x, y in zip(prefixes, a, b, strict=True))
    return {
        "num_prompts": len(a),
        "num_fully_agree": full,
        "agreeing_prefix": prefixes,
        "mean_agreeing_prefix": sum(prefixes) / max(len(prefixes), 1),
    }


# -- non-model helpers of gpu_check.py ---------------------------------------------------------
def run_meta(root: Path) -> dict[str, Any]:
    """Card, library versions and the git commit (None where there is no git checkout)."""
    import platform
    import subprocess

    import transformers

    def git(*cmd: str) -> str | None:
        try:
            r = subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True, timeout=10)
        except Exception:
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    cuda = torch.cuda.is_available()
    props = torch.cuda.get_device_properties(0) if cuda else None
    return {
        "card": torch.cuda.get_device_name() if cuda else None,
        "gpu_memory_gib": props.total_memory / 2**30 if props else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": host_info(),
    }


def check_paged_attention(kernel, oracle, shapes: dict, device: str, max_ctx: int) -> dict:
    """`kernel` against `oracle` (same signature) on random paged batches: 8 decode rows, and
    3 decode rows + 3 prompt chunks with a cached prefix; fp32 and bf16; every shape's heads.
    Blocks are a random permutation, so tables are scattered as in a real cache."""
    import inspect

    g, res = torch.Generator().manual_seed(7), {}
    i32 = dict(dtype=torch.int32, device=device)
    one_split = "num_splits" in inspect.signature(kernel).parameters
    for shape, (_, cfg) in shapes.items():
        h, hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        d = cfg.get("head_dim") or cfg["hidden_size"] // h
        for case, ndec, nchunk in (("decode", 8, 0), ("mixed", 3, 3)):
            rand = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))  # noqa: E731
            qlens = [1] * ndec + [rand(2, max_ctx // 8 + 3) for _ in range(nchunk)]
            lens = [rand(0, max_ctx) + q for q in qlens]  # cached prefix + this step's queries
            bs, width = 16, max(-(-n // 16) for n in lens)
            tables = torch.randperm(len(lens) * width, generator=g).view(len(lens), width)
            starts = [0]
            for q in qlens:
                starts.append(starts[-1] + q)
            for dtype in (torch.float32, torch.bfloat16):
                kc = torch.randn(len(lens) * width, bs, hkv, d, generator=g).to(device, dtype)
                vc = torch.randn(kc.shape, generator=g).to(device, dtype)
                q = torch.randn(starts[-1], h, d, generator=g).to(device, dtype)
                args = (q, kc, vc, tables.to(**i32), torch.tensor(lens, **i32),
                        torch.tensor(starts, **i32), max(qlens), d**-0.5)  # fmt: skip
                ref = oracle(*args).float()
                tol = 2e-3 if dtype == torch.float32 else 3e-2
                r = {"max_abs_diff": (kernel(*args).float() - ref).abs().max().item()}
                if case == "decode" and one_split:  # the split-K path and the plain one
                    r["max_abs_diff_one_split"] = (
                        (kernel(*args, num_splits=1).float() - ref).abs().max().item()
                    )
                worst = max(r.values())
                r.update({"tolerance": tol, "pass": worst <= tol, "seq_lens": lens})
                res[f"{shape}/{case}/{str(dtype).removeprefix('torch.')}"] = r
    return res


def run_pytest(root: Path, timeout: float) -> tuple[str, dict[str, Any]]:
    """`pytest -q -m gpu tests` in a subprocess: status and the outcome counts."""
    import re
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests", "-p", "no:cacheprovider"]
    res: dict[str, Any] = {"cmd": " ".join(cmd[1:]), "timeout_s": timeout}
    try:
        r = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout
        res["tail"] = (out or "")[-3000:]
        return "timeout", res
    res["returncode"], res["tail"] = r.returncode, (r.stdout + r.stderr)[-3000:]
    for num, word in re.findall(r"(\d+) (passed|failed|skipped|deselected|error)", r.stdout):
        res[word] = int(num)
    words = ("passed", "failed", "skipped", "error")
    res["headline"] = ", ".join(f"{res[w]} {w}" for w in words if w in res) or "no tests"
    return ("ok" if r.returncode in (0, 5) else "fail"), res  # 5: no gpu tests collected


def find_bench(module: str, names: tuple[str, ...]):
    """The benchmark function of benchmarks/<module>.py (a named one, else the first bench*),
    or a string saying what is missing."""
    import importlib
    import importlib.util
    import inspect

    if importlib.util.find_spec(module) is None:
        return f"benchmarks/{module}.py not found"
    mod = importlib.import_module(module)
    fns = [getattr(mod, n) for n in names if callable(getattr(mod, n, None))]
    fns += [
        f
        for n, f in vars(mod).items()
        if n.startswith("bench") and inspect.isfunction(f) and f.__module__ == mod.__name__
    ]
    return fns[0] if fns else f"no bench* function in benchmarks/{module}.py"

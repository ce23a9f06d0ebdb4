"""Frozen configuration. The CLI flags are generated from these fields (see cli.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tokenmill.config_checks import ATTENTION_BACKENDS, check_engine_config

__all__ = ["ATTENTION_BACKENDS", "EngineConfig", "ModelConfig"]


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters, read from config.json or GGUF metadata (HF field names)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q/k/v
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # The whole HF config, for the fields only one family reads (its model module reads them).
    hf_config: dict[str, Any] = field(default_factory=dict, hash=False, compare=False, repr=False)

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        archs = cfg.get("architectures") or [cfg.get("model_type", "?")]
        num_heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        arch = archs[0]
        # transformers >= 5 folds rope_theta and rope_scaling into one `rope_parameters` dict.
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        rope_theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        if rope.get("rope_type", rope.get("type", "default")) == "default":
            rope = {}
        sliding = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=num_heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=rope_theta,
            rope_scaling=rope or None,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", arch == "Qwen2ForCausalLM"),
            sliding_window=sliding if arch == "MistralForCausalLM" else None,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            hf_config=dict(cfg),
        )


@dataclass(frozen=True)
class EngineConfig:
    """Everything an engine needs to start. Field docs become the CLI's --help."""

    model: str | None = field(
        default=None,
        metadata={"help": "HF folder, .gguf file, hub id or alias; default: SmolLM2-135M-Instruct"},
    )
    tokenizer: str | None = field(
        default=None, metadata={"help": "tokenizer folder or hub id (default: the model's)"}
    )
    dtype: str = field(
        default="auto", metadata={"help": "auto | float32 | bfloat16 | float16 (auto: per device)"}
    )
    quantization: str | None = field(
        default=None,
        metadata={
            "help": "weights: none (dequantize to dtype) | int8 (per channel) | int4 (groups of "
            "32) | squeezellm (require a `tokenmill quantize` checkpoint) | default: as the "
            "checkpoint stores them (GGUF Q4_0/Q4_1/Q8_0 and SqueezeLLM stay quantized)"
        },
    )
    device: str = field(
        default="auto", metadata={"help": "auto (cuda when available, else cpu) | cpu | cuda[:N]"}
    )
    attention_backend: str = field(
        default="auto",
        metadata={
            "help": "auto (cpu: the C++ kernel, cuda: triton) | cpu | sdpa (PyTorch reference "
            "per sequence) | triton (one ragged kernel over the paged cache) | unified-ref "
            "(the PyTorch oracle of the triton kernel)"
        },
    )
    enforce_eager: bool = field(
        default=False,
        metadata={"help": "no CUDA graphs (by default decode-only steps replay captured graphs)"},
    )
    gpu_memory_utilization: float = field(
        default=0.9,
        metadata={
            "help": "cuda: fraction of the GPU's memory for weights, activations and the KV "
            "cache, which gets what a profiling forward leaves"
        },
    )
    seed: int = field(default=0, metadata={"help": "seed for requests that give none"})
    max_model_len: int | None = field(
        default=None, metadata={"help": "context length cap (default: the model's)"}
    )
    block_size: int = field(default=16, metadata={"help": "tokens per KV cache block"})
    kv_cache_memory_gb: float | None = field(
        default=None,
        metadata={
            "help": "memory budget for the KV cache, GiB (default: 1 on the CPU; on cuda, what "
            "gpu_memory_utilization leaves)"
        },
    )
    expert_memory_gb: float | None = field(
        default=None,
        metadata={
            "help": "MoE expert offloading: GiB of expert weights kept on the compute device, "
            "as a fixed pool of slots; the others stay in the checkpoint's memory map (read "
            "when used) and a miss loads one (output unchanged; default: every expert resident)"
        },
    )
    expert_cache_policy: str = field(
        default="lru",
        metadata={
            "help": "which offloaded expert a miss evicts: lru | hobbit (recency, frequency and "
            "how soon the expert's layer runs again)"
        },
    )
    expert_prefetch: bool = field(
        default=False,
        metadata={
            "help": "with expert_memory_gb: each MoE layer runs the next one's router on its "
            "input and loads the experts it predicts"
        },
    )
    expert_miss_precision: str | None = field(
        default=None,
        metadata={
            "help": "with expert_memory_gb, lossy: int4 | int2 keeps a low-bit copy of every "
            "expert on the compute device (beside the budget) and serves a miss whose routing "
            "weight is under expert_miss_threshold from it instead of loading the expert "
            "(default: off, every expert computed at full precision)"
        },
    )
    expert_miss_threshold: float = field(
        default=0.2,
        metadata={
            "help": "with expert_miss_precision: the routing weight (after top-k and "
            "renormalisation) under which a missed expert runs from its low-bit copy"
        },
    )
    num_kv_blocks: int | None = field(
        default=None,
        metadata={
            "help": "exact number of KV blocks, each holding every layer (overrides the memory "
            "budget)"
        },
    )
    hybrid_kv_cache: bool = field(
        default=True,
        metadata={
            "help": "a model mixing sliding-window and global layers gets a KV cache group per "
            "window, whose blocks are freed as they slide out (off: one table for all layers)"
        },
    )
    max_num_batched_tokens: int = field(
        default=512, metadata={"help": "token budget of one forward pass (Dynamic SplitFuse)"}
    )
    max_num_seqs: int = field(default=128, metadata={"help": "most requests running at once"})
    scheduling_policy: str = field(
        default="fcfs",
        metadata={
            "help": "fcfs | priority (lower priority value runs first, then arrival) | slo "
            "(least slack to the request's SLO deadlines first; see docs/architecture.md)"
        },
    )
    slo_reject_hopeless: bool = field(
        default=False,
        metadata={
            "help": "scheduling policy slo: refuse (429) a request that cannot meet its SLO even "
            "if served first, instead of serving it after the others"
        },
    )
    enable_prefix_caching: bool = field(
        default=True,
        metadata={
            "help": "reuse KV of identical prompt prefixes across requests and turns",
            "off_flag": "--no-prefix-caching",
        },
    )
    cache_aware_max_waiting: int = field(
        default=128,
        metadata={
            "help": "while at most this many requests wait, admit those with the longest cached "
            "prefix first (0: always the scheduling policy's order)"
        },
    )
    batch_invariant: bool = field(
        default=True,
        metadata={
            "help": "each token's computation is bit-identical whatever the batch, the prompt's "
            "chunking or the prefix-cache hits, so outputs do not change with load (off: the "
            "fastest kernel per row count; see docs/benchmarks.md)"
        },
    )
    speculative: str | None = field(
        default=None,
        metadata={
            "help": "speculative decoding proposer: suffix | ngram | draft (a small model, see "
            "speculative_model); "
            "output is identical to plain decoding"
        },
    )
    num_speculative_tokens: int = field(
        default=8, metadata={"help": "most draft tokens verified per request and step"}
    )
    speculative_draft_cost: float = field(
        default=0.12,
        metadata={
            "help": "cost of verifying one draft token as a fraction of a decode step's fixed "
            "cost, until it is measured from the engine's own step times; drafts shrink with "
            "the batch and a request's acceptance rate (0: always draft the full budget)"
        },
    )
    speculative_model: str | None = field(
        default=None,
        metadata={
            "help": "draft model for --speculative draft (path, GGUF or hub id; same vocabulary)"
        },
    )
    prompt_lookup_min: int = field(
        default=3, metadata={"help": "ngram: shortest tail n-gram looked up"}
    )
    prompt_lookup_max: int = field(default=4, metadata={"help": "ngram: longest tail n-gram"})
    suffix_max_depth: int = field(
        default=24, metadata={"help": "suffix: longest match / deepest suffix tree path"}
    )
    suffix_max_cached_requests: int = field(
        default=1000, metadata={"help": "suffix: finished outputs kept in the global tree"}
    )
    max_forced_tokens: int = field(
        default=16,
        metadata={
            "help": "structured output: most tokens appended per step, unsampled, where the "
            "grammar allows exactly one token (0: off). Token-identical to decoding them one "
            "at a time with batch_invariant (the default); without it the forced tokens' KV "
            "comes from more rows, whose last bits may differ as between batch sizes"
        },
    )
    num_threads: int | None = field(
        default=None,
        metadata={
            "help": "CPU threads for torch (per rank; default with tensor parallelism: "
            "the cores shared out between the ranks)"
        },
    )
    tensor_parallel_size: int = field(
        default=1,
        metadata={
            "help": "ranks the model is split over (Megatron-style: attention by KV head, MLP, "
            "vocabulary; MoE experts with --enable-expert-parallel); one process per rank on "
            "this host, gloo on cpu, NCCL on cuda"
        },
    )
    enable_expert_parallel: bool = field(
        default=False,
        metadata={
            "help": "tensor parallelism of a mixture-of-experts model: each rank keeps whole "
            "experts (an even share of each layer's), the router and shared experts replicated; "
            "the ranks' partial MoE outputs are summed with one all-reduce"
        },
    )
    distributed_executor_backend: str = field(
        default="mp",
        metadata={
            "help": "how tensor-parallel workers start: mp (spawned processes) | ray "
            "(actors in a placement group on one node)"
        },
    )
    distributed_port: int | None = field(
        default=None,
        metadata={"help": "tensor parallelism: rendezvous port on 127.0.0.1 (default: a free one)"},
    )
    allow_special_tokens_in_content: bool = field(
        default=False,
        metadata={
            "help": "chat: special-token text in messages (e.g. '<|im_end|>') becomes control "
            "tokens, as the template's own do; by default it is encoded as plain text, so a "
            "message cannot forge a turn of another role"
        },
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "passed to transformers"})

    def __post_init__(self) -> None:
        check_engine_config(self)

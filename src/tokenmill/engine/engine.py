"""The engine: validates and tokenizes requests, runs scheduler -> runner steps, emits outputs."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import random
import time

import torch

from tokenmill.config import EngineConfig, ModelConfig
from tokenmill.core.scheduler import Scheduler, SchedulerConfig
from tokenmill.engine.output_processor import OutputProcessor
from tokenmill.engine.tokenizer import Tokenizer
from tokenmill.errors import ContextLengthError, InvalidRequestError
from tokenmill.loader.model_loader import LoadedModel, load_model, resolve_device
from tokenmill.outputs import RequestOutput
from tokenmill.request import Request, RequestStatus
from tokenmill.sampling_params import SamplingParams, check_priority
from tokenmill.spec_decode.speculator import Speculator, build_proposer
from tokenmill.worker.kv_cache import KVCacheBudget
from tokenmill.worker.model_runner import GpuOptions, ModelRunner

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        config = dataclasses.replace(config, device=resolve_device(config.device))
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        t0 = time.perf_counter()
        loaded: LoadedModel = load_model(config)
        self.model_name = loaded.name
        self.model_config: ModelConfig = loaded.model_config
        self.tokenizer = _load_tokenizer(loaded)
        self.dtype = loaded.dtype
        self.max_model_len = loaded.max_model_len
        self.runner = ModelRunner(
            self.model_config,
            loaded.weights,
            dtype=self.dtype,
            max_model_len=self.max_model_len,
            kv_budget=KVCacheBudget(
                num_blocks=config.num_kv_blocks,
                memory_gb=config.kv_cache_memory_gb,
                gpu_memory_utilization=config.gpu_memory_utilization,
            ),
            block_size=config.block_size,
            device=config.device,
            quant=loaded.quant,
            batch_invariant=config.batch_invariant,
            attention_backend=config.attention_backend,
            gpu=GpuOptions(
                enforce_eager=config.enforce_eager,
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
            ),
        )
        self.num_blocks = self.runner.num_blocks
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_num_seqs=config.max_num_seqs,
                max_model_len=self.max_model_len,
                block_size=config.block_size,
                num_blocks=self.num_blocks,
                enable_prefix_caching=config.enable_prefix_caching,
                cache_aware_max_waiting=config.cache_aware_max_waiting,
                policy=config.scheduling_policy,
            )
        )
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids) | frozenset(
            self.model_config.eos_token_ids
        )
        self.outputs = OutputProcessor(self.tokenizer)
        proposer = build_proposer(config, self.model_config, self.max_model_len)
        self.speculator = (
            None
            if proposer is None
            else Speculator(
                proposer,
                config.num_speculative_tokens,
                self.scheduler.max_model_len,
                config.speculative_draft_cost,
            )
        )
        self._rng = random.Random(config.seed)
        self._ids = itertools.count()
        logger.info(
            "loaded %s (%s, %s) in %.1fs; KV cache %d blocks x %d tokens",
            self.model_name,
            self.model_config.architecture,
            self.dtype,
            time.perf_counter() - t0,
            self.num_blocks,
            config.block_size,
        )

    # -- requests -----------------------------------------------------------------------------
    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> str:
        """Validates, tokenizes and queues a request; raises InvalidRequestError on bad input."""
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.outputs.states:
            raise InvalidRequestError(f"request_id {request_id!r} is already running", "request_id")
        params.validate()
        prompt_text = prompt if isinstance(prompt, str) else None
        prompt_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self._validate(prompt_ids, params, priority)
        room = self.max_seq_len - len(prompt_ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        base_seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        reqs = [
            Request(
                request_id=request_id if params.n == 1 else f"{request_id}#{i}",
                prompt_token_ids=prompt_ids,
                sampling_params=params,
                eos_token_ids=self.eos_token_ids,
                max_tokens=max_tokens,
                seed=base_seed + i,
                priority=priority,
                parent_id=request_id if params.n > 1 else None,
                sample_index=i,
                cache_salt=cache_salt,
            )
            for i in range(params.n)
        ]
        self.outputs.add(prompt_text, reqs, request_id)
        for req in reqs:
            self.scheduler.add_request(req)
        return request_id

    @property
    def max_seq_len(self) -> int:
        """The most tokens (prompt plus output) one sequence may hold: the context length, which
        the KV cache always holds whole (the engine does not start otherwise)."""
        return self.scheduler.max_model_len

    def check_length(
        self, num_prompt_tokens: int, max_tokens: int | None = None, min_tokens: int = 0
    ) -> None:
        """Raises ContextLengthError unless a prompt of this length, plus `max_tokens` when
        given (and `min_tokens`, which could never all be generated otherwise), fits one
        sequence.

        This is exact for any n and any load. The samples of an n > 1 request share the
        prompt's full blocks through the prefix cache and each holds its own output blocks, but
        they need not run at once: under KV pressure the scheduler preempts the newest running
        sequence, so the oldest always advances, and one sequence of max_seq_len tokens fits
        the cache on its own. The last sampled token is never written to the cache, and the
        scheduler ends a sequence at max_seq_len tokens, so max_seq_len is the bound to check.
        """
        limit = self.max_seq_len
        what = f"This model's maximum context length is {limit} tokens"
        if num_prompt_tokens >= limit:
            raise ContextLengthError(
                f"{what}, but the prompt has {num_prompt_tokens} tokens (it must leave room for "
                "at least 1 generated token).",
                "prompt",
            )
        if max_tokens is not None and num_prompt_tokens + max_tokens > limit:
            raise ContextLengthError(
                f"{what}. However, you requested {num_prompt_tokens + max_tokens} tokens "
                f"({num_prompt_tokens} in the prompt, {max_tokens} for the completion). Please "
                "reduce the prompt or max_tokens.",
                "max_tokens",
            )
        if num_prompt_tokens + min_tokens > limit:
            raise ContextLengthError(
                f"{what}, so the {num_prompt_tokens}-token prompt leaves room for at most "
                f"{limit - num_prompt_tokens} generated tokens; min_tokens is {min_tokens}.",
                "min_tokens",
            )

    def _validate(self, prompt_ids: list[int], params: SamplingParams, priority: int) -> None:
        check_priority(priority)
        if not prompt_ids:
            raise InvalidRequestError("prompt must not be empty", "prompt")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(
                f"prompt token ids must be in [0, {vocab}); got {bad[:5]}", "prompt"
            )
        self.check_length(len(prompt_ids), None, params.min_tokens)
        for tok in params.logit_bias or {}:
            if not 0 <= tok < vocab:
                raise InvalidRequestError(
                    f"logit_bias token id {tok} is outside the vocabulary [0, {vocab})",
                    "logit_bias",
                )
        bad = [t for t in params.stop_token_ids or () if t >= vocab]
        if bad:
            raise InvalidRequestError(
                f"stop_token_ids must be in [0, {vocab}); got {bad[:5]}", "stop_token_ids"
            )

    def abort_request(self, request_id: str) -> RequestOutput | None:
        state = self.outputs.states.get(request_id)
        if state is None:
            return None
        self.scheduler.abort_requests([s.req.request_id for s in state.samples])
        return self.outputs.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # -- the step -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        if self.speculator is not None:
            self.speculator.propose(self.scheduler.running)
        sched = self.scheduler.schedule()
        if self.speculator is not None:
            self.speculator.finish(sched.finished_req_ids)
        if sched.is_empty:
            return []
        result = self.runner.execute(sched)
        core_outputs = self.scheduler.update_from_output(sched, result)
        outputs, stopped = self.outputs.process(core_outputs)
        for req_id in stopped:
            self.scheduler.finish_request(req_id, RequestStatus.FINISHED_STOPPED)
        if self.speculator is not None:  # the whole step: what an accepted draft token saves
            self.speculator.observe_step(sched, time.perf_counter() - t0)
        return outputs


def _load_tokenizer(loaded: LoadedModel) -> Tokenizer:
    """The tokenizer the loader points at: a named one, else the GGUF file's own vocabulary."""
    if loaded.tokenizer_path is not None:
        return Tokenizer.from_pretrained(loaded.tokenizer_path)
    assert loaded.gguf is not None
    return Tokenizer.from_gguf(loaded.gguf)

"""The engine: validates and tokenizes requests, runs scheduler -> runner steps, emits outputs."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import random
import time
from collections.abc import Sequence

import torch

from tokenmill.config import EngineConfig, ModelConfig
from tokenmill.core.sched_config import SchedulerConfig
from tokenmill.core.sched_types import SchedulerStats
from tokenmill.core.scheduler import Scheduler
from tokenmill.engine.model_info import ModelInfo
from tokenmill.engine.output_processor import OutputProcessor
from tokenmill.engine.tokenizer import Tokenizer
from tokenmill.errors import InvalidRequestError
from tokenmill.layers.expert_cache import ExpertCacheStats
from tokenmill.loader.model_loader import LoadedModel, load_model, resolve_device
from tokenmill.outputs import RequestOutput
from tokenmill.request import Request, RequestStatus
from tokenmill.sampling_params import SamplingParams
from tokenmill.spec_decode.speculator import Speculator, build_proposer
from tokenmill.worker.kv_cache import KVCacheBudget
from tokenmill.worker.model_runner import ExpertOffload, GpuOptions, ModelRunner

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
            experts=None
            if config.expert_memory_gb is None
            else ExpertOffload(
                config.expert_memory_gb, config.expert_cache_policy, config.expert_prefetch
            ),
        )
        self.num_blocks = self.runner.num_blocks
        self.scheduler = Scheduler(
            SchedulerConfig.from_engine_config(
                config,
                max_model_len=self.max_model_len,
                num_blocks=self.num_blocks,
                sliding_window=self.runner.sliding_window,
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

    # -- what the engine serves ----------------------------------------------------------------
    @functools.cached_property
    def model_info(self) -> ModelInfo:
        """The served model and its limits (fixed: safe to read from any thread)."""
        config = self.config
        return ModelInfo(
            name=self.model_name,
            aliases=(config.model,) if config.model else (),
            max_seq_len=self.max_seq_len,
            vocab_size=self.model_config.vocab_size,
            allow_special_tokens_in_content=config.allow_special_tokens_in_content,
        )

    @property
    def max_seq_len(self) -> int:
        """The most tokens (prompt plus output) one sequence may hold: the context length, which
        the KV cache always holds whole (the engine does not start otherwise)."""
        return self.scheduler.max_model_len

    def scheduler_stats(self) -> SchedulerStats:
        return self.scheduler.stats()

    def expert_cache_stats(self) -> ExpertCacheStats | None:
        """A copy of the expert cache's counts (None without expert offloading)."""
        cache = self.runner.expert_cache
        return None if cache is None else dataclasses.replace(cache.stats)

    # -- requests -----------------------------------------------------------------------------
    def check_request(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        priority: int = 0,
        *,
        max_tokens_must_fit: bool = False,
    ) -> None:
        """Raises InvalidRequestError unless this request can run: the checks `add_request`
        makes once the prompt is tokenized (see ModelInfo.check_request). It reads only the
        fixed model info, so a front end may call it from any thread before adding."""
        self.model_info.check_request(
            prompt_ids, params, priority, max_tokens_must_fit=max_tokens_must_fit
        )

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
        *,
        prompt_text: str | None = None,
    ) -> str:
        """Validates, tokenizes and queues a request; raises InvalidRequestError on bad input.
        `prompt_text`: the text outputs report as the prompt when `prompt` is token ids."""
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.outputs.states:
            raise InvalidRequestError(f"request_id {request_id!r} is already running", "request_id")
        params.validate()
        prompt_text = prompt if isinstance(prompt, str) else prompt_text
        prompt_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.check_request(prompt_ids, params, priority)
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
        for req in reqs:  # a sample's id ("a#0") may clash with another request's
            if req.request_id in self.outputs.sample_of:
                raise InvalidRequestError(
                    f"request_id {req.request_id!r} is already in use", "request_id"
                )
        self.outputs.add(prompt_text, reqs, request_id)
        for req in reqs:
            self.scheduler.add_request(req)
        return request_id

    def abort_request(self, request_id: str) -> RequestOutput | None:
        state = self.outputs.states.get(request_id)
        if state is None:
            return None
        self.scheduler.abort_requests([s.req.request_id for s in state.samples])
        return self.outputs.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def num_prompt_tokens(self, request_id: str) -> int:
        """The prompt length of a request added and not yet finished."""
        return len(self.outputs.states[request_id].prompt_token_ids)

    # -- the step -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        drafts: dict[str, list[int]] = {}
        if self.speculator is not None:
            drafts = self.speculator.propose(self.scheduler.decoding_requests())
        sched = self.scheduler.schedule(drafts)
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

"""The engine: validates and tokenizes requests, runs scheduler -> runner steps, emits outputs."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import random
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED
from concurrent.futures import wait as wait_futures
from typing import TYPE_CHECKING

import torch

from tokenmill.config import EngineConfig, ModelConfig
from tokenmill.core.sched_config import SchedulerConfig
from tokenmill.core.sched_types import SchedulerStats
from tokenmill.core.scheduler import Scheduler
from tokenmill.engine.engine_setup import kv_cache_summary, load_tokenizer, start_runner
from tokenmill.engine.model_info import ModelInfo
from tokenmill.engine.output_processor import OutputProcessor
from tokenmill.errors import InvalidRequestError
from tokenmill.layers.expert_cache import ExpertCacheStats
from tokenmill.loader.model_loader import LoadedModel, load_model, resolve_device
from tokenmill.outputs import RequestOutput
from tokenmill.request import Request, RequestStatus
from tokenmill.sampling_params import SamplingParams
from tokenmill.slo_params import SloHopelessError
from tokenmill.spec_decode.speculator import Speculator, build_proposer

if TYPE_CHECKING:
    from tokenmill.engine.tp_executor import TPExecutor
    from tokenmill.structured import RequestGrammar, StructuredOutputManager

logger = logging.getLogger(__name__)
_GRAMMAR_WAIT_S = 0.05  # an idle step waits this long at most for a grammar to compile


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
        self.tokenizer = load_tokenizer(loaded)
        self.dtype = loaded.dtype
        self.max_model_len = loaded.max_model_len
        self.executor: TPExecutor | None  # the tensor-parallel ranks 1..N-1, if any
        self.runner, self.executor = start_runner(config, loaded)
        self.num_blocks = self.runner.num_blocks
        self.scheduler = Scheduler(
            SchedulerConfig.from_engine_config(
                config,
                max_model_len=self.max_model_len,
                kv_groups=self.runner.kv_groups,
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
        self._structured: StructuredOutputManager | None = None
        self._structured_lock = threading.Lock()
        self._compiling: dict[str, RequestGrammar] = {}  # request id -> a grammar not yet ready
        self._ids = itertools.count()
        self.num_slo_rejected = 0  # refused by --slo-reject-hopeless
        logger.info(
            "loaded %s (%s, %s) in %.1fs; KV cache of %d-token blocks: %s",
            self.model_name,
            self.model_config.architecture,
            self.dtype,
            time.perf_counter() - t0,
            config.block_size,
            kv_cache_summary(self.runner),
        )

    def health_error(self) -> str | None:
        """None while every part of the engine runs (the tensor-parallel workers), else why
        not. Cheap: the server's /health asks it."""
        return None if self.executor is None else self.executor.health_error()

    def shutdown(self) -> None:
        """Stops the tensor-parallel workers (nothing to do for a single-process engine)."""
        if self.executor is not None:  # idempotent; health then reports the shutdown
            self.executor.shutdown()

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

    @property
    def structured(self) -> StructuredOutputManager:
        """Compiles structured-output grammars (built on first use: it imports xgrammar and
        reads the whole vocabulary). Safe from any thread."""
        with self._structured_lock:
            if self._structured is None:
                from tokenmill.structured import StructuredOutputManager, tokenizer_info

                backend, eos = self.tokenizer.backend, self.eos_token_ids
                vocab_size = self.model_config.vocab_size  # the logits' width
                self._structured = StructuredOutputManager(
                    lambda: tokenizer_info(backend, eos, vocab_size)
                )
            return self._structured

    def check_structured_outputs(self, params: Iterable[SamplingParams]) -> None:
        """Raises InvalidRequestError unless every structured-output spec in `params` compiles.
        Blocks while they compile (in parallel), so a front end calls it off the engine's
        thread; the grammars stay cached for `add_request`."""
        specs = [p.structured_outputs for p in params if p.structured_outputs is not None]
        if specs:
            from tokenmill.structured import check_compiled

            for future in [self.structured.compile(s) for s in specs]:
                check_compiled(future)

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
        spec = params.structured_outputs
        if spec is not None:
            compiled = self.structured.compile(spec)
            if compiled.done():
                from tokenmill.structured import check_compiled

                check_compiled(compiled)  # a bad spec known already: no request
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
                grammar=None if spec is None else self.structured.new_grammar(spec),
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
        if self.config.slo_reject_hopeless and self.config.scheduling_policy == "slo":
            self._reject_if_hopeless(request_id, reqs[0].request_id)
        grammar = reqs[0].grammar
        if grammar is not None and not grammar.ready:  # samples share one compiled grammar
            self._compiling[request_id] = grammar  # type: ignore[assignment]
        return request_id

    def _reject_if_hopeless(self, request_id: str, first_id: str) -> None:
        reason = self.scheduler.unattainable(first_id)
        if reason is not None:
            self.abort_request(request_id)
            self.num_slo_rejected += 1
            raise SloHopelessError(reason, "slo")

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
        failed = self._drop_failed_grammars() if self._compiling else []
        if failed:
            return failed
        t0 = time.perf_counter()
        drafts: dict[str, list[int]] = {}
        if self.speculator is not None:
            drafts = self.speculator.propose(self.scheduler.decoding_requests())
        sched = self.scheduler.schedule(drafts)
        if self.speculator is not None:
            self.speculator.finish(sched.finished_req_ids)
        if sched.is_empty:
            if self._compiling:  # only requests whose grammar compiles are left: no busy loop
                futures = [g.future for g in self._compiling.values()]
                wait_futures(futures, _GRAMMAR_WAIT_S, return_when=FIRST_COMPLETED)
            return []
        result = self.runner.execute(sched)
        core_outputs = self.scheduler.update_from_output(sched, result)
        outputs, stopped = self.outputs.process(core_outputs)
        for req_id in stopped:
            self.scheduler.finish_request(req_id, RequestStatus.FINISHED_STOPPED)
        # The whole step, as the SLO slack estimates and the simulator count it.
        self.scheduler.observe_step(sched, time.perf_counter() - t0)
        if self.speculator is not None:  # the whole step: what an accepted draft token saves
            self.speculator.observe_step(sched, time.perf_counter() - t0)
        return outputs

    def _drop_failed_grammars(self) -> list[RequestOutput]:
        """Aborts the requests whose grammar failed to compile (front ends check specs first,
        so only a direct `add_request` of a bad spec gets here); forgets the ready ones."""
        outputs = []
        for request_id, grammar in list(self._compiling.items()):
            if not grammar.ready:
                continue
            del self._compiling[request_id]
            if grammar.error is not None:
                logger.warning("request %s aborted: %s", request_id, grammar.error)
                out = self.abort_request(request_id)
                if out is not None:
                    outputs.append(out)
        return outputs

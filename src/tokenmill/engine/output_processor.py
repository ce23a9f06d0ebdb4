"""Turns per-step token ids into user-facing RequestOutputs: text, stop strings, logprobs."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.core.sched_types import EngineCoreOutput, TopLogprobs
from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.engine.tokenizer import Tokenizer
from tokenmill.outputs import CompletionOutput, Logprob, RequestOutput, TokenLogprobs
from tokenmill.request import Request


@dataclass
class _Sample:
    req: Request
    detok: IncrementalDetokenizer | None
    out: CompletionOutput


@dataclass
class RequestState:
    """One user request: its n samples share the prompt."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    samples: list[_Sample]
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return all(s.out.finish_reason is not None for s in self.samples)

    def to_output(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            prompt_logprobs=self.prompt_logprobs,
            outputs=[s.out for s in self.samples],
            finished=self.finished,
            num_cached_tokens=self.samples[0].req.num_cached_tokens,
            metrics=dict(self.metrics),
            slo=None
            if self.samples[0].req.sampling_params.slo is None
            else {"hopeless": any(s.req.slo_hopeless for s in self.samples)},
        )


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, RequestState] = {}  # by user request id
        self.sample_of: dict[str, tuple[RequestState, _Sample]] = {}  # by engine request id

    def add(self, prompt: str | None, reqs: list[Request], group_id: str) -> None:
        params = reqs[0].sampling_params
        samples = []
        for i, req in enumerate(reqs):
            detok = None
            if params.detokenize:
                detok = IncrementalDetokenizer(
                    self.tokenizer,
                    req.prompt_token_ids,
                    skip_special_tokens=params.skip_special_tokens,
                    stop=list(params.stop or []),
                    include_stop_str_in_output=params.include_stop_str_in_output,
                )
            out = CompletionOutput(
                index=i,
                text="",
                token_ids=[],
                cumulative_logprob=0.0 if params.logprobs is not None else None,
                logprobs=[] if params.logprobs is not None else None,
            )
            samples.append(_Sample(req, detok, out))
        state = RequestState(
            group_id,
            prompt,
            reqs[0].prompt_token_ids,
            samples,
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
        )
        self.states[group_id] = state
        for s in samples:
            self.sample_of[s.req.request_id] = (state, s)

    def process(
        self, core_outputs: list[EngineCoreOutput]
    ) -> tuple[list[RequestOutput], list[str]]:
        """Returns updated RequestOutputs and the engine request ids stopped by a stop string."""
        touched: dict[str, RequestState] = {}
        stopped: list[str] = []
        for co in core_outputs:
            entry = self.sample_of.get(co.req.request_id)
            if entry is None:
                continue
            state, sample = entry
            touched[state.request_id] = state
            plps = state.prompt_logprobs
            if co.new_prompt_logprobs and plps is not None and sample.req.sample_index == 0:
                # n > 1 siblings compute the same prompt: take sample 0's. Entry i of the list
                # is prompt token i (entry 0 is None); positions already reported (recomputed
                # after a preemption) are skipped.
                first = co.prompt_logprobs_start + 1
                skip = max(0, len(plps) - first)
                plps.extend(self._to_dict(lp) for lp in co.new_prompt_logprobs[skip:])
            if self._append(sample, co):
                stopped.append(co.req.request_id)
        outputs = []
        for state in touched.values():
            outputs.append(state.to_output())
            if state.finished:
                self._drop(state)
        return outputs, stopped

    def abort(self, group_id: str) -> RequestOutput | None:
        state = self.states.get(group_id)
        if state is None:
            return None
        for s in state.samples:
            if s.out.finish_reason is None:
                s.out.finish_reason = "abort"
        self._drop(state)
        return state.to_output()

    def _append(self, sample: _Sample, co: EngineCoreOutput) -> bool:
        out = sample.out
        out.token_ids.extend(co.new_token_ids)
        if co.new_logprobs and out.logprobs is not None:
            for lp in co.new_logprobs:
                out.logprobs.append(self._to_dict(lp))
                out.cumulative_logprob = (out.cumulative_logprob or 0.0) + lp.logprob
        stop_str = None
        if sample.detok is not None and co.new_token_ids:
            delta, stop_str = sample.detok.update(co.new_token_ids)
            out.text += delta
        finished = co.finished or stop_str is not None
        if finished and out.finish_reason is None:
            if stop_str is not None:
                out.finish_reason, out.stop_reason = "stop", stop_str
            else:
                out.finish_reason = sample.req.status.finish_reason or "stop"
                out.stop_reason = sample.req.stop_reason
                if sample.detok is not None:
                    out.text += sample.detok.flush()
        return stop_str is not None and not co.finished

    def _to_dict(self, lp: TopLogprobs) -> TokenLogprobs:
        d: TokenLogprobs = {}
        for rank, (tok, val) in enumerate(zip(lp.top_ids, lp.top_logprobs, strict=True), 1):
            d[tok] = Logprob(val, rank, self.tokenizer.decode([tok], skip_special_tokens=False))
        if lp.token_id not in d:
            d[lp.token_id] = Logprob(
                lp.logprob, lp.rank, self.tokenizer.decode([lp.token_id], skip_special_tokens=False)
            )
        return d

    def _drop(self, state: RequestState) -> None:
        self.states.pop(state.request_id, None)
        for s in state.samples:
            self.sample_of.pop(s.req.request_id, None)

"""Offline API shaped like vLLM's `LLM`, so existing scripts port over."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from tokenmill.config import EngineConfig
from tokenmill.engine.chat_template import reads_tools
from tokenmill.engine.engine import LLMEngine
from tokenmill.engine.tokenizer import Tokenizer
from tokenmill.errors import InvalidRequestError
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.tools.choice import Tool, check_tool_schemas
from tokenmill.tools.plan import ToolCallStream, plan_tools, template_inputs

PromptType = str | list[int] | dict[str, Any]
Conversation = list[dict[str, Any]]


class LLM:
    """`LLM()` loads the default model (SmolLM2-135M-Instruct); `LLM(model=path_or_id, ...)`
    takes any EngineConfig field as a keyword (dtype, quantization, max_model_len, ...)."""

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        names = {f.name for f in dataclasses.fields(EngineConfig)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown LLM argument(s) {unknown}; allowed: {sorted(names)}")
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs))

    def get_tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        prompt_list = _as_prompt_list(prompts)
        params = _per_prompt(sampling_params, len(prompt_list))
        if priority is not None and len(priority) != len(prompt_list):
            raise ValueError(f"got {len(priority)} priorities for {len(prompt_list)} prompts")
        return self._run(prompt_list, params, use_tqdm, priority)

    def chat(
        self,
        messages: Conversation | Sequence[Conversation],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        *,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        parallel_tool_calls: bool = True,
        tool_call_parser: str = "hermes",
    ) -> list[RequestOutput]:
        """Chat completions for one conversation or several. `tools` (OpenAI's JSON) and
        `tool_choice` ("none", "auto", "required" or {"type": "function", "function":
        {"name"}}) work as on the server's chat completions: the tools reach the prompt
        (the template's own rendering, else a system section), a forced choice constrains the
        output to calls, and each output's `tool_calls` and `content` hold the calls read
        back out of the text (`tool_call_parser` reads them for "auto")."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tool_defs = [Tool.from_json(t, i) for i, t in enumerate(tools or [])]
        plan = plan_tools(tool_defs or None, tool_choice, parallel_tool_calls, tool_call_parser)
        check_tool_schemas(plan.tools)
        params = _per_prompt(sampling_params, len(conversations))
        forced = plan.structured()
        if forced is not None:
            if any(p.structured_outputs is not None for p in params):
                raise InvalidRequestError(
                    "a forced tool_choice and structured_outputs cannot both constrain the output",
                    "tool_choice",
                )
            params = [dataclasses.replace(p, structured_outputs=forced) for p in params]
        tok = self.engine.tokenizer
        native = reads_tools(tok.chat_template)
        # special-token text in the messages stays text (unless allow_special_tokens_in_content)
        allow = self.engine.config.allow_special_tokens_in_content
        prompts: list[PromptType] = []
        for conv in conversations:
            conv_in, tool_list = template_inputs(plan, list(conv), native)
            ids = tok.encode_chat(
                conv_in, add_generation_prompt, allow_special_in_content=allow, tools=tool_list
            )
            prompts.append({"prompt_token_ids": ids})
        outs = self.generate(prompts, params, use_tqdm=use_tqdm)
        if plan.mode != "none":
            for out in outs:
                for c in out.outputs:
                    c.content, calls = ToolCallStream(plan).final(c.text)
                    c.tool_calls = calls
        return outs

    def _run(
        self,
        prompts: list[PromptType],
        params: list[SamplingParams],
        use_tqdm: bool,
        priority: Sequence[int] | None,
    ) -> list[RequestOutput]:
        engine = self.engine
        # Every grammar compiles (in parallel) before any request is queued: a bad spec rejects
        # the whole call with nothing queued.
        engine.check_structured_outputs(params)
        ids = []
        try:
            for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
                text, token_ids = _split_prompt(prompt)
                rid = engine.add_request(
                    token_ids if token_ids is not None else text,
                    p,
                    priority=priority[i] if priority else 0,
                    prompt_text=text,
                )
                ids.append(rid)
        except Exception:
            for rid in ids:  # a bad prompt rejects the whole call and leaves nothing queued
                engine.abort_request(rid)
            raise
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Generating", disable=not use_tqdm, unit="req")
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        results[out.request_id] = out
                        bar.update(1)
        finally:
            bar.close()
            for rid in ids:
                if rid not in results:
                    engine.abort_request(rid)
        return [results[rid] for rid in ids]


def _per_prompt(
    sampling_params: SamplingParams | Sequence[SamplingParams] | None, num: int
) -> list[SamplingParams]:
    if sampling_params is None:
        sampling_params = SamplingParams()
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * num
    params = list(sampling_params)
    if len(params) != num:
        raise ValueError(f"got {len(params)} sampling_params for {num} prompts")
    return params


def _as_prompt_list(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt given as token ids
    return prompts


def _split_prompt(prompt: PromptType) -> tuple[str | None, list[int] | None]:
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])
        if "prompt" in prompt:
            return prompt["prompt"], None
        raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return None, prompt
    raise ValueError(f"unsupported prompt type {type(prompt).__name__}")

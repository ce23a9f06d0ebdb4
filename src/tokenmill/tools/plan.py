"""Tool calling on chat (the server's chat completions and the offline `LLM.chat`): the prompt
(the template's own tool rendering, or the default format below), the output constraint of a
forced choice, and the calls in responses and streams.

Default format, for templates that do not read `tools`: a system section lists the functions
as JSON and asks for Hermes-style `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
blocks; an assistant turn's earlier calls are written back as such blocks, and tool results go
in a user turn as `<tool_response>` blocks (every template renders user turns).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from tokenmill.sampling_params import StructuredOutputsParams
from tokenmill.tools.choice import FunctionLike, ToolLike, forced_schema, resolve_tool_choice
from tokenmill.tools.parsers import ToolParser, get_tool_parser, read_forced

DEFAULT_SYSTEM = """# Tools

You may call one or more functions to assist with the user query. The functions, as JSON:
<tools>
{tools}
</tools>

To call a function, answer with its name and arguments as JSON inside <tool_call></tool_call> tags:
<tool_call>
{{"name": <function-name>, "arguments": <arguments-json-object>}}
</tool_call>"""


@dataclass
class ToolPlan:
    """How one request uses its tools. mode: "none" (plain chat, tools not shown), "auto"
    (free text, parsed), "required" or "named" (grammar-forced calls)."""

    mode: str
    tools: list[ToolLike] = field(default_factory=list)
    named: FunctionLike | None = None
    parallel: bool = True
    parser: ToolParser | None = None

    @property
    def names(self) -> set[str]:
        return {t.function.name for t in self.tools}

    @property
    def forced(self) -> bool:
        return self.mode in ("required", "named")

    def structured(self) -> StructuredOutputsParams | None:
        if not self.forced:
            return None
        return StructuredOutputsParams(
            json=forced_schema(self.tools, self.mode, self.named, self.parallel)
        )


def plan_tools(
    tools: list[ToolLike] | None, tool_choice: Any, parallel: bool, parser_name: str
) -> ToolPlan:
    """Raises InvalidRequestError for a tool_choice that does not fit the tools."""
    mode, named = resolve_tool_choice(tools, tool_choice)
    if mode == "none":
        return ToolPlan("none")
    parser = get_tool_parser(parser_name) if mode == "auto" else None
    return ToolPlan(mode, list(tools or []), named, parallel, parser)


def template_inputs(
    plan: ToolPlan, messages: list[dict[str, Any]], native: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, tools) for the chat template. A template that reads `tools` (`native`) gets
    them and the messages as they are; any other gets the default format written into the
    messages."""
    tools = [t.as_json() for t in plan.tools] if plan.mode != "none" else []
    if native:
        return messages, tools or None
    out: list[dict[str, Any]] = []
    # Consecutive results share one user turn: many templates insist that turns alternate.
    after_tool = False
    for m in messages:
        if m["role"] == "tool":
            body = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            if after_tool:
                out[-1]["content"] += "\n" + body
            else:
                out.append({"role": "user", "content": body})
            after_tool = True
            continue
        after_tool = False
        m = dict(m)
        calls = m.pop("tool_calls", None)
        if calls:
            blocks = [
                "<tool_call>\n"
                + json.dumps(
                    {"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
                    ensure_ascii=False,
                )
                + "\n</tool_call>"
                for c in calls
            ]
            m["content"] = "\n".join([m["content"], *blocks] if m.get("content") else blocks)
        m.pop("tool_call_id", None)
        out.append(m)
    if tools:
        listing = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
        section = DEFAULT_SYSTEM.format(tools=listing)
        if out and out[0]["role"] in ("system", "developer") and out[0].get("content"):
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + section}
        else:
            out.insert(0, {"role": "system", "content": section})
    return out, None


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def call_json(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


class ToolCallStream:
    """One choice's tool calls, read from its text as it grows. `step(text, finished)` gives
    the content and the OpenAI `delta.tool_calls` entries that are new since the last step;
    `final(text)` the whole message. The joined deltas equal the final message: both are read
    from the same text by the same rules."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.ids: list[str] = []
        self.sent_args: list[int] = []  # argument characters sent per call
        self.sent_content = ""

    def _id(self, i: int) -> str:
        while len(self.ids) <= i:
            self.ids.append(new_call_id())
        return self.ids[i]

    def _calls(self, text: str, finished: bool) -> tuple[str | None, list[tuple[str, str]]]:
        plan = self.plan
        if plan.forced:
            named = plan.named.name if plan.named else None
            calls = read_forced(text, plan.mode, named)
            return None, [(c.name, c.arguments) for c in calls]
        assert plan.parser is not None
        if not finished:  # auto: calls are read once the text is whole
            return text[: plan.parser.content_end(text)], []
        content, parsed = plan.parser.parse(text, plan.names)
        if not plan.parallel:
            parsed = parsed[:1]
        return content, [(c.name, c.arguments) for c in parsed]

    def final(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        content, calls = self._calls(text, True)
        return content, [call_json(self._id(i), n, a) for i, (n, a) in enumerate(calls)]

    def step(self, text: str, finished: bool) -> tuple[str, list[dict[str, Any]]]:
        content, calls = self._calls(text, finished)
        content = content or ""
        new_content = ""
        # Content goes out only once it is more than whitespace (a None content sends none);
        # what was sent is always a prefix of the content read later from the longer text.
        if content.strip() and content.startswith(self.sent_content):
            new_content = content[len(self.sent_content) :]
            self.sent_content = content
        deltas: list[dict[str, Any]] = []
        for i, (name, args) in enumerate(calls):
            if i >= len(self.sent_args):
                self.sent_args.append(0)
                fn = {"name": name, "arguments": ""}
                deltas.append({"index": i, "id": self._id(i), "type": "function", "function": fn})
            if len(args) > self.sent_args[i]:
                fragment = args[self.sent_args[i] :]
                self.sent_args[i] = len(args)
                deltas.append({"index": i, "function": {"arguments": fragment}})
        return new_content, deltas

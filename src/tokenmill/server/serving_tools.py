"""Tool calling on chat completions: a request's tools planned by `tokenmill.tools` (shared with
the offline API), with the chat template's own tool rendering when it has one."""

from __future__ import annotations

from typing import Any

from tokenmill.engine.chat_template import reads_tools
from tokenmill.server.protocol import ChatCompletionRequest
from tokenmill.tools import plan as _plan
from tokenmill.tools.plan import ToolCallStream, ToolPlan

__all__ = ["ToolCallStream", "ToolPlan", "plan_tools", "template_inputs"]


def plan_tools(req: ChatCompletionRequest, parser_name: str) -> ToolPlan:
    """Raises InvalidRequestError for a tool_choice that does not fit the tools."""
    return _plan.plan_tools(req.tools, req.tool_choice, req.parallel_tool_calls, parser_name)


def template_inputs(
    plan: ToolPlan, messages: list[dict[str, Any]], template: str | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, tools) for the chat template `template` (see tools.plan.template_inputs)."""
    return _plan.template_inputs(plan, messages, reads_tools(template))

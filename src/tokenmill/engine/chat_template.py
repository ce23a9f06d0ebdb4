"""Chat templates rendered as transformers renders them: a sandboxed Jinja environment with
its `tojson`, `raise_exception` and `strftime_now`, and messages without None-valued keys."""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment


def compile_chat_template(source: str) -> jinja2.Template:
    return _jinja_env().from_string(source)


@functools.lru_cache(maxsize=8)
def template_variables(source: str) -> frozenset[str]:
    """The variables a template reads from its context (e.g. whether it renders `tools`)."""
    return frozenset(jinja2.meta.find_undeclared_variables(_jinja_env().parse(source)))


def reads_tools(template: str | None) -> bool:
    """Whether the chat template renders a `tools` variable itself."""
    return template is not None and "tools" in template_variables(template)


def render_chat_template(
    template: jinja2.Template,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
    tools: list[dict[str, Any]] | None,
    documents: list[dict[str, Any]] | None,
    variables: dict[str, Any],
) -> str:
    # transformers drops None-valued keys (e.g. OpenAI's content=None with tool_calls)
    msgs = [{k: v for k, v in m.items() if v is not None} for m in messages]
    return template.render(
        messages=msgs,
        tools=tools,
        documents=documents,
        add_generation_prompt=add_generation_prompt,
        **variables,
    )


def _jinja_env() -> ImmutableSandboxedEnvironment:
    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any, ensure_ascii: bool = False, indent: int | None = None,
        separators: tuple[str, str] | None = None, sort_keys: bool = False,
    ) -> str:  # fmt: skip
        # unlike Jinja's own tojson: no HTML escaping, same options as transformers
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env

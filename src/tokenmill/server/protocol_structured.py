"""Structured output in requests: vLLM's `structured_outputs` extra (completions and chat) and
OpenAI's chat `response_format`. Both become one StructuredOutputsParams; whether a schema,
regex or grammar compiles is checked by the engine's grammar compiler before the request is
queued (a 400 naming the problem)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, StrictBool, StrictStr

from tokenmill.errors import InvalidRequestError
from tokenmill.sampling_params import MAX_CHOICES, StructuredOutputsParams
from tokenmill.server.protocol_base import RequestModel


class StructuredOutputsRequest(RequestModel):
    """Exactly one of these constrains the output (vLLM's names)."""

    json_: dict[str, Any] | StrictStr | None = Field(
        None, alias="json", description="a JSON Schema the output conforms to"
    )
    regex: StrictStr | None = Field(None, description="a regular expression the output matches")
    choice: list[StrictStr] | None = Field(None, min_length=1, max_length=MAX_CHOICES)
    grammar: StrictStr | None = Field(None, description="an EBNF grammar with a `root` rule")
    json_object: StrictBool | None = Field(None, description="any JSON object")
    structural_tag: dict[str, Any] | StrictStr | None = Field(
        None, description="xgrammar's structural tag (triggered begin/schema/end regions)"
    )

    model_config = ConfigDict(populate_by_name=True)

    def params(self) -> StructuredOutputsParams:
        return StructuredOutputsParams(
            json=self.json_,
            regex=self.regex,
            choice=self.choice,
            grammar=self.grammar,
            json_object=bool(self.json_object),
            structural_tag=self.structural_tag,
        )


class JsonSchemaFormat(RequestModel):
    name: StrictStr = Field(max_length=64)
    description: StrictStr | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: StrictBool | None = None

    model_config = ConfigDict(populate_by_name=True)


class ResponseFormat(RequestModel):
    """OpenAI's chat `response_format`."""

    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JsonSchemaFormat | None = None
    # type structural_tag (vLLM's forms): `structures` with `triggers`, or xgrammar's `format`.
    structures: list[dict[str, Any]] | None = None
    triggers: list[StrictStr] | None = None
    format: dict[str, Any] | None = None

    def params(self) -> StructuredOutputsParams | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        if self.type == "structural_tag":
            if self.format is not None:
                return StructuredOutputsParams(
                    structural_tag={"type": "structural_tag", "format": self.format}
                )
            if self.structures is None or self.triggers is None:
                raise InvalidRequestError(
                    "response_format of type structural_tag needs `format`, or `structures` "
                    "and `triggers`",
                    "response_format",
                )
            return StructuredOutputsParams(
                structural_tag={"structures": self.structures, "triggers": self.triggers}
            )
        if self.json_schema is None:
            raise InvalidRequestError(
                "response_format.json_schema is required when type is json_schema",
                "response_format",
            )
        # No schema: any JSON object, as OpenAI does.
        schema = self.json_schema.schema_
        return StructuredOutputsParams(json=schema if schema is not None else {"type": "object"})

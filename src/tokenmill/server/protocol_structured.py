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

    model_config = ConfigDict(populate_by_name=True)

    def params(self) -> StructuredOutputsParams:
        return StructuredOutputsParams(
            json=self.json_,
            regex=self.regex,
            choice=self.choice,
            grammar=self.grammar,
            json_object=bool(self.json_object),
        )


class JsonSchemaFormat(RequestModel):
    name: StrictStr = Field(max_length=64)
    description: StrictStr | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: StrictBool | None = None

    model_config = ConfigDict(populate_by_name=True)


class ResponseFormat(RequestModel):
    """OpenAI's chat `response_format`."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def params(self) -> StructuredOutputsParams | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        if self.json_schema is None:
            raise InvalidRequestError(
                "response_format.json_schema is required when type is json_schema",
                "response_format",
            )
        # No schema: any JSON object, as OpenAI does.
        schema = self.json_schema.schema_
        return StructuredOutputsParams(json=schema if schema is not None else {"type": "object"})

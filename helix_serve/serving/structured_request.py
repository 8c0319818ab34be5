"""Structured-output request fields: OpenAI's `response_format`, vLLM's `structured_outputs` extra field and its
older `guided_*` names. They become one engine `Constraint` (engine/structured/constraint.py); more than one
in a request is a 400 naming them. Whether a schema, regex or grammar compiles is the engine's check (a 400
naming the problem), made when the request is admitted."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from helix_serve.engine.structured.constraint import Constraint, ConstraintError


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | bool = Field(True, alias="schema")  # true: any JSON value
    strict: bool | None = None  # the schema is always enforced exactly, strict or not


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("response_format.json_schema is required with type 'json_schema' (and only then)")
        return self


class StructuredOutputs(BaseModel):
    """vLLM's extra field: exactly one of these."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


def _schema(value: dict[str, Any] | str | bool) -> Constraint:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConstraintError(f"the JSON schema is not valid JSON: {exc}") from exc
    return Constraint.json_schema(value)


def _constraint(kind: str, value: Any) -> Constraint:
    if kind == "json":
        return _schema(value)
    if kind == "choice":
        return Constraint.choice(value)
    return Constraint("json_object") if kind == "json_object" else Constraint(kind, value)


class StructuredFields(BaseModel):
    """The fields, on every generation route (native and OpenAI)."""

    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None  # vLLM's older names for structured_outputs' keys
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def _requested_constraints(self) -> list[tuple[str, Constraint]]:
        found = []
        if self.response_format is not None and self.response_format.type != "text":
            fmt = self.response_format
            built = _schema(fmt.json_schema.schema_) if fmt.json_schema else Constraint("json_object")
            found.append(("response_format", built))
        if self.structured_outputs is not None:
            for name, value in self.structured_outputs.model_dump(by_alias=True).items():
                if value not in (None, False):
                    found.append((f"structured_outputs.{name}", _constraint(name, value)))
        for kind in ("json", "regex", "choice", "grammar"):
            value = getattr(self, f"guided_{kind}")
            if value is not None:
                found.append((f"guided_{kind}", _constraint(kind, value)))
        return found

    @model_validator(mode="after")
    def _one_constraint(self) -> StructuredFields:
        names = [name for name, _ in self._requested_constraints()]  # ConstraintError is a ValueError: a 400
        if len(names) > 1:
            raise ValueError(f"one structured-output constraint per request; got {', '.join(names)}")
        return self

    def constraint(self) -> Constraint | None:
        found = self._requested_constraints()
        return found[0][1] if found else None

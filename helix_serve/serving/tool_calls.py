"""OpenAI tool calls as a structured-output constraint: with `tool_choice` "required" or a named function, the
output is forced to `{"name": <a tool's name>, "arguments": <valid against its parameters schema>}` and is
returned as `message.tool_calls` (streamed as `delta.tool_calls`). "none" ignores the tools; "auto" would need
the model to choose between text and a call, which a constraint cannot decide for it, so it is a 400."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from helix_serve.engine.structured.constraint import Constraint

SUPPORTED_CHOICES = "'none', 'required' or {'type': 'function', 'function': {'name': ...}}"
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}  # OpenAI: parameters omitted
# The call as the grammar writes it (compact JSON, fixed separators: engine/structured/grammar.py); names are
# [A-Za-z0-9_-], so they need no escaping. The arguments follow, then the call object's closing brace.
CALL_HEAD = re.compile(r'\{"name": "([A-Za-z0-9_-]+)", "arguments": ')


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; checked when the constraint compiles
    strict: bool | None = None  # the schema is always enforced exactly

    def call_schema(self) -> dict[str, Any]:
        """The schema of one call of this function; "name" comes first, so the name is known early."""
        return {"type": "object", "properties": {"name": {"const": self.name},
                                                 "arguments": self.parameters or NO_PARAMETERS},
                "required": ["name", "arguments"], "additionalProperties": False}


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionName


def tool_constraint(tools: list[Tool] | None, choice: str | NamedToolChoice | None) -> Constraint | None:
    """The constraint `tools` + `tool_choice` ask for (None: the tools are ignored); ValueError (a 400) if
    the pair is not supported or does not fit together."""
    if choice == "none" or (not tools and choice is None):
        return None
    if choice is None:
        raise ValueError(f"`tools` needs a `tool_choice`: the default 'auto' is not supported; use {SUPPORTED_CHOICES}")
    if isinstance(choice, str) and choice != "required":
        raise ValueError(f"tool_choice {choice!r} is not supported; use {SUPPORTED_CHOICES}")
    if not tools:
        raise ValueError("tool_choice other than 'none' needs `tools`")
    functions = {tool.function.name: tool.function for tool in tools}
    if len(functions) < len(tools):
        raise ValueError("tool function names must be unique")
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in functions:
            raise ValueError(f"tool_choice names {choice.function.name!r}, which is not one of the tools")
        return Constraint.json_schema(functions[choice.function.name].call_schema())
    schemas = [f.call_schema() for f in functions.values()]
    return Constraint.json_schema(schemas[0] if len(schemas) == 1 else {"anyOf": schemas})


def split_call(text: str, complete: bool) -> tuple[str, str] | None:
    """(name, arguments JSON) of a generated call; None until the name is complete. `complete`: the call's
    closing brace has been generated and is dropped; otherwise all text after the head is arguments."""
    head = CALL_HEAD.match(text)
    if head is None:
        return None
    arguments = text[head.end():]
    return head.group(1), arguments[:-1] if complete else arguments


def is_complete(text: str) -> bool:
    """Whether the whole call was generated (not cut by max_tokens, a timeout or a stop string)."""
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def tool_call(name: str, arguments: str) -> dict[str, Any]:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


def call_message(text: str) -> dict[str, Any]:
    """The assistant message of a tool-call generation; a call cut before its name ends stays text."""
    call = split_call(text, is_complete(text))
    if call is None:
        return {"role": "assistant", "content": text}
    return {"role": "assistant", "content": None, "tool_calls": [tool_call(*call)]}

"""What a request constrains its output to: one JSON schema, any JSON object, a regex, one of several strings,
or a grammar. Plain data (no grammar library, no torch), so the ingress can build and check it and it can
travel to the engine replicas inside the sampling settings."""

from __future__ import annotations

import json
from dataclasses import dataclass

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
MAX_SPEC_CHARS = 64_000  # a constraint's source text; longer ones are refused before compiling


class ConstraintError(ValueError):
    """A constraint that cannot be compiled: the message says what is wrong (a 400 for the caller)."""


@dataclass(frozen=True, slots=True)
class Constraint:
    """`spec` is the constraint's text (compact JSON for schemas and choices), the compile cache's key. Schema
    keys keep their order: it is the order the object's properties are generated in."""

    kind: str
    spec: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConstraintError(f"unknown constraint kind {self.kind!r}; one of {', '.join(KINDS)}")
        if len(self.spec) > MAX_SPEC_CHARS:
            raise ConstraintError(f"the {self.kind} constraint has {len(self.spec)} characters; "
                                  f"the limit is {MAX_SPEC_CHARS}")

    @classmethod
    def json_schema(cls, schema: dict | bool) -> Constraint:
        return cls("json_schema", json.dumps(schema, separators=(",", ":")))

    @classmethod
    def choice(cls, choices: list[str]) -> Constraint:
        if not choices or not all(isinstance(c, str) and c for c in choices):
            raise ConstraintError("choice must be a non-empty list of non-empty strings")
        return cls("choice", json.dumps(choices))

    @property
    def schema(self) -> dict | bool:
        """The JSON schema this constraint stands for (json_schema and json_object only)."""
        return json.loads(self.spec) if self.kind == "json_schema" else {"type": "object"}

    @property
    def choices(self) -> list[str]:
        return json.loads(self.spec)

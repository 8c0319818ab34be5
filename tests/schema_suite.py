"""JSON schemas that structured outputs must satisfy exactly: nested objects, arrays with bounds, enums, numbers
with ranges, string patterns and lengths, optional fields, unions. Bounded everywhere a random model could
otherwise run past max_tokens (string lengths, item counts, digits: an unbounded integer or a number without
multipleOf lets a random model emit digits forever), so every output must finish and validate."""

from __future__ import annotations

SHORT = {"type": "string", "maxLength": 8}

SCHEMAS: dict[str, dict] = {
    "integer": {"type": "integer", "minimum": -10**6, "maximum": 10**6},
    "boolean": {"type": "boolean"},
    "enum_strings": {"enum": ["red", "green", "blue"]},
    "const": {"const": "fixed"},
    "short_string": SHORT,
    "bounded_integer": {"type": "integer", "minimum": -5, "maximum": 120},
    "exclusive_number": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "multipleOf": 0.25},
    "pattern_string": {"type": "string", "pattern": "^[a-z]{2,4}-[0-9]{3}$"},
    "length_string": {"type": "string", "minLength": 3, "maxLength": 5},
    "flat_object": {"type": "object", "properties": {"name": SHORT, "age": {"type": "integer", "minimum": 0,
                                                                             "maximum": 150}},
                    "required": ["name", "age"], "additionalProperties": False},
    "optional_fields": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 9},
                                                         "note": SHORT, "flag": {"type": "boolean"}},
                        "required": ["id"], "additionalProperties": False},
    "nested_object": {"type": "object", "properties": {
        "user": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999},
                                                  "role": {"enum": ["admin", "guest"]}},
                 "required": ["id", "role"], "additionalProperties": False}},
        "required": ["user"], "additionalProperties": False},
    "bounded_array": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                      "minItems": 2, "maxItems": 4},
    "array_of_enums": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
    "array_of_objects": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["x"], "additionalProperties": False}},
    "tuple": {"type": "array", "prefixItems": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "boolean"}],
              "items": False},
    "nullable": {"type": ["integer", "null"], "minimum": 0, "maximum": 50},
    "any_of": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"enum": ["none", "many"]}]},
    "ref_definitions": {"$defs": {"point": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": 0, "maximum": 9}, "y": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["x", "y"], "additionalProperties": False}},
        "type": "object", "properties": {"a": {"$ref": "#/$defs/point"}, "b": {"$ref": "#/$defs/point"}},
        "required": ["a", "b"], "additionalProperties": False},
    "deeply_nested": {"type": "object", "properties": {"l1": {"type": "object", "properties": {
        "l2": {"type": "object", "properties": {"l3": {"type": "array", "items": SHORT, "maxItems": 2}},
               "required": ["l3"], "additionalProperties": False}}, "required": ["l2"],
        "additionalProperties": False}}, "required": ["l1"], "additionalProperties": False},
    "date_like_pattern": {"type": "object", "properties": {
        "date": {"type": "string", "pattern": "^20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])$"},
        "count": {"type": "integer", "minimum": 1, "maximum": 3}}, "required": ["date", "count"],
        "additionalProperties": False},
    "mixed_record": {"type": "object", "properties": {
        "title": SHORT, "price": {"type": "number", "minimum": 0, "maximum": 1000, "multipleOf": 0.01},
        "tags": {"type": "array", "items": SHORT, "maxItems": 3},
        "status": {"enum": ["draft", "live"]}, "stock": {"type": ["integer", "null"], "minimum": 0, "maximum": 99}},
        "required": ["title", "price", "status"], "additionalProperties": False},
}

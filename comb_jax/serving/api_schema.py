"""The request bodies in the OpenAPI schema (`/openapi.json`): the endpoints read their JSON themselves (so every
error is ours, in OpenAI's shape, naming the field), which leaves FastAPI nothing to describe; these say what
`protocol.py` accepts, for clients and for the schema-driven fuzz test (tests/test_fuzz_api.py)."""

from __future__ import annotations

from comb_jax.serving.protocol import MAX_STOP, ROLES

DOCUMENT = {"oneOf": [
    {"type": "string", "minLength": 1},
    {"type": "object", "properties": {"id": {"type": "string", "minLength": 1},
                                      "text": {"type": "string", "minLength": 1}},
     "additionalProperties": False},
]}
STOP = {"oneOf": [{"type": "string", "minLength": 1},
                  {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": MAX_STOP}]}


def _common(max_new_tokens: int) -> dict:
    return {
        "model": {"type": "string", "minLength": 1},
        "max_tokens": {"type": "integer", "minimum": 1, "maximum": max_new_tokens},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "stop": STOP,
        "seed": {"type": "integer"},
        "n": {"type": "integer", "enum": [1]},
        "stream": {"type": "boolean"},
        "user": {"type": "string"},
        "documents": {"type": "array", "items": DOCUMENT},
    }


def _body(properties: dict, required: list[str]) -> dict:
    schema = {"type": "object", "properties": properties, "required": required, "additionalProperties": False}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def chat_body(max_new_tokens: int) -> dict:
    message = {"type": "object", "required": ["role", "content"], "additionalProperties": False,
               "properties": {"role": {"type": "string", "enum": list(ROLES)}, "content": {"type": "string"}}}
    return _body({**_common(max_new_tokens), "messages": {"type": "array", "items": message, "minItems": 1}},
                 ["model", "messages"])


def completion_body(max_new_tokens: int) -> dict:
    return _body({**_common(max_new_tokens), "prompt": {"type": "string", "minLength": 1}}, ["model", "prompt"])


def documents_body() -> dict:
    return _body({"documents": {"type": "array", "items": DOCUMENT, "minItems": 1}, "pin": {"type": "boolean"},
                  "ttl_s": {"type": "number", "exclusiveMinimum": 0, "maximum": 365 * 86400},
                  "model": {"type": "string"}}, ["documents"])

"""Request validation for both front ends: OpenAI request bodies (HTTP) -> what the scheduler runs, and the field
checks the batch JSONL mode (`serving.batch`) shares with them. Every problem names the field: an `APIError` over
HTTP, a `FieldError` (a `RequestError`) in the batch.

Chat and text completions take the OpenAI fields we support (model, messages | prompt, max_tokens /
max_completion_tokens, temperature, top_p, stop, seed, n=1, stream, stream_options) plus `documents`: a list of
strings or {"id", "text"} objects ({"id"} alone names a document encoded before, by `POST /v1/documents` or an
earlier request). Each document is one chunk: its PICache is looked up in every tier before it is encoded.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Callable

from comb_jax.serving.names import is_content_id
from comb_jax.serving.pool import RequestError

ERROR_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error", 503: "server_error"}
ROLES = ("system", "developer", "user", "assistant")
MAX_STOP = 4
COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "stop", "seed", "n", "stream", "stream_options",
                 "user", "documents", "presence_penalty", "frequency_penalty", "logprobs"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "echo", "best_of", "suffix"}
DOCUMENT_FIELDS = {"documents", "pin", "ttl_s", "model"}


class APIError(Exception):
    """An HTTP error in the OpenAI shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def bad(param: str | None, message: str, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass
class Document:
    """One document of a request: its text (None when named by id only), token ids, and the name it was given."""

    ids: list[int]
    text: str | None = None
    name: str | None = None


@dataclass
class Generation:
    """A parsed generation request. prompt_ids: the (chat-templated) prompt, with the documents inlined in modes
    full and prefix; documents: the chunks to read as PICaches (empty in those modes)."""

    prompt_ids: list[int]
    documents: list[Document] = field(default_factory=list)
    inline_document_tokens: int = 0  # modes full, prefix: document tokens inside the prompt
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    model: str = ""


@dataclass
class ParseContext:
    """What parsing needs from the server: the codec, the served model's name, the token budget, the mode, and
    `find_document(id) -> Document | None` for documents named by id."""

    codec: object
    model_name: str
    max_new_tokens: int
    mode: str = "comb"
    find_document: Callable[[str], Document | None] = lambda _id: None


def json_kind(v) -> str:
    """How JSON names the type of a decoded value, for error messages ("an integer", "an array", ...)."""
    for t, name in ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
                    (list, "an array"), (dict, "an object")):
        if isinstance(v, t):
            return name
    return "null"


class FieldError(RequestError):
    """A request field that breaks its rule; `param` names it (the batch reports the message, HTTP a 400)."""

    def __init__(self, param: str | None, message: str):
        super().__init__(message)
        self.param = param


def shown(value) -> str:
    """A value as an error message quotes it (short; never fails on a huge integer)."""
    try:
        text = json.dumps(value) if isinstance(value, (bool, str)) or value is None else repr(value)
    except ValueError:  # an integer too long to print
        return "a very large integer"
    return text if len(text) <= 40 else text[:37] + "..."


def got(value) -> str:
    return "null" if value is None else f"{json_kind(value)} {shown(value)}"


def integer_field(name: str, v, lo: int, hi: int) -> int:
    """`v` as an integer in [lo, hi], else FieldError naming `name`."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise FieldError(name, f"'{name}' must be an integer, got {got(v)}")
    if not lo <= v <= hi:
        raise FieldError(name, f"'{name}' must be in [{lo}, {hi}], got {shown(v)}")
    return v


def number_field(name: str, v, lo: float, hi: float, lo_open: bool = False) -> float:
    """`v` as a finite number in [lo, hi] (or (lo, hi]), else FieldError naming `name`."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise FieldError(name, f"'{name}' must be a number, got {got(v)}")
    if isinstance(v, float) and not math.isfinite(v):
        raise FieldError(name, f"'{name}' must be a finite number, got {v}")
    if not ((lo < v) if lo_open else (lo <= v)) or not v <= hi:  # exact for huge ints too (no float overflow)
        raise FieldError(name, f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {shown(v)}")
    return float(v)


def check_turns(messages, check_turn: Callable[[int, dict], dict]) -> list[dict]:
    """A non-empty array of message objects, each checked (and normalised) by `check_turn(i, message)`, with at
    least one user turn; FieldError naming the field otherwise."""
    if not isinstance(messages, list) or not messages:
        raise FieldError("messages", f"'messages' must be a non-empty array of {{role, content}} objects, got "
                                     f"{json_kind(messages)}")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise FieldError(f"messages[{i}]", f"'messages[{i}]' must be an object {{role, content}}, got "
                                               f"{json_kind(m)}")
        turns.append(check_turn(i, m))
    if not any(t["role"] == "user" for t in turns):
        raise FieldError("messages", "'messages' need at least one user turn")
    return turns


def _http(check, *args):
    """A shared field check, its FieldError as the HTTP 400 naming the field."""
    try:
        return check(*args)
    except FieldError as e:
        raise bad(e.param, str(e)) from None


def invalid_text(value, where: str = "") -> tuple[str, str] | None:
    """(field path, why) of the first string, key or value, in a decoded JSON value that is not Unicode text
    UTF-8 can carry: JSON's `\\ud800` escapes decode to lone surrogates, which no tokenizer or encoder accepts."""
    todo = [(where, value)]
    while todo:  # iterative: nesting depth costs no recursion
        path, v = todo.pop()
        if isinstance(v, str):
            if not v.isascii():
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError as e:
                    return path, f"a lone surrogate U+{ord(v[e.start]):04X} at character {e.start}"
        elif isinstance(v, dict):
            for key, item in reversed(v.items()):
                inner = f"{path}.{key}" if path else str(key)
                if isinstance(key, str) and invalid_text(key) is not None:
                    return (path or "the request"), f"a key with {invalid_text(key)[1]}"
                todo.append((inner, item))
        elif isinstance(v, list):
            todo.extend((f"{path}[{i}]", item) for i, item in reversed(list(enumerate(v))))
    return None


def check_text(body, where: str = ""):
    """400 naming the first field whose text is not valid UTF-8 (before anything stores or echoes it)."""
    found = invalid_text(body, where)
    if found is not None:
        path, why = found
        raise bad(path, f"'{path}' is not valid UTF-8 text: {why}", code="invalid_text")


def _number(body, name, default, lo, hi, lo_open=False) -> float:
    v = body.get(name)
    return default if v is None else _http(number_field, name, v, lo, hi, lo_open)


def _integer(body, name, default, lo, hi) -> int:
    v = body.get(name)
    return default if v is None else _http(integer_field, name, v, lo, hi)


def _check_fields(body, allowed: set[str]):
    if not isinstance(body, dict):
        raise bad(None, f"the request body must be a JSON object, got {json_kind(body)}")
    check_text(body)
    for name in sorted(set(body) - allowed):
        raise bad(name, f"unrecognized request argument supplied: {name}", code="unknown_parameter")


def _common(body, ctx: ParseContext, gen: Generation, budget_field: str = "max_tokens"):
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", f"'model' must be a non-empty string, got {json_kind(model)}")
    if model != ctx.model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {ctx.model_name!r}",
                       param="model", code="model_not_found")
    gen.model = model
    if body.get("n") is not None and _integer(body, "n", 1, 1, 1 << 30) != 1:
        raise bad("n", f"'n' must be 1 (one choice per request), got {body['n']}")
    budget = body.get(budget_field) if body.get(budget_field) is not None else body.get("max_tokens")
    name = budget_field if body.get(budget_field) is not None else "max_tokens"
    gen.max_tokens = _integer({name: budget}, name, ctx.max_new_tokens, 1, ctx.max_new_tokens)
    gen.temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    gen.top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, 0.0, -2.0, 2.0) != 0.0:
            raise bad(name, f"'{name}' is not supported (only 0)", code="unsupported_value")
    if body.get("logprobs") not in (None, False):
        raise bad("logprobs", "'logprobs' is not supported", code="unsupported_value")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is None:
        stop = []
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise bad("stop", f"'stop' must be a non-empty string or a list of at most {MAX_STOP} non-empty strings")
    gen.stop = stop
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise bad("seed", f"'seed' must be an integer, got {json_kind(seed)}")
    gen.seed = seed
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise bad("stream", f"'stream' must be a boolean, got {json_kind(stream)}")
    gen.stream = bool(stream)
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise bad("stream_options", "'stream_options' must be an object with only 'include_usage'")
        if not gen.stream:
            raise bad("stream_options", "'stream_options' is only allowed with 'stream': true")
        gen.include_usage = bool(options.get("include_usage", False))
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise bad("user", f"'user' must be a string, got {json_kind(body['user'])}")


def parse_documents(value, ctx: ParseContext, param: str = "documents") -> list[Document]:
    """A `documents` value -> Documents (tokenized). Strings, {"id", "text"} objects, or {"id"} of a known one."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise bad(param, f"'{param}' must be an array of strings or {{id, text}} objects, got {json_kind(value)}")
    out = []
    for i, d in enumerate(value):
        where = f"{param}[{i}]"
        if isinstance(d, str):
            text, name = d, None
        elif isinstance(d, dict):
            unknown = sorted(set(d) - {"id", "text"})
            if unknown:
                raise bad(where, f"'{where}' has unknown fields {', '.join(map(repr, unknown))}; valid: 'id', 'text'")
            name, text = d.get("id"), d.get("text")
            if name is not None and (not isinstance(name, str) or not name):
                raise bad(f"{where}.id", f"'{where}.id' must be a non-empty string, got {json_kind(name)}")
            if text is None:
                if name is None:
                    raise bad(where, f"'{where}' needs 'text' or the 'id' of a document encoded before")
                known = ctx.find_document(name)
                if known is None:
                    raise APIError(404, f"'{where}.id': no document {name!r} is known (encode it with POST "
                                        "/v1/documents or send its text)", param=f"{where}.id",
                                   code="document_not_found")
                out.append(known)
                continue
        else:
            raise bad(where, f"'{where}' must be a string or an {{id, text}} object, got {json_kind(d)}")
        if not isinstance(text, str) or not text:
            raise bad(where, f"'{where}' must have non-empty text")
        if name is not None and is_content_id(name):  # names and content ids live apart (see names.py)
            raise bad(f"{where}.id", f"'{where}.id' {name!r} has the form of a content id (doc- and 32 hex digits), "
                                     "which a name may not have: choose another name, or send the text alone")
        out.append(Document(ctx.codec.encode(text), text, name))
    return out


def _content(message, where: str) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: text only
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"{where}.content[{j}]", f"'{where}.content[{j}]' must be a {{type: text, text}} part")
            parts.append(part["text"])
        return "".join(parts)
    raise bad(f"{where}.content", f"'{where}.content' must be a string or an array of text parts, got "
                                  f"{json_kind(content)}")


def _document_texts(docs: list[Document], codec) -> list[str]:
    return [d.text if d.text is not None else codec.decode(d.ids) for d in docs]


def parse_chat(body, ctx: ParseContext) -> Generation:
    _check_fields(body, CHAT_FIELDS)
    gen = Generation([])
    _common(body, ctx, gen, budget_field="max_completion_tokens")

    def turn(i, m):
        where = f"messages[{i}]"
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"{where}.role", f"'{where}.role' must be one of {', '.join(ROLES)}, got {role!r}")
        return {"role": "system" if role == "developer" else role, "content": _content(m, where)}

    turns = _http(check_turns, body.get("messages"), turn)
    docs = parse_documents(body.get("documents"), ctx)
    inline = None
    if ctx.mode in ("full", "prefix") and docs:  # the baselines read the documents as prompt text
        inline = _document_texts(docs, ctx.codec)
        gen.inline_document_tokens = sum(len(d.ids) for d in docs)
        docs = []
    gen.documents = docs
    try:
        gen.prompt_ids = ctx.codec.messages_ids(turns, inline)
    except Exception as e:  # a chat template that rejects these turns
        raise bad("messages", f"'messages' could not be rendered: {type(e).__name__}: {e}") from None
    return gen


def parse_completion(body, ctx: ParseContext) -> Generation:
    _check_fields(body, COMPLETION_FIELDS)
    gen = Generation([])
    _common(body, ctx, gen)
    for name, ok in (("echo", (None, False)), ("best_of", (None, 1)), ("suffix", (None,))):
        if body.get(name) not in ok:
            raise bad(name, f"'{name}' is not supported", code="unsupported_value")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise bad("prompt", f"'prompt' must be a non-empty string, got {json_kind(prompt)}")
    docs = parse_documents(body.get("documents"), ctx)
    if ctx.mode in ("full", "prefix") and docs:
        prompt = "\n\n".join(_document_texts(docs, ctx.codec)) + "\n\n" + prompt
        gen.inline_document_tokens = sum(len(d.ids) for d in docs)
        docs = []
    gen.documents = docs
    gen.prompt_ids = ctx.codec.encode_markup(prompt)
    return gen


def parse_document_upload(body, ctx: ParseContext) -> tuple[list[Document], bool, float | None]:
    """POST /v1/documents: {"documents": [...], "pin": bool, "ttl_s": seconds} -> (documents, pin, ttl_s)."""
    _check_fields(body, DOCUMENT_FIELDS)
    docs = parse_documents(body.get("documents"), ctx)
    if not docs:
        raise bad("documents", "'documents' must be a non-empty array")
    pin = body.get("pin", False)
    if not isinstance(pin, bool):
        raise bad("pin", f"'pin' must be a boolean, got {json_kind(pin)}")
    ttl = body.get("ttl_s")
    if ttl is not None:
        ttl = _number(body, "ttl_s", 0.0, 0.0, 365 * 86400.0, lo_open=True)
    return docs, pin, ttl

"""Property-based tests (hypothesis) of the request readers: the HTTP parsers in comb_jax/serving/protocol.py and
the batch reader in serve.py. Whatever the JSON (any shape, any text, lone surrogates included), a reader returns
a request or an error in our shape that can be sent (valid UTF-8), never another exception. Derandomized and
bounded, so CI runs the same examples in a few seconds."""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from comb_jax.serving import batch
from comb_jax.serving.protocol import (
    CHAT_FIELDS,
    COMPLETION_FIELDS,
    DOCUMENT_FIELDS,
    APIError,
    ParseContext,
    parse_chat,
    parse_completion,
    parse_document_upload,
)
from comb_jax.text.codec import Codec

CODEC = Codec(None)  # the byte-level toy of tiny_comb
MODEL = "tiny_comb"
CTX = ParseContext(CODEC, MODEL, max_new_tokens=8)
FUZZ = settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))

# text with lone surrogates (what JSON's \ud800 escapes decode to) as well as ordinary text
TEXT = st.one_of(st.text(max_size=12), st.text(st.characters(categories=["Cs", "Ll", "Nd"]), max_size=6),
                 st.sampled_from(["user", "system", "assistant", MODEL, "doc-" + "0" * 32, "text"]))
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-3, 10), st.integers(), st.floats(), TEXT)
JSON = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                    max_leaves=12)
MESSAGE = st.fixed_dictionaries({}, optional={"role": st.one_of(TEXT, JSON), "content": st.one_of(TEXT, JSON)})
DOCUMENT = st.one_of(TEXT, st.fixed_dictionaries({}, optional={"id": st.one_of(TEXT, JSON), "text": TEXT}), JSON)


def body_for(fields) -> st.SearchStrategy:
    """Objects with the endpoint's own fields (mostly plausible values), now and then an unknown one."""
    plausible = {"model": st.one_of(st.just(MODEL), JSON), "messages": st.one_of(st.lists(MESSAGE, max_size=3), JSON),
                 "prompt": st.one_of(TEXT, JSON), "documents": st.one_of(st.lists(DOCUMENT, max_size=3), JSON),
                 "max_tokens": st.one_of(st.integers(0, 10), JSON), "stop": st.one_of(TEXT, JSON)}
    optional = {name: plausible.get(name, JSON) for name in sorted(fields)}
    return st.one_of(st.fixed_dictionaries({}, optional=optional),
                     st.fixed_dictionaries({}, optional=optional).flatmap(
                         lambda d: st.dictionaries(TEXT, JSON, max_size=2).map(lambda extra: {**extra, **d})),
                     JSON)


def assert_sendable(error: APIError):
    assert error.status in (400, 404, 413), error.status
    body = error.body()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["message"]
    json.dumps(error.body(), ensure_ascii=False).encode("utf-8")  # what the response encodes: no surrogates


def parses_or_names_the_problem(parse, body):
    try:
        parse(body, CTX)
    except APIError as e:
        assert_sendable(e)


@FUZZ
@given(body_for(CHAT_FIELDS))
def test_chat_reader(body):
    parses_or_names_the_problem(parse_chat, body)


@FUZZ
@given(body_for(COMPLETION_FIELDS))
def test_completion_reader(body):
    parses_or_names_the_problem(parse_completion, body)


@FUZZ
@given(body_for(DOCUMENT_FIELDS))
def test_document_upload_reader(body):
    parses_or_names_the_problem(parse_document_upload, body)


BATCH_FIELDS = {"id": st.one_of(TEXT, JSON, st.just("line-2")), "chunks": st.one_of(st.lists(TEXT, max_size=3), JSON),
                "question": st.one_of(TEXT, JSON), "messages": st.one_of(st.lists(MESSAGE, max_size=2), JSON),
                "max_tokens": st.one_of(st.integers(0, 10), JSON), "temperature": JSON, "top_p": JSON}
BATCH_LINE = st.one_of(
    st.fixed_dictionaries({}, optional=BATCH_FIELDS).map(json.dumps),  # escapes: surrogates arrive as \ud800
    JSON.map(json.dumps),
    st.binary(max_size=40),
    st.just(b"\xef\xbb\xbf" + b'{"question": "q"}'),
)


@FUZZ
@given(st.lists(BATCH_LINE, max_size=5))
def test_batch_reader(lines):
    """One Line per non-blank line, in order: a request, or an error starting `line N: `; ids unique."""
    parsed = batch.read_requests(lines, CODEC, "comb", 8)
    numbers = [n for n, raw in enumerate(lines, 1) if raw.strip()]
    assert [p.number for p in parsed] == numbers
    for p in parsed:
        assert (p.request is None) != (p.error is None)
        if p.error is not None:
            assert p.error.startswith(f"line {p.number}: "), p.error
        json.dumps({"id": p.id, "error": p.error})  # the output row can be written
    served = [p.request.id for p in parsed if p.request is not None]
    assert len(served) == len(set(served))

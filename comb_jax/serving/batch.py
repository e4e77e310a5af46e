"""The batch JSONL mode of serve.py: request lines in, result lines out, in input order.

Request lines: {"id", "chunks": [text, ...], "question" | "messages", "max_tokens", "temperature", "top_p"}.
Output lines: {"id", "line", "answer", "ttft_s", "output_tokens", "chunk_hits", "chunk_misses", "error"}. A line
that is not valid UTF-8 or JSON, has an unknown field or a field of the wrong type or range, or cannot be served gets
its own error (naming the line and the field) and every other line is served. The field rules are the HTTP server's
(`protocol.integer_field`, `number_field`, `check_turns`). Results are written to OUTPUT.partial as they finish, in
input order, and renamed to OUTPUT at the end.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from comb_jax.errors import UsageError, one_line
from comb_jax.model.compiles import compile_count
from comb_jax.serving import batch_io
from comb_jax.serving.engine import Engine, Request, Result
from comb_jax.serving.pool import RequestError
from comb_jax.serving.protocol import (
    FieldError,
    check_turns,
    got,
    integer_field,
    invalid_text,
    json_kind,
    number_field,
    shown,
)
from comb_jax.text.codec import make_codec
from comb_jax.text.prompt import inline_context

REQUEST_FIELDS = ("id", "chunks", "question", "messages", "max_tokens", "temperature", "top_p")
ROLES = ("system", "user", "assistant")
MAX_TEMPERATURE = 100.0


def request_id(obj, line_no: int, auto_id: str | None = None):
    """The id as given (a string or a finite number), or `auto_id` (default `line-N`) when there is none."""
    if "id" not in obj:
        return auto_id or f"line-{line_no}"
    rid = obj["id"]
    if isinstance(rid, str) or (isinstance(rid, int) and not isinstance(rid, bool)) or (
            isinstance(rid, float) and math.isfinite(rid)):
        return rid
    raise RequestError(f"'id' must be a string or a number, got {got(rid)}")


def _turn(i: int, m: dict) -> dict:
    """One batch message: exactly {role, content}, both strings, the role one of ROLES."""
    unknown = sorted(set(m) - {"role", "content"})
    if unknown:
        raise FieldError(f"messages[{i}]", f"'messages[{i}]' has unknown fields {', '.join(map(repr, unknown))}; "
                                           "valid: 'role', 'content'")
    for key in ("role", "content"):
        if key not in m:
            raise FieldError(f"messages[{i}].{key}", f"'messages[{i}].{key}' is missing")
        if not isinstance(m[key], str):
            raise FieldError(f"messages[{i}].{key}", f"'messages[{i}].{key}' must be a string, got {json_kind(m[key])}")
    if m["role"] not in ROLES:
        raise FieldError(f"messages[{i}].role", f"'messages[{i}].role' must be one of {', '.join(ROLES)}, got "
                                                f"{shown(m['role'])}")
    return m


def prompt_ids(codec, question, messages, inline_chunks: list[str] | None) -> list[int]:
    """Chat prompt ids. `inline_chunks` (modes full, prefix): the chunks go into the (last) user turn, as in
    training."""
    if messages is None:
        return codec.prompt_ids(question if inline_chunks is None else inline_context(inline_chunks, question))
    return codec.messages_ids(messages, inline_chunks)


def parse_request(obj, line_no: int, codec, mode: str, max_new_tokens: int = 1 << 30,
                  auto_id: str | None = None) -> Request:
    """A decoded JSON request -> engine Request (id: the id as a string). Raises RequestError naming the field."""
    if not isinstance(obj, dict):
        raise RequestError(f"a request must be a JSON object, got {json_kind(obj)}")
    unknown = sorted(set(obj) - set(REQUEST_FIELDS))
    if unknown:
        raise RequestError(f"unknown fields {', '.join(map(repr, unknown))}; valid: {', '.join(REQUEST_FIELDS)}")
    bad_text = invalid_text(obj)
    if bad_text is not None:  # before tokenizing, so the error names this field, not the prompt
        raise RequestError(f"'{bad_text[0]}' is not valid UTF-8 text: {bad_text[1]}")
    rid = str(request_id(obj, line_no, auto_id))
    chunks = obj.get("chunks", [])
    if not isinstance(chunks, list):
        raise RequestError(f"'chunks' must be a list of strings, got {json_kind(chunks)}")
    for i, c in enumerate(chunks):
        if not isinstance(c, str):
            raise RequestError(f"'chunks' must be a list of strings: 'chunks[{i}]' is {json_kind(c)}")
        if not c:
            raise RequestError(f"'chunks[{i}]' is an empty string")
    question, messages = obj.get("question"), obj.get("messages")
    if ("question" in obj) == ("messages" in obj):
        raise RequestError("give exactly one of 'question' or 'messages'")
    if "question" in obj and not isinstance(question, str):
        raise RequestError(f"'question' must be a string, got {json_kind(question)}")
    if "messages" in obj:
        check_turns(messages, _turn)
    max_tokens = integer_field("max_tokens", obj["max_tokens"], 1, max_new_tokens) if "max_tokens" in obj else 0
    temperature = (number_field("temperature", obj["temperature"], 0.0, MAX_TEMPERATURE) if "temperature" in obj
                   else 0.0)
    top_p = number_field("top_p", obj["top_p"], 0.0, 1.0, lo_open=True) if "top_p" in obj else 1.0
    try:
        if mode in ("full", "prefix"):  # the baselines read the chunks as prompt text
            ids, chunk_token_ids = prompt_ids(codec, question, messages, chunks), []
        else:
            ids = prompt_ids(codec, question, messages, None)
            chunk_token_ids = [codec.encode(c) for c in chunks]
    except RequestError:
        raise
    except Exception as e:  # a chat template that rejects these messages, a tokenizer error
        raise RequestError(f"'{'messages' if messages is not None else 'question'}' could not be tokenized: "
                           f"{type(e).__name__}: {one_line(str(e), 200)}") from None
    return Request(rid, ids, chunk_token_ids, max_tokens, temperature, top_p)


@dataclass
class Line:
    """One request line: its 1-based number, the id to report, and either a Request or an error message."""

    number: int
    id: object
    request: Request | None = None
    error: str | None = None


def decode_line(raw) -> object:
    """bytes or str -> the decoded JSON value; RequestError for invalid UTF-8, bad JSON or too deep nesting."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RequestError(f"not valid UTF-8: byte {raw[e.start:e.start + 1]!r} at offset {e.start}") from None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise RequestError(f"JSONDecodeError: {e}") from None
    except RecursionError:
        raise RequestError("invalid JSON: nested too deeply") from None
    except ValueError as e:  # e.g. an integer with more digits than Python converts
        raise RequestError(f"invalid JSON: {one_line(str(e), 200)}") from None


def _decode_or_error(raw):
    try:
        return decode_line(raw)
    except Exception as e:  # kept as the line's value: read_requests reports it
        return e


def read_requests(lines, codec, mode: str, max_new_tokens: int = 1 << 30) -> list[Line]:
    """Every non-blank line (bytes or str) -> a Line: a parsed Request, or that line's error. Never raises for
    bad input: each problem names its field and the line's number, and the other lines are unaffected."""
    decoded = [(n, _decode_or_error(raw)) for n, raw in enumerate(lines, 1) if raw.strip()]
    auto_ids = batch_io.AutoIds(obj["id"] for _, obj in decoded if isinstance(obj, dict) and "id" in obj)
    out, seen = [], set()
    for n, obj in decoded:
        rid = auto_ids(n)
        try:
            if isinstance(obj, Exception):
                raise obj
            if isinstance(obj, dict):
                try:
                    rid = request_id(obj, n, rid)
                except RequestError:
                    pass
            req = parse_request(obj, n, codec, mode, max_new_tokens, auto_id=rid)
            if req.id in seen:
                raise RequestError(f"duplicate request id {rid!r}")
        except RequestError as e:
            out.append(Line(n, rid, error=f"line {n}: {e}"))
            continue
        except Exception as e:  # never let one line stop the batch
            out.append(Line(n, rid, error=f"line {n}: could not read the request: {type(e).__name__}: "
                                         f"{one_line(str(e), 200)}"))
            continue
        seen.add(req.id)
        out.append(Line(n, rid, request=req))
    return out


class ResultWriter:
    """Result rows in input order, written as soon as every earlier row is final, to `OUTPUT.partial`;
    `commit()` renames it to OUTPUT. Opened before the model loads, so an unwritable output fails first."""

    def __init__(self, path):
        self.path = Path(path)
        if self.path.is_dir():
            raise UsageError(f"--output {self.path} is a directory")
        if not self.path.parent.is_dir():
            raise UsageError(f"--output {self.path}: directory {self.path.parent} does not exist")
        self.tmp, self.file = batch_io.open_locked_partial(self.path)  # locked: one run per output at a time
        self.rows, self.next, self.written = {}, 0, 0

    def put(self, index: int, row: dict):
        self.rows[index] = row
        while self.next in self.rows:
            self.file.write(json.dumps(self.rows.pop(self.next)) + "\n")
            self.next += 1
            self.written += 1
        self.file.flush()

    def commit(self):
        os.replace(self.tmp, self.path)  # still under the lock: no other run can take the partial file between
        self.file.close()

    @contextmanager
    def finishing(self, prog: str):
        """Serving inside this block: when it stops early, say where the results finished so far are (and go on
        raising)."""
        try:
            yield self
        except BaseException:
            print(f"{prog}: stopped before the end; {self.abort()}", file=sys.stderr)
            raise

    def abort(self) -> str:
        """Close, keeping what was written (or removing an empty file); says where the results are."""
        self.file.close()
        if self.written == 0:
            self.tmp.unlink(missing_ok=True)
            return "no results were written"
        return f"the {self.written} results finished so far are in {self.tmp}"


def read_input(path) -> list[bytes]:
    """The input file's lines as bytes (each is decoded on its own, so one bad byte costs only its line)."""
    return batch_io.read_input_lines(path)


def result_row(line: Line, result: Result | None, codec) -> dict:
    if result is None or result.error is not None:
        error = line.error or f"line {line.number}: {result.error}"
        return {"id": line.id, "line": line.number, "answer": None, "ttft_s": None, "output_tokens": 0,
                "chunk_hits": 0, "chunk_misses": 0, "error": error}
    return {"id": line.id, "line": line.number, "answer": codec.decode(result.tokens), "ttft_s": result.ttft_s,
            "output_tokens": len(result.tokens), "chunk_hits": result.chunk_hits,
            "chunk_misses": result.chunk_misses, "error": None}


def percentile(values, q):
    return float(np.percentile(values, q)) if values else None


def summarize(results: list[Result], total: int, elapsed: float, engine: Engine) -> dict:
    """Throughput and TTFT of the served `results` (of `total` request lines; the rest failed to parse)."""
    ok = [r for r in results if r.error is None]
    hits = [r.ttft_s for r in ok if r.chunk_hits and not r.chunk_misses]
    misses = [r.ttft_s for r in ok if r.chunk_misses]
    plain = [r.ttft_s for r in ok if not r.chunk_hits and not r.chunk_misses]
    stats = engine.pool.stats
    looked_up = stats.hits + stats.misses
    return {
        "requests": total, "errors": total - len(ok), "elapsed_s": round(elapsed, 3),
        "requests_per_s": round(len(ok) / elapsed, 3) if elapsed else None,
        "output_tokens_per_s": round(sum(len(r.tokens) for r in ok) / elapsed, 2) if elapsed else None,
        "ttft_hit_p50_s": percentile(hits, 50), "ttft_hit_p95_s": percentile(hits, 95),
        "ttft_miss_p50_s": percentile(misses, 50), "ttft_miss_p95_s": percentile(misses, 95),
        "ttft_no_context_p50_s": percentile(plain, 50),
        "chunk_hits": stats.hits, "chunk_misses": stats.misses, "evictions": stats.evictions,
        "hit_rate": round(stats.hits / looked_up, 4) if looked_up else None,
        "pool_pages_used": engine.pool.used_pages, "pool_pages": engine.pool.num_pages,
        "pool_occupancy": round(engine.pool.used_pages / engine.pool.num_pages, 4),
        # mode prefix: hits and misses above are whole prompt pages; this is per prompt token
        "prefix_token_hit_rate": (round(engine.prefix.stats.reused_tokens / engine.prefix.stats.prompt_tokens, 4)
                                  if engine.prefix is not None and engine.prefix.stats.prompt_tokens else None),
    }


def serve_batch(cfg, params, lines, writer: ResultWriter, *, mode: str = "comb", warmup: bool = False):
    """Parse `lines`, serve them on `params` and write each row as it finishes -> (rows in input order, summary)."""
    codec = make_codec(cfg)
    engine = Engine.for_codec(cfg, params, codec, mode)
    parsed = read_requests(lines, codec, mode, cfg.serve.max_new_tokens)
    index = {ln.request.id: i for i, ln in enumerate(parsed) if ln.request is not None}
    rows: dict[int, dict] = {}

    def emit(i: int, result: Result | None):
        rows[i] = result_row(parsed[i], result, codec)
        writer.put(i, rows[i])

    for i, ln in enumerate(parsed):
        if ln.error is not None:
            emit(i, None)
    if warmup:
        engine.warmup()
    requests = [ln.request for ln in parsed if ln.request is not None]
    compiles = compile_count()
    start = time.perf_counter()
    with tqdm(total=len(requests), desc=f"serve {mode}", unit="req", file=sys.stderr) as bar:
        served = engine.run(requests, progress=bar, on_result=lambda res: emit(index[res.id], res))
    elapsed = time.perf_counter() - start
    writer.commit()
    summary = summarize(served, len(parsed), elapsed, engine)
    summary["compilations_while_serving"] = compile_count() - compiles  # TTFT of those batches includes them
    return [rows[i] for i in range(len(parsed))], summary

"""Batch inference with Comb: chunks become PICaches in a page pool, prompts are prefilled, one decode loop.

    python serve.py [--config smollm2_pointer] [--checkpoint RUN_DIR] --input requests.jsonl \
        --output results.jsonl [--mode comb|full] [key=value overrides]
    python serve.py --http --config smollm2_comb --port 8000   # the OpenAI-compatible server (comb_jax/serving)

Request lines: {"id", "chunks": [text, ...], "question" | "messages", "max_tokens", "temperature", "top_p"}.
Output lines, in input order: {"id", "line", "answer", "ttft_s", "output_tokens", "chunk_hits", "chunk_misses",
"error"}. A line that is not valid UTF-8 or JSON, has an unknown field or a field of the wrong type or range, or
cannot be served gets its own error (naming the line and the field) and every other line is served. Results are
written to OUTPUT.partial as they finish, in input order, and renamed to OUTPUT at the end; --input and --output
are checked before the model loads. Without --input a built-in demo batch runs, in which the same chunks recur in
different orders.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from comb_jax.cli import Parser, UsageError, one_line, run
from comb_jax.config import load_config
from comb_jax.model.tokenizer import chat_prompt_ids, text_ids
from comb_jax.serving import batch_io
from comb_jax.serving.engine import Engine, Request, Result, compile_count
from comb_jax.serving.pool import RequestError
from comb_jax.serving.protocol import invalid_text, json_kind
from comb_jax.training.checkpoint import load_model
from comb_jax.training.data import make_codec

DEMO_CHUNKS = [
    "Mira keeps her bicycle in the blue shed behind the bakery. The red shed holds only garden tools.",
    "The town library opens at nine in the morning and closes at six, except on Sundays when it is closed.",
    "Jonas bakes rye bread every Tuesday and sells it at the market square for three euros a loaf.",
    "The river Alder floods every spring, so the footbridge near the mill is closed from March to May.",
    # invented facts (made-up names, years and codes): no model can answer these without reading its chunks
    "The Dravenko Society was founded in 1743 by Tolvar Brimesthan. It met in a tavern by the harbour.",
    "The archive lists Keluna Vosmirath under the registration code KT-482. Her letters fill three boxes.",
]
# (chunk that holds the answer, question, the answer as the chunk states it)
DEMO_QUESTIONS = [
    (0, "Where does Mira keep her bicycle?", "blue shed"),
    (1, "When does the library close?", "six"),
    (2, "How much does Jonas charge for a loaf of rye bread?", "three euros"),
    (3, "Why is the footbridge closed in spring?", "floods"),
    (4, "In what year was the Dravenko Society founded?", "1743"),
    (5, "What is the registration code of Keluna Vosmirath?", "KT-482"),
]


def demo_requests(rounds: int = 3, seed: int = 0) -> list[dict]:
    """Each round asks every question with all the chunks in a fresh order: later rounds are all hits."""
    rng = np.random.default_rng(seed)
    out = []
    for r in range(rounds):
        for q, (_, question, _) in enumerate(DEMO_QUESTIONS):
            order = rng.permutation(len(DEMO_CHUNKS))
            out.append({"id": f"demo-{r}-{q}", "chunks": [DEMO_CHUNKS[i] for i in order], "question": question})
    out.append({"id": "demo-no-context", "chunks": [], "question": "What is the capital of France?"})
    return out


def demo_expected(request_id: str) -> str | None:
    """The answer a demo request's chunks state (None for the no-context request)."""
    parts = request_id.split("-")
    return DEMO_QUESTIONS[int(parts[2])][2] if len(parts) == 3 and parts[2].isdigit() else None


REQUEST_FIELDS = ("id", "chunks", "question", "messages", "max_tokens", "temperature", "top_p")
ROLES = ("system", "user", "assistant")
MAX_TEMPERATURE = 100.0


def _shown(value) -> str:
    try:
        text = json.dumps(value) if isinstance(value, (bool, str)) or value is None else repr(value)
    except ValueError:  # an integer too long to print
        return "a very large integer"
    return text if len(text) <= 40 else text[:37] + "..."


def _got(value) -> str:
    return "null" if value is None else f"{json_kind(value)} {_shown(value)}"


def _int_field(obj, name, default, lo, hi):
    if name not in obj:
        return default
    v = obj[name]
    if isinstance(v, bool) or not isinstance(v, int):
        raise RequestError(f"'{name}' must be an integer, got {_got(v)}")
    if not lo <= v <= hi:
        raise RequestError(f"'{name}' must be in [{lo}, {hi}], got {_shown(v)}")
    return v


def _float_field(obj, name, default, lo, hi, lo_open=False):
    if name not in obj:
        return default
    v = obj[name]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise RequestError(f"'{name}' must be a number, got {_got(v)}")
    if isinstance(v, float) and not math.isfinite(v):
        raise RequestError(f"'{name}' must be a finite number, got {v}")
    if not ((lo < v) if lo_open else (lo <= v)) or not v <= hi:  # exact for huge ints too (no float overflow)
        raise RequestError(f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {_shown(v)}")
    return float(v)


def request_id(obj, line_no: int, auto_id: str | None = None):
    """The id as given (a string or a finite number), or `auto_id` (default `line-N`) when there is none."""
    if "id" not in obj:
        return auto_id or f"line-{line_no}"
    rid = obj["id"]
    if isinstance(rid, str) or (isinstance(rid, int) and not isinstance(rid, bool)) or (
            isinstance(rid, float) and math.isfinite(rid)):
        return rid
    raise RequestError(f"'id' must be a string or a number, got {_got(rid)}")


def check_messages(messages):
    if not isinstance(messages, list) or not messages:
        raise RequestError(f"'messages' must be a non-empty array of {{role, content}} objects, got "
                           f"{json_kind(messages)}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RequestError(f"'messages[{i}]' must be an object {{role, content}}, got {json_kind(m)}")
        unknown = sorted(set(m) - {"role", "content"})
        if unknown:
            raise RequestError(f"'messages[{i}]' has unknown fields {', '.join(map(repr, unknown))}; "
                               "valid: 'role', 'content'")
        for key in ("role", "content"):
            if key not in m:
                raise RequestError(f"'messages[{i}].{key}' is missing")
            if not isinstance(m[key], str):
                raise RequestError(f"'messages[{i}].{key}' must be a string, got {json_kind(m[key])}")
        if m["role"] not in ROLES:
            raise RequestError(f"'messages[{i}].role' must be one of {', '.join(ROLES)}, got {_shown(m['role'])}")
    if not any(m["role"] == "user" for m in messages):
        raise RequestError("'messages' need at least one user turn")


def chunk_ids(codec, text: str) -> list[int]:
    """A chunk's ids, with any control-token spelling in it tokenized as text."""
    return codec.encode(text) if codec.tok is None else text_ids(codec.tok, text)


def prompt_ids(codec, question, messages, inline_chunks: list[str] | None) -> list[int]:
    """Chat prompt ids. `inline_chunks` (mode full): the chunks go into the (last) user turn, as in training."""
    def with_context(text):
        if inline_chunks is None:
            return text
        return "Context:\n" + "\n\n".join(inline_chunks) + "\n\nQuestion: " + text

    if messages is None:
        return codec.prompt_ids(with_context(question))
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    messages = [dict(m) for m in messages]
    messages[last_user]["content"] = with_context(messages[last_user]["content"])
    if codec.tok is None:  # the byte-level toy has no chat template: the last user turn is the question
        return codec.prompt_ids(messages[last_user]["content"])
    return chat_prompt_ids(codec.tok, messages=messages)


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
        check_messages(messages)
    max_tokens = _int_field(obj, "max_tokens", 0, 1, max_new_tokens)
    temperature = _float_field(obj, "temperature", 0.0, 0.0, MAX_TEMPERATURE)
    top_p = _float_field(obj, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    try:
        if mode == "full":
            ids, chunk_token_ids = prompt_ids(codec, question, messages, chunks), []
        else:
            ids = prompt_ids(codec, question, messages, None)
            chunk_token_ids = [chunk_ids(codec, c) for c in chunks]
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
    }


def main(argv=None) -> int:
    ap = Parser(prog="serve.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="smollm2_pointer")
    ap.add_argument("--checkpoint", default=None,
                    help="train.py run dir or checkpoint dir (comb params), or a Comb directory in the Hugging Face "
                         "layout (export_comb's or the release's: its own model config and tokenizer)")
    ap.add_argument("--input", default=None, help="requests JSONL (default: the built-in demo batch)")
    ap.add_argument("--output", default="results.jsonl")
    ap.add_argument("--mode", choices=("comb", "full"), default="comb",
                    help="comb: chunks as PICaches; full: chunks inlined in the prompt, no PIC (baseline)")
    ap.add_argument("--warmup", action="store_true",
                    help="compile every bucket before serving, so TTFT excludes compilation")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the memory plan for one device (weights, PICache pool, decode slots) and exit; "
                         "abstract shapes only, nothing is loaded or allocated")
    ap.add_argument("--device-gb", type=float, default=80.0, help="--dry-run: device memory in GB (1e9 bytes)")
    http = ap.add_argument_group("HTTP server (--http; see comb_jax/serving/app.py)")
    http.add_argument("--http", action="store_true", help="serve the OpenAI-compatible API instead of a JSONL batch")
    http.add_argument("--host", default="127.0.0.1")
    http.add_argument("--port", type=int, default=8000)
    http.add_argument("--store-dir", default=None,
                      help="persistent PICache store (default $COMB_JAX_CACHE/picache; 'none': memory only)")
    http.add_argument("--host-cache-mb", type=float, default=1024, help="host-memory PICache tier size")
    http.add_argument("--when-full", choices=("reject", "wait"), default="reject",
                      help="a request when the pool is full of pinned pages: 429 at once, or wait --full-wait-s")
    http.add_argument("--full-wait-s", type=float, default=30.0)
    http.add_argument("--max-body-mb", type=float, default=16.0, help="largest request body (413 above)")
    http.add_argument("--max-queue", type=int, default=256,
                      help="requests waiting for a decode slot, at most (429 with Retry-After above)")
    ap.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = ap.parse_args(argv)

    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        from comb_jax.serving.memory_plan import format_plan, memory_plan

        plan = memory_plan(cfg, int(args.device_gb * 1e9))
        print(format_plan(plan), file=sys.stderr)
        print(json.dumps(plan))
        return 0
    if args.http:
        from comb_jax.serving.app import DEFAULT_STORE_DIR, run_server

        return run_server(cfg, args.checkpoint, mode=args.mode, host=args.host, port=args.port,
                          store_dir=args.store_dir or str(DEFAULT_STORE_DIR), host_cache_mb=args.host_cache_mb,
                          when_full=args.when_full, full_wait_s=args.full_wait_s, max_body_mb=args.max_body_mb,
                          max_queue=args.max_queue)
    batch_io.check_output_is_not_input(args.input, args.output)
    lines = read_input(args.input) if args.input else [json.dumps(r) for r in demo_requests()]
    writer = ResultWriter(args.output)  # before the model loads: an unwritable output fails in a second
    try:
        cfg, params = load_model(cfg, args.checkpoint)
        codec = make_codec(cfg)
        bos = getattr(codec.tok, "bos_token_id", None) if codec.tok is not None else None
        engine = Engine(cfg, params, stop_ids=codec.stop_ids, tokenizer_id=codec.name, mode=args.mode, bos_id=bos)
        parsed = read_requests(lines, codec, args.mode, cfg.serve.max_new_tokens)
        index = {ln.request.id: i for i, ln in enumerate(parsed) if ln.request is not None}
        rows: dict[int, dict] = {}

        def emit(i: int, result: Result | None):
            rows[i] = result_row(parsed[i], result, codec)
            writer.put(i, rows[i])

        for i, ln in enumerate(parsed):
            if ln.error is not None:
                emit(i, None)
        if args.warmup:
            engine.warmup()
        requests = [ln.request for ln in parsed if ln.request is not None]
        compiles = compile_count()
        start = time.perf_counter()
        with tqdm(total=len(requests), desc=f"serve {args.mode}", unit="req", file=sys.stderr) as bar:
            served = engine.run(requests, progress=bar, on_result=lambda res: emit(index[res.id], res))
        elapsed = time.perf_counter() - start
        writer.commit()
    except BaseException:
        print(f"serve.py: stopped before the end; {writer.abort()}", file=sys.stderr)
        raise

    results = [rows[i] for i in range(len(parsed))]
    if not args.input:  # the demo batch: show what was answered, from where, and whether it is the chunks' fact
        from comb_jax.eval.metrics import contains_answer

        found = 0
        for r in results:
            where = f"{r['chunk_hits']} hit / {r['chunk_misses']} miss"
            ttft = f"{r['ttft_s']:.3f}s" if r["ttft_s"] is not None else "-"
            expected = demo_expected(r["id"])
            read = bool(expected is not None and not r["error"] and contains_answer(r["answer"], [expected]))
            found += read
            mark = f"  <- {expected!r}, from its chunks" if read else ""
            print(f"{r['id']:16} {where:14} ttft {ttft:>7}  {r['error'] or r['answer']!r}{mark}", file=sys.stderr)
        asked = sum(demo_expected(r["id"]) is not None for r in results)
        print(f"{found} of {asked} answers contain the fact their chunks state (the invented ones, demo-*-4 and "
              "demo-*-5, are in no model's training data)", file=sys.stderr)
    summary = summarize(served, len(results), elapsed, engine)
    summary["compilations_while_serving"] = compile_count() - compiles  # TTFT of those batches includes them
    print(json.dumps({"summary": summary, "mode": args.mode, "config": cfg.name, "output": args.output}))
    return 0


if __name__ == "__main__":
    sys.exit(run(main, "serve.py"))

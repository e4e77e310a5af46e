"""Batch inference with Comb: chunks become PICaches in a page pool, prompts are prefilled, one decode loop.

    python serve.py [--config smollm2_pointer] [--checkpoint RUN_DIR] --input requests.jsonl \\
        --output results.jsonl [--mode comb|full|prefix] [key=value overrides]
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
import sys

from comb_jax.config import load_config
from comb_jax.errors import Parser
from comb_jax.eval.metrics import contains_answer
from comb_jax.serving.app import DEFAULT_STORE_DIR, run_server
from comb_jax.serving.batch import ResultWriter, read_input, serve_batch
from comb_jax.serving.batch_io import check_output_is_not_input
from comb_jax.serving.demo import demo_expected, demo_requests
from comb_jax.serving.memory_plan import format_plan, memory_plan
from comb_jax.weights.resolve import load_model


def parse_args(argv=None):
    ap = Parser(prog="serve.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="smollm2_pointer")
    ap.add_argument("--checkpoint", default=None,
                    help="train.py run dir or checkpoint dir (comb params), or a Comb directory in the Hugging Face "
                         "layout (export_comb's or the release's: its own model config and tokenizer)")
    ap.add_argument("--input", default=None, help="requests JSONL (default: the built-in demo batch)")
    ap.add_argument("--output", default="results.jsonl")
    ap.add_argument("--mode", choices=("comb", "full", "prefix"), default="comb",
                    help="comb: chunks as PICaches; full: chunks inlined in the prompt, no PIC (baseline); prefix: "
                         "as full, reusing the backbone KV of the longest cached prompt prefix (automatic prefix "
                         "caching, the baseline users run)")
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
    return ap.parse_args(argv)


def print_demo(rows: list[dict]):
    """The demo batch: what was answered, from where, and whether it is the fact its chunks state."""
    found = 0
    for r in rows:
        where = f"{r['chunk_hits']} hit / {r['chunk_misses']} miss"
        ttft = f"{r['ttft_s']:.3f}s" if r["ttft_s"] is not None else "-"
        expected = demo_expected(r["id"])
        read = bool(expected is not None and not r["error"] and contains_answer(r["answer"], [expected]))
        found += read
        mark = f"  <- {expected!r}, from its chunks" if read else ""
        print(f"{r['id']:16} {where:14} ttft {ttft:>7}  {r['error'] or r['answer']!r}{mark}", file=sys.stderr)
    asked = sum(demo_expected(r["id"]) is not None for r in rows)
    print(f"{found} of {asked} answers contain the fact their chunks state (the invented ones, demo-*-4 and "
          "demo-*-5, are in no model's training data)", file=sys.stderr)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        plan = memory_plan(cfg, int(args.device_gb * 1e9))
        print(format_plan(plan), file=sys.stderr)
        print(json.dumps(plan))
        return 0
    if args.http:
        return run_server(cfg, args.checkpoint, mode=args.mode, host=args.host, port=args.port,
                          store_dir=args.store_dir or str(DEFAULT_STORE_DIR), host_cache_mb=args.host_cache_mb,
                          when_full=args.when_full, full_wait_s=args.full_wait_s, max_body_mb=args.max_body_mb,
                          max_queue=args.max_queue)
    check_output_is_not_input(args.input, args.output)
    lines = read_input(args.input) if args.input else [json.dumps(r) for r in demo_requests()]
    writer = ResultWriter(args.output)  # before the model loads: an unwritable output fails in a second
    with writer.finishing("serve.py"):
        cfg, params = load_model(cfg, args.checkpoint)
        rows, summary = serve_batch(cfg, params, lines, writer, mode=args.mode, warmup=args.warmup)
    if not args.input:
        print_demo(rows)
    print(json.dumps({"summary": summary, "mode": args.mode, "config": cfg.name, "output": args.output}))
    return 0

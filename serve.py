"""Batch inference with Comb: chunks become PICaches in a page pool, prompts are prefilled, one decode loop.

    python serve.py --config smollm2_comb --checkpoint runs/smollm2_comb --input requests.jsonl \
        --output results.jsonl [--mode comb|full] [key=value overrides]

Request lines: {"id", "chunks": [text, ...], "question" | "messages", "max_tokens", "temperature", "top_p"}.
Output lines: {"id", "answer", "ttft_s", "output_tokens", "chunk_hits", "chunk_misses", "error"}.
Without --input a built-in demo batch runs, in which the same chunks recur in different orders.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
from tqdm import tqdm

from comb_jax.checkpoint import load_params
from comb_jax.config import load_config
from comb_jax.data import make_codec
from comb_jax.engine import Engine, Request, Result, compile_count
from comb_jax.pool import RequestError
from comb_jax.tokenizer import chat_prompt_ids

DEMO_CHUNKS = [
    "Mira keeps her bicycle in the blue shed behind the bakery. The red shed holds only garden tools.",
    "The town library opens at nine in the morning and closes at six, except on Sundays when it is closed.",
    "Jonas bakes rye bread every Tuesday and sells it at the market square for three euros a loaf.",
    "The river Alder floods every spring, so the footbridge near the mill is closed from March to May.",
]
DEMO_QUESTIONS = [
    (0, "Where does Mira keep her bicycle?"),
    (1, "When does the library close?"),
    (2, "How much does Jonas charge for a loaf of rye bread?"),
    (3, "Why is the footbridge closed in spring?"),
]


def demo_requests(rounds: int = 3, seed: int = 0) -> list[dict]:
    """Each round asks every question with all four chunks in a fresh order: later rounds are all hits."""
    rng = np.random.default_rng(seed)
    out = []
    for r in range(rounds):
        for q, (_, question) in enumerate(DEMO_QUESTIONS):
            order = rng.permutation(len(DEMO_CHUNKS))
            out.append({"id": f"demo-{r}-{q}", "chunks": [DEMO_CHUNKS[i] for i in order], "question": question})
    out.append({"id": "demo-no-context", "chunks": [], "question": "What is the capital of France?"})
    return out


def prompt_ids(codec, question, messages, inline_chunks: list[str] | None) -> list[int]:
    """Chat prompt ids. `inline_chunks` (mode full): the chunks go into the (last) user turn, as in training."""
    def with_context(text):
        if inline_chunks is None:
            return text
        return "Context:\n" + "\n\n".join(inline_chunks) + "\n\nQuestion: " + text

    if messages is None:
        return codec.prompt_ids(with_context(question))
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    if last_user is None:
        raise RequestError("messages need at least one user turn")
    messages = [dict(m) for m in messages]
    messages[last_user]["content"] = with_context(messages[last_user]["content"])
    if codec.tok is None:  # the byte-level toy has no chat template: the last user turn is the question
        return codec.prompt_ids(messages[last_user]["content"])
    return chat_prompt_ids(codec.tok, messages=messages)


def parse_request(obj, line_no: int, codec, mode: str) -> Request:
    """A decoded JSON request -> engine Request. Raises RequestError naming what is wrong."""
    if not isinstance(obj, dict):
        raise RequestError(f"line {line_no}: a request must be a JSON object")
    rid = str(obj.get("id", f"line-{line_no}"))
    chunks = obj.get("chunks", [])
    if not isinstance(chunks, list) or not all(isinstance(c, str) for c in chunks):
        raise RequestError(f"request {rid}: 'chunks' must be a list of strings")
    question, messages = obj.get("question"), obj.get("messages")
    if (question is None) == (messages is None):
        raise RequestError(f"request {rid}: give exactly one of 'question' or 'messages'")
    if question is not None and not isinstance(question, str):
        raise RequestError(f"request {rid}: 'question' must be a string")
    if messages is not None and not (isinstance(messages, list) and all(
            isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages)):
        raise RequestError(f"request {rid}: 'messages' must be a list of {{role, content}} objects")
    try:
        max_tokens = int(obj.get("max_tokens", 0))
        temperature = float(obj.get("temperature", 0.0))
        top_p = float(obj.get("top_p", 1.0))
    except (TypeError, ValueError):
        raise RequestError(f"request {rid}: max_tokens, temperature and top_p must be numbers") from None
    if mode == "full":
        ids = prompt_ids(codec, question, messages, chunks)
        chunk_ids = []
    else:
        ids = prompt_ids(codec, question, messages, None)
        chunk_ids = [codec.encode(c) for c in chunks if c]
    return Request(rid, ids, chunk_ids, max_tokens, temperature, top_p)


def read_requests(lines, codec, mode: str):
    """-> (requests, {position: error Result}, order of ids) so malformed lines keep their place in the output."""
    requests, errors, order, seen = [], {}, [], set()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        obj = None
        try:
            obj = json.loads(line)
            req = parse_request(obj, n, codec, mode)
            if req.id in seen:
                raise RequestError(f"line {n}: duplicate request id {req.id!r}")
        except (json.JSONDecodeError, RequestError) as e:
            rid = obj.get("id", f"line-{n}") if isinstance(obj, dict) else f"line-{n}"
            errors[len(order)] = Result(str(rid), error=f"{type(e).__name__}: {e}")
            order.append(None)
            continue
        seen.add(req.id)
        requests.append(req)
        order.append(req.id)
    return requests, errors, order


def percentile(values, q):
    return float(np.percentile(values, q)) if values else None


def summarize(results: list[Result], elapsed: float, engine: Engine) -> dict:
    ok = [r for r in results if r.error is None]
    hits = [r.ttft_s for r in ok if r.chunk_hits and not r.chunk_misses]
    misses = [r.ttft_s for r in ok if r.chunk_misses]
    plain = [r.ttft_s for r in ok if not r.chunk_hits and not r.chunk_misses]
    stats = engine.pool.stats
    looked_up = stats.hits + stats.misses
    return {
        "requests": len(results), "errors": len(results) - len(ok), "elapsed_s": round(elapsed, 3),
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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="smollm2_comb")
    ap.add_argument("--checkpoint", default=None, help="train.py run dir or checkpoint dir (comb params)")
    ap.add_argument("--input", default=None, help="requests JSONL (default: the built-in demo batch)")
    ap.add_argument("--output", default="results.jsonl")
    ap.add_argument("--mode", choices=("comb", "full"), default="comb",
                    help="comb: chunks as PICaches; full: chunks inlined in the prompt, no PIC (baseline)")
    ap.add_argument("--warmup", action="store_true",
                    help="compile every bucket before serving, so TTFT excludes compilation")
    ap.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = ap.parse_args(argv)

    cfg = load_config(args.config, args.overrides)
    codec = make_codec(cfg)
    params = load_params(cfg, args.checkpoint)
    engine = Engine(cfg, params, stop_ids=codec.stop_ids, tokenizer_id=codec.name, mode=args.mode)

    if args.input:
        with open(args.input) as f:
            lines = f.readlines()
    else:
        lines = [json.dumps(r) for r in demo_requests()]
    requests, errors, order = read_requests(lines, codec, args.mode)

    if args.warmup:
        engine.warmup()
    compiles = compile_count()
    start = time.perf_counter()
    with tqdm(total=len(requests), desc=f"serve {args.mode}", unit="req", file=sys.stderr) as bar:
        served = {r.id: r for r in engine.run(requests, progress=bar)}
    elapsed = time.perf_counter() - start

    results = [errors[i] if rid is None else served[rid] for i, rid in enumerate(order)]
    answers = [None if r.error else codec.decode(r.tokens) for r in results]
    with open(args.output, "w") as f:
        for r, answer in zip(results, answers):
            f.write(json.dumps({
                "id": r.id, "answer": answer, "ttft_s": r.ttft_s,
                "output_tokens": len(r.tokens), "chunk_hits": r.chunk_hits, "chunk_misses": r.chunk_misses,
                "error": r.error}) + "\n")
    if not args.input:  # the demo batch: show what was answered, and from where
        for r, answer in zip(results, answers):
            where = f"{r.chunk_hits} hit / {r.chunk_misses} miss"
            ttft = f"{r.ttft_s:.3f}s" if r.ttft_s is not None else "-"
            print(f"{r.id:16} {where:14} ttft {ttft:>7}  {r.error or answer!r}", file=sys.stderr)
    summary = summarize(results, elapsed, engine)
    summary["compilations_while_serving"] = compile_count() - compiles  # TTFT of those batches includes them
    print(json.dumps({"summary": summary, "mode": args.mode, "config": cfg.name, "output": args.output}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Load test of the HTTP server on localhost: Comb and `--mode full` side by side, in one run; stops by itself.

    nice -n 10 python bench/server_load.py --config smollm2_comb [--requests 200 --clients 16 --documents 50]

For each mode a server (`serve.py --http`, a subprocess with a fresh PICache store) gets `--requests` streamed chat
requests from `--clients` concurrent clients; each request reads a random subset (2-4, in random order) of a
corpus of `--documents` SQuAD paragraphs (../shared/data; synthetic text without it) and asks one question, greedy.
Then every request is replayed alone (one at a time) and its answer must equal the concurrent one.
Reported per mode: requests/s, output tokens/s, client-side TTFT p50/p99, document hit rate per tier (device pool,
host memory, disk), errors and mismatches. The default overrides make the pool and host tier smaller than the
corpus, so all three tiers serve hits. Writes bench/results/server_load.json and a section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from comb_jax.serving.app import wait_ready  # noqa: E402

SHARED_DATA = ROOT.parent / "shared" / "data" / "squad_v2_dev_cs224n" / "dev-v2.0.json"
RESULTS_JSON = ROOT / "bench" / "results" / "server_load.json"
RESULTS_MD = ROOT / "bench" / "RESULTS.md"
SECTION = "## HTTP server under load (`bench/server_load.py`)"
# SmolLM2: one prompt bucket, a 512-token context of up to four ~80-token documents, 64 pool pages (the corpus
# needs ~100), 8-token answers. tiny_comb: byte-level documents of <= 60 bytes in a 64-page pool.
DEFAULT_OVERRIDES = {
    "smollm2_comb": ["serve.prompt_buckets=(64,)", "serve.context_buckets=(512,)", "serve.chunk_buckets=(128,)",
                     "serve.max_chunk_tokens=128", "serve.max_context_tokens=512", "serve.pool_tokens=4096",
                     "serve.max_batch=8", "serve.max_new_tokens=8"],
    "tiny_comb": ["serve.max_new_tokens=16"],
}
DEFAULT_HOST_MB = {"smollm2_comb": 4.0, "tiny_comb": 0.2}


def corpus(n: int, byte_level: bool, rng) -> list[tuple[str, str]]:
    """(document, question about it) pairs: SQuAD paragraphs cut short, or synthetic facts without the data."""
    pairs = []
    if SHARED_DATA.is_file():
        for article in json.loads(SHARED_DATA.read_text())["data"]:
            for p in article["paragraphs"][:2]:
                if p["qas"]:
                    pairs.append((p["context"], p["qas"][0]["question"]))
    if len(pairs) < n:
        pairs = [(f"Item {i} is kept in box {i * 7 % 13} on shelf {i % 5}, next to item {i * 3 % n}.",
                  f"Where is item {i}?") for i in range(n)]
    pairs = [pairs[i] for i in rng.choice(len(pairs), n, replace=False)]
    if byte_level:  # the toy tokenizer: one token per byte
        return [(d.encode()[:60].decode(errors="ignore"), q.encode()[:40].decode(errors="ignore")) for d, q in pairs]
    return [(" ".join(d.split()[:60]), q) for d, q in pairs]


def make_requests(pairs, count: int, rng) -> list[dict]:
    out = []
    for _ in range(count):
        k = int(rng.integers(2, 5))
        picked = [int(i) for i in rng.permutation(len(pairs))[:k]]
        out.append({"documents": [pairs[i][0] for i in picked], "question": pairs[picked[0]][1]})
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ask(client, model: str, req: dict, max_tokens: int, stream: bool) -> dict:
    start = time.perf_counter()
    kwargs = dict(model=model, messages=[{"role": "user", "content": req["question"]}], max_tokens=max_tokens,
                  temperature=0, extra_body={"documents": req["documents"]})
    if not stream:
        r = client.chat.completions.create(**kwargs)
        return {"text": r.choices[0].message.content, "usage": r.usage.model_dump()}
    ttft, parts, usage = None, [], None
    for chunk in client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
        if ttft is None:
            ttft = time.perf_counter() - start
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
    return {"text": "".join(parts), "usage": usage, "ttft_s": ttft, "latency_s": time.perf_counter() - start}


def run_mode(mode: str, args, overrides: list[str], requests: list[dict]) -> dict:
    import openai

    port = free_port()
    store = tempfile.mkdtemp(prefix="comb-load-store-")
    log_path = Path(tempfile.gettempdir()) / f"comb-load-{mode}-{port}.log"
    cmd = [sys.executable, str(ROOT / "serve.py"), "--http", "--config", args.config, "--mode", mode, "--port",
           str(port), "--store-dir", store, "--host-cache-mb", str(args.host_cache_mb), *overrides]
    if args.checkpoint:
        cmd += ["--checkpoint", args.checkpoint]
    print(f"[{mode}] starting: {' '.join(cmd)} (log {log_path})", file=sys.stderr)
    with open(log_path, "w") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        start = time.perf_counter()
        wait_ready(f"http://127.0.0.1:{port}", timeout_s=args.startup_timeout_s)
        warmup_s = time.perf_counter() - start
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                               timeout=args.request_timeout_s)
        results: list[dict | None] = [None] * len(requests)
        errors: list[str] = []
        lock = threading.Lock()

        def one(i):
            try:
                results[i] = ask(client, args.config, requests[i], args.max_tokens, stream=True)
            except Exception as e:
                with lock:
                    errors.append(f"request {i}: {type(e).__name__}: {e}")

        print(f"[{mode}] ready after {warmup_s:.0f} s; {len(requests)} requests from {args.clients} clients",
              file=sys.stderr)
        start = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(one, range(len(requests))))
        elapsed = time.perf_counter() - start
        print(f"[{mode}] concurrent phase {elapsed:.0f} s; replaying each request alone", file=sys.stderr)
        mismatches = []
        for i, req in enumerate(requests):
            if results[i] is None:
                continue
            alone = ask(client, args.config, req, args.max_tokens, stream=False)
            if alone["text"] != results[i]["text"]:
                mismatches.append({"request": i, "concurrent": results[i]["text"], "alone": alone["text"]})
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    ok = [r for r in results if r is not None]
    ttfts = [r["ttft_s"] for r in ok]
    hits = {t: sum(r["usage"]["document_hits"][t] for r in ok) for t in ("device", "host", "disk")}
    misses = sum(r["usage"]["document_misses"] for r in ok)
    lookups = sum(hits.values()) + misses
    return {
        "mode": mode, "requests": len(requests), "clients": args.clients, "errors": len(errors),
        "error_samples": errors[:5], "mismatches_vs_alone": len(mismatches), "mismatch_samples": mismatches[:5],
        "elapsed_s": round(elapsed, 2), "requests_per_s": round(len(ok) / elapsed, 3),
        "output_tokens_per_s": round(sum(r["usage"]["completion_tokens"] for r in ok) / elapsed, 2),
        "ttft_p50_s": round(float(np.percentile(ttfts, 50)), 4) if ttfts else None,
        "ttft_p99_s": round(float(np.percentile(ttfts, 99)), 4) if ttfts else None,
        "latency_p50_s": round(float(np.percentile([r["latency_s"] for r in ok], 50)), 4) if ok else None,
        "document_lookups": lookups, "document_misses": misses,
        "hit_rate": {t: round(h / lookups, 4) if lookups else None for t, h in hits.items()},
        "warmup_s": round(warmup_s, 1),
    }


def markdown(summary: dict) -> str:
    rows = summary["modes"]
    head = ("| mode | requests/s | output tokens/s | TTFT p50 (s) | TTFT p99 (s) | hit rate device / host / disk | "
            "errors | answers != alone |\n|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        rate = " / ".join(f"{r['hit_rate'][t]:.2f}" if r["hit_rate"][t] is not None else "-"
                          for t in ("device", "host", "disk"))
        if r["mode"] == "full":
            rate = "- (documents inlined)"
        lines.append(f"| {r['mode']} | {r['requests_per_s']} | {r['output_tokens_per_s']} | {r['ttft_p50_s']} | "
                     f"{r['ttft_p99_s']} | {rate} | {r['errors']} | {r['mismatches_vs_alone']} |")
    return head + "\n".join(lines) + "\n"


def write_results(summary: dict, command: str):
    RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
    runs = {}
    if RESULTS_JSON.is_file():
        try:
            runs = json.loads(RESULTS_JSON.read_text())
        except ValueError:
            runs = {}
    runs[summary["config"]] = summary
    RESULTS_JSON.write_text(json.dumps(runs, indent=2) + "\n")
    text = RESULTS_MD.read_text() if RESULTS_MD.is_file() else "# Benchmarks\n"
    block = (f"### {summary['config']}: {summary['requests']} requests, {summary['clients']} clients, "
             f"{summary['documents']} documents\n\n```\n{command}\n```\n\n{markdown(summary)}\n"
             f"Overrides: `{' '.join(summary['overrides'])}`, host tier {summary['host_cache_mb']} MB, "
             f"max_tokens {summary['max_tokens']}. Raw: `bench/results/server_load.json`.\n")
    if SECTION not in text:
        text = text.rstrip() + f"\n\n{SECTION}\n\nSee the module docstring for what runs. CPU numbers: 2 shared " \
                               "cores; compare the modes, not the absolute times.\n"
    start = text.index(SECTION)
    nxt = re.search(r"^## ", text[start + len(SECTION):], re.M)
    end = start + len(SECTION) + nxt.start() if nxt else len(text)
    section = text[start:end]
    old = re.search(rf"^### {re.escape(summary['config'])}:.*?(?=^### |\Z)", section, re.M | re.S)
    section = (section[:old.start()] + block + "\n" + section[old.end():]) if old else section.rstrip() + "\n\n" + \
        block + "\n"
    RESULTS_MD.write_text(text[:start] + section.rstrip() + "\n" + ("\n" + text[end:] if nxt else ""))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="smollm2_comb")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--documents", type=int, default=50)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--modes", default="comb,full")
    ap.add_argument("--host-cache-mb", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--startup-timeout-s", type=float, default=1200)
    ap.add_argument("--request-timeout-s", type=float, default=1200)
    ap.add_argument("--no-write", action="store_true", help="print the results only")
    ap.add_argument("overrides", nargs="*", help="config overrides (default: DEFAULT_OVERRIDES for the config)")
    args = ap.parse_args(argv)
    overrides = args.overrides or DEFAULT_OVERRIDES.get(args.config, [])
    if args.host_cache_mb is None:
        args.host_cache_mb = DEFAULT_HOST_MB.get(args.config, 1024.0)
    rng = np.random.default_rng(args.seed)
    pairs = corpus(args.documents, byte_level=args.config.startswith("tiny"), rng=rng)
    requests = make_requests(pairs, args.requests, rng)
    modes = [run_mode(m, args, overrides, requests) for m in args.modes.split(",")]
    summary = {"config": args.config, "requests": args.requests, "clients": args.clients,
               "documents": args.documents, "max_tokens": args.max_tokens, "overrides": overrides,
               "host_cache_mb": args.host_cache_mb, "modes": modes}
    print(markdown(summary))
    print(json.dumps(summary, indent=2))
    if not args.no_write:
        command = "nice -n 10 python bench/server_load.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_results(summary, command.strip())
    failed = any(m["errors"] or m["mismatches_vs_alone"] for m in modes)
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())

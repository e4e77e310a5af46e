"""Load test of the HTTP server on localhost: Comb, `--mode prefix` and `--mode full` side by side, in one run; stops
by itself.

    nice -n 10 python bench/server_load.py --config tiny_comb [--requests 200 --clients 16 --documents 64 \\
        --scenarios random,fixed --docs-per-request 4-8 --doc-tokens 256-512]

For each mode a server (`serve.py --http`, a subprocess with a fresh PICache store) gets `--requests` streamed chat
requests from `--clients` concurrent clients; each request reads documents as its scenario says and asks one
question, greedy.
Then every request is replayed alone (one at a time) and its answer must equal the concurrent one.
Scenarios (`--scenarios`): the corpus is `--documents` documents of `--doc-tokens` tokens (SQuAD paragraphs from
../shared/data joined up to the length, synthetic text without them) with a Zipf popularity (`--zipf`: rank r
drawn with weight 1 / r^s). `random`: a request reads `--docs-per-request` distinct documents drawn by popularity,
in random order (a prefix cache reuses little). `fixed`: the corpus is split into topics of 8 documents; a
request draws a topic by popularity and reads its first k documents in the topic's order (a prefix cache's best
case).
Reported per mode: requests/s, output tokens/s, client-side TTFT p50/p99, document hit rate per tier (device pool,
host memory, disk; mode prefix: the share of prompt tokens whose KV came from its prefix cache), errors and
mismatches. The default overrides make the pool and host tier smaller than the
corpus, so all three tiers serve hits. Writes bench/results/server_load.json (runs keyed by config, context size
and scenarios), a section of bench/RESULTS.md, and bench/results/server_load_<config>.png (requests/s and TTFT
p50 against context tokens per request, one line per mode and scenario, over every recorded run of the config).
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

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from comb_jax.serving.app import wait_ready  # noqa: E402

SHARED_DATA = ROOT.parent / "shared" / "data" / "squad_v2_dev_cs224n" / "dev-v2.0.json"
RESULTS_JSON = ROOT / "bench" / "results" / "server_load.json"
RESULTS_MD = ROOT / "bench" / "RESULTS.md"
PLOT = ROOT / "bench" / "results" / "server_load_{config}.png"
SECTION = "## HTTP server under load (`bench/server_load.py`)"
TOPIC = 8  # documents per topic in the fixed-order scenario
MODE_COLORS = {"comb": "tab:blue", "prefix": "tab:orange", "full": "tab:green"}  # one colour per mode in the plot
# Contexts of 4-8 documents of 256-512 tokens (up to ~4.6K page-rounded tokens): context buckets to 6144; the pool
# holds about a third of the 64-document corpus, so documents are evicted and come back from the host/disk tiers.
_LOAD = ["serve.prompt_buckets=(64,)", "serve.context_buckets=(2048,4096,6144)", "serve.chunk_buckets=(512,)",
         "serve.max_chunk_tokens=512", "serve.max_context_tokens=6144", "serve.pool_tokens=12288",
         "serve.max_batch=8"]
# SmolLM2 documents are cut by words (~0.75 a token), so their chunk bucket leaves room for a longer tokenization.
_SMOLLM2 = [*_LOAD, "serve.max_new_tokens=8", "serve.chunk_buckets=(768,)", "serve.max_chunk_tokens=768"]
DEFAULT_OVERRIDES = {"smollm2_comb": _SMOLLM2, "smollm2_pointer": _SMOLLM2,
                     "tiny_comb": [*_LOAD, "serve.max_new_tokens=16"]}
DEFAULT_HOST_MB = {"smollm2_comb": 16.0, "smollm2_pointer": 16.0, "tiny_comb": 1.0}


def corpus(n: int, byte_level: bool, lengths: tuple[int, int], rng) -> list[tuple[str, str]]:
    """(document, question about it) pairs, each document `lengths` tokens long (bytes for the toy tokenizer,
    ~0.75 words a token otherwise): SQuAD paragraphs joined up, or synthetic facts without the data."""
    paragraphs = []
    if SHARED_DATA.is_file():
        for article in json.loads(SHARED_DATA.read_text())["data"]:
            for p in article["paragraphs"]:
                if p["qas"]:
                    paragraphs.append((p["context"], p["qas"][0]["question"]))
    if not paragraphs:
        paragraphs = [(f"Item {i} is kept in box {i * 7 % 13} on shelf {i % 5}, next to item {i * 3 % 97}.",
                       f"Where is item {i}?") for i in range(997)]
    order = rng.permutation(len(paragraphs))
    size = (lambda t: len(t.encode())) if byte_level else (lambda t: int(len(t.split()) / 0.75))
    pairs, at = [], 0
    for _ in range(n):
        target = int(rng.integers(lengths[0], lengths[1] + 1))
        text, question = "", paragraphs[order[at % len(order)]][1]
        while size(text) < target:
            text = (text + " " + paragraphs[order[at % len(order)]][0]).strip()
            at += 1
        if byte_level:  # the toy tokenizer: one token per byte
            text = text.encode()[:target].decode(errors="ignore")
            question = question.encode()[:40].decode(errors="ignore")
        else:
            text = " ".join(text.split()[:int(target * 0.75)])
        pairs.append((text, question))
    return pairs


def zipf_weights(n: int, s: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** s
    return w / w.sum()


def make_requests(pairs, count: int, rng, scenario: str, per_request: tuple[int, int], zipf: float) -> list[dict]:
    """`random`: k distinct documents drawn by popularity, in random order. `fixed`: a topic (TOPIC documents)
    drawn by popularity, its first k documents in the topic's order."""
    n = len(pairs)
    ranked = rng.permutation(n)  # document ids by popularity rank
    topics = [list(range(i, min(i + TOPIC, n))) for i in range(0, n, TOPIC)]
    ranked_topics = rng.permutation(len(topics))
    out = []
    for _ in range(count):
        k = int(rng.integers(per_request[0], per_request[1] + 1))
        if scenario == "random":
            picked = [int(ranked[i]) for i in rng.choice(n, k, replace=False, p=zipf_weights(n, zipf))]
        elif scenario == "fixed":
            topic = topics[int(ranked_topics[rng.choice(len(topics), p=zipf_weights(len(topics), zipf))])]
            picked = topic[:k]
        else:
            raise ValueError(f"unknown scenario {scenario!r}")
        out.append({"documents": [pairs[i][0] for i in picked], "question": pairs[picked[0]][1]})
    return out


def span(text: str) -> tuple[int, int]:
    """'4-8' -> (4, 8); '6' -> (6, 6)."""
    lo, _, hi = text.partition("-")
    return int(lo), int(hi or lo)


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


def run_mode(mode: str, args, overrides: list[str], requests: list[dict], scenario: str) -> dict:
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
        listed = httpx.get(f"http://127.0.0.1:{port}/v1/documents", timeout=60).json()["data"] if mode == "comb" \
            else []
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
    prompt_tokens = sum(r["usage"]["prompt_tokens"] for r in ok)
    cached = sum((r["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0) for r in ok)
    return {
        "mode": mode, "scenario": scenario, "requests": len(requests),
        "context_tokens_mean": round(float(np.mean([r["usage"]["document_tokens"] for r in ok])), 1) if ok else None,
        "bytes_per_cached_document": round(float(np.mean([d["bytes"] for d in listed]))) if listed else None,
        "clients": args.clients, "errors": len(errors),
        "error_samples": errors[:5], "mismatches_vs_alone": len(mismatches), "mismatch_samples": mismatches[:5],
        "elapsed_s": round(elapsed, 2), "requests_per_s": round(len(ok) / elapsed, 3),
        "output_tokens_per_s": round(sum(r["usage"]["completion_tokens"] for r in ok) / elapsed, 2),
        "ttft_p50_s": round(float(np.percentile(ttfts, 50)), 4) if ttfts else None,
        "ttft_p99_s": round(float(np.percentile(ttfts, 99)), 4) if ttfts else None,
        "latency_p50_s": round(float(np.percentile([r["latency_s"] for r in ok], 50)), 4) if ok else None,
        "document_lookups": lookups, "document_misses": misses,
        "hit_rate": {t: round(h / lookups, 4) if lookups else None for t, h in hits.items()},
        "prompt_tokens": prompt_tokens, "cached_prompt_tokens": cached,
        "prefix_hit_rate": round(cached / prompt_tokens, 4) if mode == "prefix" and prompt_tokens else None,
        "warmup_s": round(warmup_s, 1),
    }


def markdown(summary: dict) -> str:
    rows = summary["modes"]
    head = ("| scenario | mode | context tokens / request | requests/s | output tokens/s | TTFT p50 (s) | TTFT p99 (s) "
            "| hit rate device / host / disk | MB per cached document | errors | answers != alone |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        rate = " / ".join(f"{r['hit_rate'][t]:.2f}" if r["hit_rate"][t] is not None else "-"
                          for t in ("device", "host", "disk"))
        if r["mode"] == "full":
            rate = "- (documents inlined)"
        elif r["mode"] == "prefix":
            rate = f"{r['prefix_hit_rate']:.2f} of prompt tokens" if r.get("prefix_hit_rate") is not None else "-"
        mb = r.get("bytes_per_cached_document")
        mb = f"{mb / 2**20:.3f}" if mb else "-"
        lines.append(f"| {r.get('scenario', 'random')} | {r['mode']} | {r.get('context_tokens_mean')} | "
                     f"{r['requests_per_s']} | {r['output_tokens_per_s']} | {r['ttft_p50_s']} | "
                     f"{r['ttft_p99_s']} | {rate} | {mb} | {r['errors']} | {r['mismatches_vs_alone']} |")
    return head + "\n".join(lines) + "\n" + ratios(rows)


def ratios(rows: list[dict]) -> str:
    """Per scenario, Comb against the baselines side by side: requests/s comb / full and comb / prefix, and TTFT
    p50 comb / prefix (the issue's targets: >= 3, >= 2 and <= 1/3)."""
    out = []
    for scenario in dict.fromkeys(r.get("scenario", "random") for r in rows):
        by_mode = {r["mode"]: r for r in rows if r.get("scenario", "random") == scenario}
        comb = by_mode.get("comb")
        if comb is None:
            continue
        parts = [f"requests/s comb / {m} = {comb['requests_per_s'] / by_mode[m]['requests_per_s']:.2f}"
                 for m in ("full", "prefix") if m in by_mode and by_mode[m]["requests_per_s"]]
        if "prefix" in by_mode and by_mode["prefix"]["ttft_p50_s"]:
            parts.append(f"TTFT p50 comb / prefix = {comb['ttft_p50_s'] / by_mode['prefix']['ttft_p50_s']:.2f}")
        if parts:
            out.append(f"- {scenario} order: " + "; ".join(parts))
    return ("\n" + "\n".join(out) + "\n") if out else ""


def write_results(summary: dict, command: str):
    RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
    runs = {}
    if RESULTS_JSON.is_file():
        try:
            runs = json.loads(RESULTS_JSON.read_text())
        except ValueError:
            runs = {}
    runs[summary["key"]] = summary
    RESULTS_JSON.write_text(json.dumps(runs, indent=2) + "\n")
    text = RESULTS_MD.read_text() if RESULTS_MD.is_file() else "# Benchmarks\n"
    block = (f"### {summary['key']}: {summary['requests']} requests, {summary['clients']} clients, "
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
    old = re.search(rf"^### {re.escape(summary['key'])}:.*?(?=^### |\Z)", section, re.M | re.S)
    section = (section[:old.start()] + block + "\n" + section[old.end():]) if old else section.rstrip() + "\n\n" + \
        block + "\n"
    RESULTS_MD.write_text(text[:start] + section.rstrip() + "\n" + ("\n" + text[end:] if nxt else ""))
    plot(runs, summary["config"])


def plot(runs: dict, config: str):
    """requests/s and TTFT p50 against context tokens per request, one line per (scenario, mode), over every
    recorded run of `config`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for summary in runs.values():
        if summary.get("config") != config:
            continue
        for r in summary["modes"]:
            if r.get("context_tokens_mean") is not None:
                lines.setdefault((r.get("scenario", "random"), r["mode"]), []).append(
                    (r["context_tokens_mean"], r["requests_per_s"], r["ttft_p50_s"]))
    if not lines:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (scenario, mode), points in sorted(lines.items()):
        points.sort()
        x = [p[0] for p in points]
        style = dict(color=MODE_COLORS.get(mode), linestyle="-" if scenario == "random" else "--",
                     marker="o" if scenario == "random" else "s", label=f"{mode} ({scenario} order)")
        axes[0].plot(x, [p[1] for p in points], **style)
        axes[1].plot(x, [p[2] for p in points], **style)
    axes[0].set(xlabel="context tokens per request", ylabel="requests/s", title=f"{config}: throughput")
    axes[1].set(xlabel="context tokens per request", ylabel="TTFT p50 (s)", title=f"{config}: time to first token")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(str(PLOT).format(config=config), dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="smollm2_comb")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--documents", type=int, default=64)
    ap.add_argument("--doc-tokens", default="256-512", help="tokens per document: LO-HI")
    ap.add_argument("--docs-per-request", default="4-8", help="documents per request: LO-HI")
    ap.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of document (topic) popularity")
    ap.add_argument("--scenarios", default="random,fixed")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--modes", default="comb,prefix,full")
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
    pairs = corpus(args.documents, args.config.startswith("tiny"), span(args.doc_tokens), rng)
    modes = []
    for scenario in args.scenarios.split(","):
        requests = make_requests(pairs, args.requests, np.random.default_rng([args.seed, len(modes)]), scenario,
                                 span(args.docs_per_request), args.zipf)
        modes += [run_mode(m, args, overrides, requests, scenario) for m in args.modes.split(",")]
    key = f"{args.config}, {args.docs_per_request} documents of {args.doc_tokens} tokens, {args.scenarios} order"
    summary = {"key": key, "config": args.config, "requests": args.requests, "clients": args.clients,
               "documents": args.documents, "doc_tokens": args.doc_tokens, "docs_per_request": args.docs_per_request,
               "zipf": args.zipf, "max_tokens": args.max_tokens, "overrides": overrides,
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

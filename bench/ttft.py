"""Time to first token on a PICache hit vs full prefill, decode throughput, and cache bytes per context token.

    python bench/ttft.py [--config smollm2_comb] [--contexts 512 1024 2048 4096] [--batches 1 8 32]
                         [--repeats 3] [--out bench/results/ttft_cpu.json] [key=value overrides]

Random weights (no GGUF needed). Each context is 4 chunks of context/4 tokens plus a 30-token question.
Hit: the chunks are already in the pool (one warm-up run encodes them and compiles), so TTFT = lookup +
page gather + prompt prefill. Full: the same engine in mode full prefills chunks + question. Both are
measured by the engine on a batch of one, after a warm-up run of the same shape (no compile time).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from comb_jax.config import apply_overrides, load_config
from comb_jax.model.layout import init_params, model_layout
from comb_jax.serving.engine import Engine, Request

QUESTION_TOKENS = 30


def engine_for(cfg, params, mode, batch, max_new_tokens, contexts):
    top = max(contexts)
    overrides = [f"serve.max_batch={batch}", f"serve.max_new_tokens={max_new_tokens}", "serve.prompt_buckets=(32,)",
                 f"serve.context_buckets={tuple(contexts)}", f"serve.max_context_tokens={top}",
                 f"serve.chunk_buckets={tuple(sorted({c // 4 for c in contexts}))}",
                 f"serve.max_chunk_tokens={top // 4}", f"serve.pool_tokens={2 * top * 4}"]
    return Engine(apply_overrides(cfg, overrides), params, stop_ids=(), mode=mode)


def timed_ttft(engine, request, repeats):
    engine.run([request])  # compile + (comb) encode the chunks into the pool
    out = []
    for i in range(repeats):
        request.id = f"{request.id.split('#')[0]}#{i}"
        res = engine.run([request])[0]
        assert res.error is None, res.error
        out.append(res.ttft_s)
    return statistics.median(out), res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="smollm2_comb")
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/results/ttft_cpu.json")
    ap.add_argument("overrides", nargs="*", help="config key=value overrides (e.g. param_dtype=bfloat16 on a GPU)")
    args = ap.parse_args(argv)

    cfg = load_config(args.config, ["weights.source=random", *args.overrides])
    m = cfg.model
    params = init_params(model_layout(m), jax.random.key(0), jnp.dtype(cfg.param_dtype))
    rng = np.random.default_rng(0)
    question = rng.integers(3, m.vocab_size, QUESTION_TOKENS).tolist()
    device = jax.devices()[0].device_kind

    comb = engine_for(cfg, params, "comb", 1, 1, args.contexts)
    full = engine_for(cfg, params, "full", 1, 1, args.contexts)
    ttft_rows = []
    for ctx in args.contexts:
        chunks = [rng.integers(3, m.vocab_size, ctx // 4).tolist() for _ in range(4)]
        hit, res = timed_ttft(comb, Request(f"hit{ctx}", question, chunks, 1), args.repeats)
        assert res.chunk_hits == 4 and res.chunk_misses == 0
        whole = [t for c in chunks for t in c] + question
        full_s, _ = timed_ttft(full, Request(f"full{ctx}", whole, [], 1), args.repeats)
        ttft_rows.append({"context_tokens": ctx, "ttft_hit_s": hit, "ttft_full_s": full_s,
                          "hit_to_full": hit / full_s})
        print(f"context {ctx:5d}: TTFT hit {hit * 1e3:9.1f} ms   full {full_s * 1e3:9.1f} ms   "
              f"ratio {hit / full_s:.3f}", file=sys.stderr, flush=True)

    decode_rows = []
    for batch in args.batches:
        eng = engine_for(cfg, params, "comb", batch, args.decode_tokens, args.contexts)
        reqs = [Request(f"d{batch}-{i}", question, [], args.decode_tokens) for i in range(batch)]
        eng.run(reqs)  # compile
        for r in reqs:
            r.id += "#"
        start = time.perf_counter()
        results = eng.run(reqs)
        total = time.perf_counter() - start
        decode_s = total - results[0].ttft_s
        new_tokens = sum(len(r.tokens) - 1 for r in results)  # the first token comes from prefill
        decode_rows.append({"batch": batch, "decode_tokens_per_s": new_tokens / decode_s, "wall_s": total})
        print(f"batch {batch:3d}: decode {new_tokens / decode_s:9.1f} tokens/s", file=sys.stderr, flush=True)

    itemsize = np.dtype(cfg.compute_dtype).itemsize
    picache = 2 * m.num_cross_layers * m.num_kv_heads * m.head_dim * itemsize
    backbone = 2 * m.num_layers * m.num_kv_heads * m.head_dim * itemsize
    memory = {"picache_bytes_per_token": picache, "backbone_kv_bytes_per_token": backbone,
              "ratio": picache / backbone, "dtype": cfg.compute_dtype}

    print(f"\n{cfg.name} (random weights) on {device}, {cfg.compute_dtype}")
    print("| context | TTFT hit (ms) | TTFT full (ms) | hit / full |")
    print("|---:|---:|---:|---:|")
    for r in ttft_rows:
        print(f"| {r['context_tokens']} | {r['ttft_hit_s'] * 1e3:.1f} | {r['ttft_full_s'] * 1e3:.1f} | "
              f"{r['hit_to_full']:.3f} |")
    print("\n| batch | decode tokens/s |\n|---:|---:|")
    for r in decode_rows:
        print(f"| {r['batch']} | {r['decode_tokens_per_s']:.1f} |")
    print(f"\nPICache {picache} B/token vs backbone KV {backbone} B/token: {picache / backbone:.3f}x")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": cfg.name, "device": device, "question_tokens": QUESTION_TOKENS,
                               "repeats": args.repeats, "ttft": ttft_rows, "decode": decode_rows,
                               "memory": memory}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

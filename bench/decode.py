"""Decode throughput, Comb against the full prompt, side by side, with the bytes each decode step reads per token.

    python bench/decode.py [--config smollm2_comb] [--contexts 1024 4096] [--batches 1 8 32] [--steps 16]
                           [--question-tokens 32] [--repeats 2] [--out bench/results/decode_cpu.json]

Random weights, one process. For each batch size and context length, `decode.decode_loop` (the serving engine's
decode loop) generates `--steps` tokens per request, after a prompt of `--question-tokens` tokens:
- comb: the context (`C` tokens per request) is a CrossContext the E cross blocks read; the decoder's own KV cache
  holds only the question and the generated tokens;
- full: the same backbone with the context in its KV cache (C + question tokens already written), no cross blocks.
The caches are filled directly (zeros; decode speed does not depend on the values), so no prefill is run or timed.

Bytes read per generated token by one decode step (the explanation of the ratio; decode is memory-bound):
  weights / batch  +  full: N layers x 2 (K, V) x slots x K x D x itemsize
                      comb: N x 2 x slots_self x K x D x itemsize  +  E x 2 x C x K x D x itemsize
where slots are the cache slots the step reads (the loop reads its whole static cache, masked), and the weights are
the backbone's decoder + LM head (+ the cross blocks for comb). The paper reports ~3x Comb throughput at high batch.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from comb_jax.config import load_config
from comb_jax.model.decode import DecodeState, decode_loop
from comb_jax.model.layout import init_params, model_layout
from comb_jax.model.transformer import CrossContext, KVCache


def tree_bytes(tree, dtype) -> int:
    return sum(a.size for a in jax.tree.leaves(tree)) * jnp.dtype(dtype).itemsize


def step_bytes_per_token(cfg, params, mode: str, batch: int, context: int, slots: int, dtype) -> dict:
    """Bytes one decode step reads per generated token: weights shared by the batch + this request's caches."""
    m = cfg.model
    itemsize = jnp.dtype(dtype).itemsize
    backbone = {k: v for k, v in params["backbone"].items() if k not in ("embed", "encoder_embed")}
    head = params["backbone"].get("lm_head", params["backbone"]["embed"])  # the LM head reads the whole matrix
    weights = tree_bytes(backbone, dtype) + tree_bytes(head, dtype)
    per_slot = 2 * m.num_kv_heads * m.head_dim * itemsize  # K and V of one token in one layer
    kv = m.num_layers * slots * per_slot
    cross = 0
    if mode == "comb":
        weights += tree_bytes(params["comb"]["cross"], dtype)
        cross = m.num_cross_layers * context * per_slot
    return {"weights_per_token": weights / batch, "self_kv": kv, "cross_context": cross,
            "total": weights / batch + kv + cross}


def make_state(cfg, mode: str, batch: int, context: int, question: int, steps: int, dtype):
    """(DecodeState after the prompt, CrossContext or None, cache slots): caches of zeros, lengths as if prefilled."""
    m = cfg.model
    written = question + (context if mode == "full" else 0)
    slots = written + steps
    shape = (m.num_layers, batch, slots, m.num_kv_heads, m.head_dim)
    cache = KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.full((batch,), written, jnp.int32))
    last = jnp.asarray(np.random.default_rng(0).integers(3, m.vocab_size, batch), jnp.int32)
    state = DecodeState(cache, last, jnp.zeros((batch, steps + 1), jnp.int32), jnp.ones((batch,), jnp.int32),
                        jnp.zeros((batch,), bool), jax.random.key(0))
    ctx = None
    if mode == "comb":
        ctx_shape = (m.num_cross_layers, batch, context, m.num_kv_heads, m.head_dim)
        ctx = CrossContext(jnp.zeros(ctx_shape, dtype), jnp.zeros(ctx_shape, dtype), jnp.ones((batch, context), bool))
    return state, ctx, slots


def run_mode(cfg, params, mode, batch, context, question, steps, repeats, dtype) -> dict:
    b = batch
    static = dict(cfg=cfg.model, stop_ids=(), dtype=dtype)
    budget = (jnp.full((b,), steps + 1, jnp.int32), jnp.zeros((b,), jnp.float32), jnp.ones((b,), jnp.float32))
    state, ctx, slots = make_state(cfg, mode, b, context, question, steps, dtype)
    start = time.perf_counter()
    compiled = decode_loop.lower(params, state, ctx, *budget, **static).compile()
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(repeats + 1):  # the first run warms up
        state, ctx, _ = make_state(cfg, mode, b, context, question, steps, dtype)
        jax.block_until_ready((state, ctx))
        start = time.perf_counter()
        out = compiled(params, state, ctx, *budget)
        out.tokens.block_until_ready()
        times.append(time.perf_counter() - start)
        generated = int(np.asarray(out.num_generated).sum()) - b  # the first token came from the prompt
        del state, ctx, out
        gc.collect()
    seconds = statistics.median(times[1:])
    return {"mode": mode, "batch": b, "context_tokens": context, "steps": steps, "decode_s": seconds,
            "tokens_per_s": generated / seconds, "compile_s": round(compile_s, 1), "times_s": times[1:],
            "cache_slots": slots,
            "bytes_per_token": step_bytes_per_token(cfg, params, mode, b, context, slots, dtype)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="smollm2_comb")
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--question-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="bench/results/decode_cpu.json")
    ap.add_argument("overrides", nargs="*", help="config key=value overrides (e.g. compute_dtype=bfloat16)")
    args = ap.parse_args(argv)

    cfg = load_config(args.config, ["weights.source=random", *args.overrides])
    dtype = jnp.dtype(cfg.compute_dtype)
    params = init_params(model_layout(cfg.model), jax.random.key(0), dtype)
    params = {"backbone": params["backbone"], "comb": {"cross": params["comb"]["cross"]}}  # what decoding reads
    device = jax.devices()[0].device_kind
    rows = []
    for context in args.contexts:
        for batch in args.batches:
            pair = {}
            for mode in ("comb", "full"):
                pair[mode] = run_mode(cfg, params, mode, batch, context, args.question_tokens, args.steps,
                                      args.repeats, dtype)
            ratio = pair["comb"]["tokens_per_s"] / pair["full"]["tokens_per_s"]
            read_ratio = pair["full"]["bytes_per_token"]["total"] / pair["comb"]["bytes_per_token"]["total"]
            rows.append({"batch": batch, "context_tokens": context, "comb": pair["comb"], "full": pair["full"],
                         "speedup": ratio, "bytes_ratio": read_ratio})
            print(f"context {context:5d} batch {batch:3d}: comb {pair['comb']['tokens_per_s']:8.1f} tok/s  "
                  f"full {pair['full']['tokens_per_s']:8.1f} tok/s  speedup {ratio:.2f}x  "
                  f"(bytes/token full/comb {read_ratio:.2f}x)", file=sys.stderr, flush=True)

    mib = 2 ** 20
    print(f"\n{cfg.name} (random weights) on {device}, {cfg.compute_dtype}, {args.steps} decode steps after a "
          f"{args.question_tokens}-token question")
    print("| context | batch | Comb tokens/s | full tokens/s | Comb / full | MiB read per token: Comb "
          "(weights + self KV + cross) | full (weights + KV) | full / Comb bytes |")
    print("|---:|---:|---:|---:|---:|---|---|---:|")
    for r in rows:
        c, f = r["comb"]["bytes_per_token"], r["full"]["bytes_per_token"]
        print(f"| {r['context_tokens']} | {r['batch']} | {r['comb']['tokens_per_s']:.1f} | "
              f"{r['full']['tokens_per_s']:.1f} | {r['speedup']:.2f}x | {c['total'] / mib:.1f} "
              f"({c['weights_per_token'] / mib:.1f} + {c['self_kv'] / mib:.1f} + {c['cross_context'] / mib:.1f}) | "
              f"{f['total'] / mib:.1f} ({f['weights_per_token'] / mib:.1f} + {f['self_kv'] / mib:.1f}) | "
              f"{r['bytes_ratio']:.2f}x |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": cfg.name, "device": device, "compute_dtype": cfg.compute_dtype,
                               "steps": args.steps, "question_tokens": args.question_tokens, "repeats": args.repeats,
                               "rows": rows, "command": "python bench/decode.py " + " ".join(
                                   sys.argv[1:] if argv is None else argv)}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

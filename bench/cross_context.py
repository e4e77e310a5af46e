"""One decode step reading a raw PICache (k_norm + cast inside the step) vs a CrossContext prepared once.

    python bench/cross_context.py [--config smollm2_comb] [--batch 8] [--contexts 1024 4096] [--repeats 20]

The decode loop used to renormalise every cross block's keys over the whole context at each generated token;
it now calls `model.cross_context` once per batch. Both variants run the same jitted single-token `forward`
(random weights, a KV cache of 64 prompt tokens), interleaved in one process, so the ratio is fair on a loaded
machine. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from comb_jax.config import load_config
from comb_jax.model.layout import init_params, model_layout
from comb_jax.model.transformer import PICache, cross_context, forward, init_kv_cache


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="smollm2_comb")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default="bench/results/cross_context_cpu.json")
    args = p.parse_args()

    cfg = load_config(args.config, ["weights.source=random"])
    m, dtype = cfg.model, jnp.dtype(cfg.compute_dtype)
    params = init_params(model_layout(m), jax.random.key(0), dtype)
    b, prompt = args.batch, 64
    cache = init_kv_cache(m, b, prompt + 8, dtype)._replace(lengths=jnp.full((b,), prompt, jnp.int32))
    token = jnp.ones((b, 1), jnp.int32)

    @jax.jit
    def step(params, ctx, cache):
        hidden, _ = forward(params, token, m, ctx, cache, dtype=dtype)
        return hidden

    rows = []
    for c in args.contexts:
        shape = (m.num_cross_layers, b, c, m.num_kv_heads, m.head_dim)
        keys = jax.random.split(jax.random.key(c), 2)
        raw = PICache(jax.random.normal(keys[0], shape, dtype), jax.random.normal(keys[1], shape, dtype),
                      jnp.ones((b, c), bool))
        ready = jax.jit(lambda p, x: cross_context(p, x, m, dtype))(params, raw)
        np.testing.assert_allclose(np.asarray(step(params, raw, cache)), np.asarray(step(params, ready, cache)),
                                   rtol=1e-5, atol=1e-5)
        times = {"picache": [], "cross_context": []}
        for _ in range(args.repeats):
            for name, ctx in (("picache", raw), ("cross_context", ready)):
                t0 = time.perf_counter()
                step(params, ctx, cache).block_until_ready()
                times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"context_tokens": c, "batch": b, "step_s_picache": med["picache"],
                     "step_s_cross_context": med["cross_context"], "ratio": med["cross_context"] / med["picache"]})

    print(f"{'context':>8} {'batch':>6} {'raw PICache s':>14} {'CrossContext s':>15} {'ratio':>7}")
    for r in rows:
        print(f"{r['context_tokens']:>8} {r['batch']:>6} {r['step_s_picache']:14.4f} {r['step_s_cross_context']:15.4f}"
              f" {r['ratio']:7.3f}")
    with open(args.out, "w") as f:
        json.dump({"config": args.config, "device": jax.devices()[0].device_kind, "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Full prefill with each attention implementation side by side: time and the scratch memory XLA plans for it.

    python bench/attention.py [--config smollm2_comb] [--tokens 4096] [--impls einsum xla] [--repeats 2]
                              [--out bench/results/attention_cpu.json]

Random weights. One request of `--tokens` prompt tokens prefilled into an empty KV cache with `decode.prefill`
(the full-prompt baseline's prefill, no PICache), once per `model.attention_impl`, in one process. "einsum" is the
reference (it materialises float32 [heads, tokens, tokens] scores per layer); "xla" and "cudnn" go through
jax.nn.dot_product_attention (cudnn: flash attention, GPU and bfloat16 only). temp_bytes is XLA's planned scratch
memory of the compiled prefill (`memory_analysis().temp_size_in_bytes`): where the score matrices show up.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from comb_jax.config import load_config
from comb_jax.model.decode import prefill
from comb_jax.model.layout import init_params, model_layout


def compile_prefill(cfg, params, tokens: int, impl: str, dtype):
    """(compiled prefill of one `tokens`-token prompt with `impl` attention, its args, compile seconds)."""
    model = dataclasses.replace(cfg.model, attention_impl=impl)
    prompt = jnp.asarray(np.random.default_rng(0).integers(3, model.vocab_size, (1, tokens)), jnp.int32)
    args = (params, prompt, jnp.asarray([tokens], jnp.int32), None, jax.random.key(0), jnp.zeros((1,)), jnp.ones((1,)))
    static = dict(cfg=model, slots=tokens + 1, max_new_tokens=1, stop_ids=(), dtype=dtype)
    start = time.perf_counter()
    compiled = prefill.lower(*args, **static).compile()
    return compiled, args, time.perf_counter() - start


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="smollm2_comb")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--impls", nargs="+", default=["einsum", "xla"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="bench/results/attention_cpu.json")
    ap.add_argument("overrides", nargs="*", help="config key=value overrides (e.g. compute_dtype=bfloat16)")
    args = ap.parse_args(argv)

    cfg = load_config(args.config, ["weights.source=random", *args.overrides])
    dtype = jnp.dtype(cfg.compute_dtype)
    params = init_params(model_layout(cfg.model), jax.random.key(0), jnp.dtype(cfg.param_dtype))
    device = jax.devices()[0].device_kind
    compiled = {impl: compile_prefill(cfg, params, args.tokens, impl, dtype) for impl in args.impls}
    times = {impl: [] for impl in args.impls}
    first = {impl: int(fn(*fn_args).last_token[0]) for impl, (fn, fn_args, _) in compiled.items()}  # warm-up run
    for _ in range(args.repeats):  # interleaved, so that load on the machine hits every impl alike
        for impl, (fn, fn_args, _) in compiled.items():
            start = time.perf_counter()
            fn(*fn_args).last_token.block_until_ready()
            times[impl].append(time.perf_counter() - start)
    rows = []
    for impl, (fn, _, compile_s) in compiled.items():
        seconds = statistics.median(times[impl])
        rows.append({"impl": impl, "tokens": args.tokens, "prefill_s": seconds, "tokens_per_s": args.tokens / seconds,
                     "temp_bytes": fn.memory_analysis().temp_size_in_bytes, "compile_s": round(compile_s, 1),
                     "times_s": times[impl], "first_token": first[impl]})
    base = rows[0]
    print(f"\n{cfg.name} (random weights) on {device}, {cfg.compute_dtype}, full prefill of {args.tokens} tokens")
    print(f"| attention | prefill (s) | tokens/s | speed vs {base['impl']} | XLA scratch (MiB) | first token |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['impl']} | {r['prefill_s']:.2f} | {r['tokens_per_s']:.0f} | "
              f"{base['prefill_s'] / r['prefill_s']:.2f}x | {r['temp_bytes'] / 2**20:.0f} | {r['first_token']} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": cfg.name, "device": device, "compute_dtype": cfg.compute_dtype,
                               "tokens": args.tokens, "repeats": args.repeats, "rows": rows,
                               "command": "python bench/attention.py " + " ".join(sys.argv[1:] if argv is None
                                                                                 else argv)}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Train-step throughput (tokens/s, and MFU where the device's peak FLOP/s is known) on random weights.

    python bench/train_throughput.py [--configs tiny_comb smollm2_comb] [--steps 5] [--batch 4] [--out FILE]
    python bench/train_throughput.py --configs smollm2_pointer --variants E1:model.num_cross_layers=1 \
        E2:model.num_cross_layers=2 E3:model.num_cross_layers=3 --batch 8      # Comb layouts side by side
    python bench/train_throughput.py --configs smollm2_pointer --batch 8 --stages --answer-tokens 8 ...
        # the same step three ways: every position through the LM head and every frozen layer in the step (before),
        # the LM head on answer positions only, and that with the frozen features read from the cache

Tokens per step count every chunk and decoder position of the fixed-shape batch (n chunks x chunk_len +
decoder_len per row); FLOPs per step come from XLA's cost analysis of the compiled step.
"""

import argparse
import json
import time
from functools import partial

import jax
import numpy as np

from comb_jax.config import load_config
from comb_jax.model.layout import count_params, init_params, model_layout
from comb_jax.model.sharding import make_mesh
from comb_jax.training import trainer as T
from comb_jax.training.data import answer_positions
from comb_jax.training.frozen_cache import frozen_features

STAGES = ("every position", "answer positions", "answer positions + frozen cache")


def synthetic_batch(batch, chunks, chunk_len, decoder_len, vocab, seed=0, answer_tokens=0):
    """Random ids; answer tokens: the second half of the decoder row, or `answer_tokens` of them after its first
    half (a short gold answer)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((batch, decoder_len), np.float32)
    mask[:, decoder_len // 2: decoder_len // 2 + answer_tokens if answer_tokens else None] = 1.0
    return {"chunk_tokens": rng.integers(1, vocab, (batch, chunks, chunk_len), dtype=np.int32),
            "chunk_mask": np.ones((batch, chunks, chunk_len), bool),
            "tokens": rng.integers(1, vocab, (batch, decoder_len), dtype=np.int32),
            "targets": rng.integers(1, vocab, (batch, decoder_len), dtype=np.int32), "loss_mask": mask}


def bench(name, steps, batch_size, overrides, variant="", stage=None, answer_tokens=0):
    cfg = load_config(name, ["weights.source=random", f"batch_size={batch_size}", *overrides])
    mesh = make_mesh(cfg.mesh)
    tc = cfg.train
    lc, td = tc.chunk_buckets[min(1, len(tc.chunk_buckets) - 1)], tc.decoder_buckets[-1]
    batch = synthetic_batch(tc.batch_size, 1 + tc.num_distractors, lc, td, cfg.model.vocab_size,
                            answer_tokens=answer_tokens)
    params = init_params(model_layout(cfg.model), jax.random.key(0))
    frozen_s = None
    if stage in STAGES[1:]:
        batch["answer_positions"] = answer_positions(batch["loss_mask"])
    if stage == STAGES[2]:  # a warm cache: the features are in the batch (what FrozenCache.fill adds on a hit)
        compute = jax.jit(partial(frozen_features, cfg=cfg))
        features = jax.block_until_ready(compute(params["backbone"], batch))  # compile
        t0 = time.perf_counter()
        features = jax.block_until_ready(compute(params["backbone"], batch))
        frozen_s = time.perf_counter() - t0  # what a miss adds to its step (once per row)
        batch.update(jax.device_get(features))
        variant = variant or "cached"
    optimizer = T.make_optimizer(tc)
    state = T.init_state(cfg, mesh, optimizer, params["comb"])
    backbone = T.place_backbone(cfg, mesh, params["backbone"])
    step = T.make_train_step(cfg, mesh, optimizer, batch)
    t0 = time.perf_counter()
    compiled = step.lower(state, backbone, batch).compile()
    compile_s = time.perf_counter() - t0
    state, m = step(state, backbone, batch)  # warm-up
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = step(state, backbone, batch)
    jax.block_until_ready(m)
    seconds = (time.perf_counter() - t0) / steps
    tokens = batch["chunk_tokens"].size + batch["tokens"].size
    flops = T.step_flops(compiled)
    peak = T.peak_flops(jax.devices()[0])
    return {"config": name + (f"[{variant}]" if variant else ""), "overrides": list(overrides), "stage": stage,
            "answer_tokens_per_row": int(batch["loss_mask"][0].sum()), "frozen_features_s": frozen_s,
            "cross_layers": list(cfg.model.cross_layers), "device": jax.devices()[0].device_kind, "devices": mesh.size,
            "batch": {k: list(v.shape) for k, v in batch.items() if k in ("chunk_tokens", "tokens")},
            "compute_dtype": cfg.compute_dtype, "trainable_params": count_params(params["comb"]),
            "compile_s": round(compile_s, 1), "step_s": seconds, "tokens_per_s": tokens / seconds,
            "flops_per_step": flops, "tflops_per_s": flops / seconds / 1e12 if flops else None,
            "mfu": flops / seconds / (peak * mesh.size) if flops and peak else None}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["tiny_comb", "smollm2_comb"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--out", default="bench/results/train_throughput_cpu.json")
    p.add_argument("--variants", nargs="*", default=[""],
                   help="NAME:key=value,key=value: each config once per variant with those overrides (layouts)")
    p.add_argument("--stages", action="store_true", help=f"each config and variant three ways: {', '.join(STAGES)}")
    p.add_argument("--answer-tokens", type=int, default=0, help="answer tokens per row (0: half the decoder row)")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every config (e.g. compute_dtype=bfloat16)")
    args = p.parse_args()
    rows = []
    for name in args.configs:
        for variant in args.variants:
            label, _, extra = variant.partition(":")
            for stage in STAGES if args.stages else (None,):
                rows.append(bench(name, args.steps, args.batch, [*args.overrides, *filter(None, extra.split(","))],
                                  label, stage, args.answer_tokens))
    print(f"{'config':22} {'stage':32} {'trainable':>11} {'step s':>8} {'ratio':>6} {'tokens/s':>10} "
          f"{'TFLOP/step':>10} {'features s':>10}")
    for r in rows:
        tf = f"{r['flops_per_step'] / 1e12:.3f}" if r["flops_per_step"] else "-"
        feat = f"{r['frozen_features_s']:.3f}" if r["frozen_features_s"] else "-"
        print(f"{r['config']:22} {r['stage'] or '-':32} {r['trainable_params']:11,} {r['step_s']:8.3f} "
              f"{rows[0]['step_s'] / r['step_s']:5.2f}x {r['tokens_per_s']:10.0f} {tf:>10} {feat:>10}")
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

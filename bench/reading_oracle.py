"""Zero-training oracle: how much can the cross blocks read if the PICache were the backbone's own K/V?

    python bench/reading_oracle.py --needles runs/needles_dev.jsonl --limit 48 [--cross-layers 6]

For every chunk, the frozen backbone runs on the chunk alone (positions 0..L-1, causal) and its pre-RoPE keys and
values at each layer c_k become the PICache; cross block k takes layer c_k's attention norm, q and o projections,
and q_norm / k_norm weights that keep the backbone's logit scale (the RMS of its queries and keys). The MLP gates
stay 0. The teacher-forced NLL of the needle answers is measured with no context, the full prompt, and this oracle
at a few attention-gate values (tanh(gate)); `gap_closed = (none - oracle) / (none - full)`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from comb_jax.config import load_config  # noqa: E402
from comb_jax.model.layout import init_params, model_layout  # noqa: E402
from comb_jax.model.transformer import PICache, apply_rope, block, forward, lm_logits, rms_norm, rope_tables  # noqa: E402,F401
from comb_jax.text.codec import make_codec  # noqa: E402
from comb_jax.training import data  # noqa: E402
from comb_jax.weights.resolve import load_backbone  # noqa: E402


def backbone_kv(backbone, tokens, mask, cfg, layers):
    """Pre-RoPE K and V of the backbone at `layers` for chunks [B, L] -> k, v [E, B, L, K, D] (causal, pos 0..)."""
    b, length = tokens.shape
    x = backbone["embed"][tokens]
    cos, sin = rope_tables(cfg, jnp.broadcast_to(jnp.arange(length), (b, length)))
    causal = jnp.tril(jnp.ones((length, length), bool))[None] & mask[:, None, :]
    ks, vs = [], []
    for i in range(cfg.num_layers):
        p = jax.tree.map(lambda a, i=i: a[i], backbone["layers"])
        if i in layers:
            h = rms_norm(x, p["attn_norm"], cfg.rms_eps)
            ks.append(jnp.einsum("bte,ekd->btkd", h, p["wk"]))
            vs.append(jnp.einsum("bte,ekd->btkd", h, p["wv"]))
        x, _ = block(x, p, cfg, cos, sin, causal)
    return jnp.stack(ks), jnp.stack(vs)


def oracle_cross(backbone, comb_cross, cfg, k_rms, q_rms, gate):
    layers = np.asarray(cfg.cross_layers)
    src = jax.tree.map(lambda a: jnp.asarray(a)[layers], backbone["layers"])
    scale = jnp.sqrt(q_rms * k_rms)[:, None] * jnp.ones((1, cfg.head_dim))
    return dict(comb_cross, attn_norm=src["attn_norm"], wq=src["wq"], wo=src["wo"], q_norm=scale, k_norm=scale,
                gate_attn=jnp.full_like(comb_cross["gate_attn"], np.arctanh(gate)),
                gate_mlp=jnp.zeros_like(comb_cross["gate_mlp"]))


def answer_nll(params, prompt, answer, cfg, picache=None):
    seq = prompt + answer
    tokens = jnp.asarray([seq[:-1]])
    hidden, _ = forward(params, tokens, cfg, picache)
    logp = jax.nn.log_softmax(lm_logits(params, hidden)[0], -1)
    pos = np.arange(len(prompt) - 1, len(seq) - 1)
    return float(-jnp.mean(logp[pos, np.asarray(seq[1:])[pos - 0]]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--needles", default="runs/needles_dev.jsonl")
    ap.add_argument("--limit", type=int, default=48)
    ap.add_argument("--cross-layers", type=int, default=6)
    ap.add_argument("--gates", default="0.25,0.5,0.75,1.0")
    ap.add_argument("--out", default="")
    ap.add_argument("--drop-first", type=int, default=0, help="mask each chunk's first N tokens (attention sinks)")
    args = ap.parse_args()
    cfg = load_config("smollm2_comb", [f"model.num_cross_layers={args.cross_layers}"])
    m = cfg.model
    backbone = jax.tree.map(jnp.asarray, load_backbone(cfg))
    codec = make_codec(cfg)
    comb = init_params(model_layout(m)["comb"], jax.random.key(0))
    examples = data.jsonl_examples(args.needles)[: args.limit]
    layers = list(m.cross_layers)
    kv_fn = jax.jit(lambda t, mk: backbone_kv(backbone, t, mk, m, layers))

    caches, stats = [], []
    for e in examples:
        ids = [codec.encode(c) for c in e.chunks]
        width = -(-max(map(len, ids)) // 64) * 64
        tok = np.zeros((len(ids), width), np.int32)
        mk = np.zeros((len(ids), width), bool)
        for i, c in enumerate(ids):
            tok[i, :len(c)], mk[i, :len(c)] = c, True
        k, v = kv_fn(jnp.asarray(tok), jnp.asarray(mk))
        e_, n, length, kh, d = k.shape
        k = k.reshape(e_, 1, n * length, kh, d)
        v = v.reshape(e_, 1, n * length, kh, d)
        keep = mk.copy()
        keep[:, :args.drop_first] = False
        caches.append(PICache(k, v, jnp.asarray(keep.reshape(1, -1))))
        valid = mk.reshape(-1)
        stats.append(np.sqrt(np.mean(np.asarray(k[:, 0, valid]) ** 2, axis=(1, 2, 3))))
    k_rms = jnp.asarray(np.mean(stats, 0))
    # query RMS per cross layer, measured on the prompts of the first examples
    q_rms = []
    for li in layers:
        p = jax.tree.map(lambda a, li=li: a[li], backbone["layers"])
        vals = []
        for e in examples[:8]:
            tokens = jnp.asarray([codec.prompt_ids(e.question)])
            x = backbone["embed"][tokens]
            cos, sin = rope_tables(m, jnp.arange(tokens.shape[1])[None])
            causal = jnp.tril(jnp.ones((tokens.shape[1],) * 2, bool))[None]
            for i in range(li):
                x, _ = block(x, jax.tree.map(lambda a, i=i: a[i], backbone["layers"]), m, cos, sin, causal)
            q = jnp.einsum("bte,ehd->bthd", rms_norm(x, p["attn_norm"], m.rms_eps), p["wq"])
            vals.append(float(jnp.sqrt(jnp.mean(q ** 2))))
        q_rms.append(np.mean(vals))
    q_rms = jnp.asarray(q_rms)

    fwd = jax.jit(lambda p, t, c: forward(p, t, m, c)[0])
    none_fn = jax.jit(lambda p, t: forward(p, t, m)[0])

    def nll(params, prompt, answer, cache):
        seq = prompt + answer
        width = -(-(len(seq) - 1) // 32) * 32
        t = np.zeros((1, width), np.int32)
        t[0, :len(seq) - 1] = seq[:-1]
        hidden = none_fn(params, jnp.asarray(t)) if cache is None else fwd(params, jnp.asarray(t), cache)
        logp = jax.nn.log_softmax(lm_logits(params, hidden)[0], -1)
        pos = np.arange(len(prompt) - 1, len(seq) - 1)
        return float(-np.mean(np.asarray(logp)[pos, np.asarray(seq)[pos + 1]]))

    base = {"backbone": backbone, "comb": comb}
    rows = {"none": [], "full": []}
    gates = [float(g) for g in args.gates.split(",")]
    for g in gates:
        rows[f"oracle_{g}"] = []
    oracle_params = {g: {"backbone": backbone, "comb": dict(comb, cross=oracle_cross(backbone, comb["cross"], m,
                                                                                     k_rms, q_rms, g))}
                     for g in gates}
    for e, cache in zip(examples, caches):
        answer = codec.answer_ids(e.answer)
        prompt = codec.prompt_ids(e.question)
        rows["none"].append(nll(base, prompt, answer, None))
        rows["full"].append(nll(base, codec.teacher_prompt_ids(e.chunks, e.question), answer, None))
        for g in gates:
            rows[f"oracle_{g}"].append(nll(oracle_params[g], prompt, answer, cache))
    means = {k: float(np.mean(v)) for k, v in rows.items()}
    result = {"cross_layers": layers, "examples": len(examples), "nll": means,
              "gap_closed": {k: (means["none"] - v) / (means["none"] - means["full"]) for k, v in means.items()},
              "k_rms": np.asarray(k_rms).round(3).tolist(), "q_rms": np.asarray(q_rms).round(3).tolist()}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

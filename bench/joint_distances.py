"""Nearest-other-page relative distances (comb_jax/serving/joint_pages.py) of chunk caches on held-out requests: the
naive backbone KV and Comb's PICaches, and the fraction of pages a joint-encoding threshold would fuse.

    python bench/joint_distances.py jsonl:runs/needles_dev.jsonl 8 16    # dataset, requests, page tokens
"""
import json
import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from comb_jax.config import load_config
from comb_jax.eval.pic_modes import _pad, chunk_kv
from comb_jax.methods.comb import comb_chunks
from comb_jax.model.buckets import power_of_two
from comb_jax.paths import DEFAULT_DATA_DIR
from comb_jax.serving.joint_pages import relative_distances
from comb_jax.text.codec import make_codec
from comb_jax.text.prompt import prompt_segments
from comb_jax.training.data import load_examples
from comb_jax.weights.resolve import load_model


@partial(jax.jit, static_argnames=("cfg",))
def encode_chunk(params, tokens, num_real, *, cfg):
    """Comb's PICache of one chunk [1, L] -> k, v [E, L, K, D] (what the Comb pool stores)."""
    k, v = comb_chunks(params, tokens, jnp.arange(tokens.shape[1])[None, :] < num_real, cfg=cfg)
    return k[:, 0], v[:, 0]


dataset, limit, pt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cfg = load_config("smollm2_comb")
codec = make_codec(cfg)
examples = load_examples(dataset, DEFAULT_DATA_DIR, "eval", seed=0, limit=limit, num_distractors=2,
                         max_chunk_chars=cfg.serve.max_chunk_tokens * 4, include_unanswerable=False)
_, params = load_model(cfg, "runs/qa_a/checkpoints/100")
out = {}
for mode, fn in (("naive", chunk_kv), ("comb", encode_chunk)):
    pages_k, pages_v, valid, nearest = [], [], [], []
    seen = set()
    for e in examples:
        seg = prompt_segments(codec, e.chunks, e.question, cfg.serve.max_chunk_tokens)
        for ids in (seg.comb_chunks if mode == "comb" else seg.chunks):
            if ids in seen:
                continue
            seen.add(ids)
            k, v = fn(params, _pad(ids, power_of_two(len(ids))), jnp.int32(len(ids)), cfg=cfg.model)
            k, v = np.asarray(k[:, :len(ids)]), np.asarray(v[:, :len(ids)])
            pad = ((0, 0), (0, -len(ids) % pt), (0, 0), (0, 0))
            k, v = np.pad(k, pad), np.pad(v, pad)
            for s in range(0, len(ids), pt):
                n = min(pt, len(ids) - s)
                kp, vp = k[:, s:s + pt], v[:, s:s + pt]
                if pages_k:
                    ok = np.asarray(valid) >= n
                    d = relative_distances(kp, vp, np.stack(pages_k, 1), np.stack(pages_v, 1), n)
                    nearest.append(float(np.where(ok, d, np.inf).min()))
                pages_k.append(kp)
                pages_v.append(vp)
                valid.append(n)
    q = np.quantile(nearest, [0, 0.01, 0.05, 0.1, 0.25, 0.5])
    out[mode] = {"pages": len(valid), "nearest_quantiles(0,1,5,10,25,50%)": q.round(3).tolist(),
                 **{f"fused_frac@{t}": float(np.mean(np.asarray(nearest) <= t))
                    for t in (0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)}}
print(json.dumps(out, indent=1))

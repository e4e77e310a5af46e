"""Trainable-parameter initialisation, chosen by `TrainConfig.init`.

- "random": the release's N(0, 0.02) linear weights, norms 1, gates 0.
- "warm" [beyond the release]: encoder block k is a copy of decoder layer c_k (the layer cross block k
  precedes); the encoder's k_proj/v_proj and the cross block's q/o projections (with the attention norm that
  feeds q) come from that same layer's self-attention. Gates stay 0, so the model still equals the backbone.
- "pointer" [beyond the release]: a copy path that reads from step 0. Encoder block k is a copy of decoder layer k
  (the bottom of the backbone: token identity plus neighbour features); v_proj and the cross o_proj are a random
  orthonormal projection P and its transpose times the final norm weight, so a cross block that attends to chunk
  token j adds (a projection of) the LM-head row of j's embedding to the residual stream: the attention logits
  get a clean gradient ("attend where the next token is") instead of noise through a random or zero o_proj.
  q_proj / k_proj are small random; the attention gates open at `init_attn_gate` (0.5 when left at 0).
- `train.init_checkpoint`: start from a checkpoint's comb params instead (e.g. after a `objective=kv` stage).
- `train.init_attn_gate` > 0: attention gates open; `train.zero_cross_out`: cross o_proj zero (`open_attention_gates`).
- `train.init_qk_norm`: the cross q_norm / k_norm weights (the attention's logit scale) at init.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from comb_jax.weights.resolve import random_comb
from comb_jax.weights.run_dir import restore_comb_params
from comb_jax.weights.shipped import load_shipped


def warm_comb(cfg, backbone, key) -> dict:
    """Comb params copied from the decoder layers c_k (see the module docstring); the rest as `random_comb`."""
    comb = random_comb(cfg, key)
    layers = np.asarray(cfg.model.cross_layers)
    source = jax.tree.map(lambda a: jnp.asarray(a)[layers].astype(jnp.dtype(cfg.param_dtype)), backbone["layers"])
    encoder = {"layers": dict(source), "k_proj": source["wk"], "v_proj": source["wv"]}
    cross = dict(comb["cross"], wq=source["wq"], wo=source["wo"], attn_norm=source["attn_norm"])
    return {"encoder": encoder, "cross": cross}


def pointer_comb(cfg, backbone, key) -> dict:
    """Comb params of `init="pointer"` (see the module docstring); the MLP branch as `random_comb`, gates 0."""
    m = cfg.model
    dtype = jnp.dtype(cfg.param_dtype)
    comb = random_comb(cfg, key)
    n, heads, kv_heads, head_dim = m.num_cross_layers, m.num_heads, m.num_kv_heads, m.head_dim
    if kv_heads * head_dim > m.hidden:
        raise ValueError(f"init=pointer needs num_kv_heads * head_dim <= hidden ({kv_heads * head_dim} > {m.hidden})")
    rng = np.random.default_rng(cfg.train.seed)
    # P[k]: [hidden, kv_heads * head_dim] with orthonormal columns, one per cross block
    proj = np.stack([np.linalg.qr(rng.standard_normal((m.hidden, kv_heads * head_dim)))[0] for _ in range(n)])
    proj = jnp.asarray(proj.reshape(n, m.hidden, kv_heads, head_dim), dtype)
    group = heads // kv_heads
    # wo[k, h] = P[k, :, h // group].T * final_norm / group: the heads of one KV group together write P^T v
    wo = jnp.repeat(jnp.transpose(proj, (0, 2, 3, 1)), group, axis=1)
    wo = wo * jnp.asarray(backbone["final_norm"], dtype) / group
    encoder = dict(comb["encoder"], v_proj=proj,
                   layers=jax.tree.map(lambda a: jnp.asarray(a)[:n].astype(dtype), backbone["layers"]))
    cross = dict(comb["cross"], wo=wo)
    return {"encoder": encoder, "cross": cross}


def open_attention_gates(comb: dict, tanh_gate: float, zero_out: bool) -> dict:
    """Attention gates at tanh = `tanh_gate`; `zero_out` also zeroes the cross o_proj, so the model still equals the
    backbone but the o_proj gets a gradient from the first step, and through it q, k_norm, the encoder and its k/v
    projections (with a closed gate none of them does: every path from the context goes through tanh(gate) = 0)."""
    cross = dict(comb["cross"], gate_attn=jnp.full_like(comb["cross"]["gate_attn"], np.arctanh(tanh_gate)))
    if zero_out:
        cross["wo"] = jnp.zeros_like(cross["wo"])
    return dict(comb, cross=cross)


def init_comb(cfg, backbone, key) -> dict:
    tc = cfg.train
    if tc.init_checkpoint == "shipped":  # the weights this config ships (comb_jax/shipped_models/NAME)
        comb = jax.tree.map(jnp.asarray, load_shipped(cfg))
    elif tc.init_checkpoint:
        comb = jax.tree.map(jnp.asarray, restore_comb_params(tc.init_checkpoint, cfg, prefer="latest"))
    elif tc.init == "random":
        comb = random_comb(cfg, key)
    elif tc.init == "warm":
        comb = warm_comb(cfg, backbone, key)
    elif tc.init == "pointer":
        comb = pointer_comb(cfg, backbone, key)
    else:
        raise ValueError(f"unknown train.init {tc.init!r}; valid: random, warm, pointer")
    gate = tc.init_attn_gate or (0.5 if tc.init == "pointer" and not tc.init_checkpoint else 0.0)
    if gate > 0 or tc.zero_cross_out:
        comb = open_attention_gates(comb, gate, tc.zero_cross_out)
    if cfg.train.init_qk_norm != 1.0:
        cross = comb["cross"]
        comb = dict(comb, cross=dict(cross, q_norm=jnp.full_like(cross["q_norm"], cfg.train.init_qk_norm),
                                     k_norm=jnp.full_like(cross["k_norm"], cfg.train.init_qk_norm)))
    return comb

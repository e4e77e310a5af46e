"""Trainable-parameter initialisation, chosen by `TrainConfig.init`.

- "random": the release's N(0, 0.02) linear weights, norms 1, gates 0.
- "warm" [beyond the release]: encoder block k is a copy of decoder layer c_k (the layer cross block k
  precedes); the encoder's k_proj/v_proj and the cross block's q/o projections (with the attention norm that
  feeds q) come from that same layer's self-attention. Gates stay 0, so the model still equals the backbone.
- `train.init_checkpoint`: start from a checkpoint's comb params instead (e.g. after a `objective=kv` stage).
- `train.init_attn_gate` > 0: attention gates open; `train.zero_cross_out`: cross o_proj zero (`open_attention_gates`).
- `train.init_qk_norm`: the cross q_norm / k_norm weights (the attention's logit scale) at init.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from comb_jax.layout import init_params, model_layout


def random_comb(cfg, key) -> dict:
    return init_params(model_layout(cfg.model)["comb"], key, jnp.dtype(cfg.param_dtype))


def warm_comb(cfg, backbone, key) -> dict:
    """Comb params copied from the decoder layers c_k (see the module docstring); the rest as `random_comb`."""
    comb = random_comb(cfg, key)
    layers = np.asarray(cfg.model.cross_layers)
    source = jax.tree.map(lambda a: jnp.asarray(a)[layers].astype(jnp.dtype(cfg.param_dtype)), backbone["layers"])
    encoder = {"layers": dict(source), "k_proj": source["wk"], "v_proj": source["wv"]}
    cross = dict(comb["cross"], wq=source["wq"], wo=source["wo"], attn_norm=source["attn_norm"])
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
    if tc.init_checkpoint:
        from comb_jax.checkpoint import restore_comb_params

        comb = jax.tree.map(jnp.asarray, restore_comb_params(tc.init_checkpoint, cfg, prefer="latest"))
    elif tc.init == "random":
        comb = random_comb(cfg, key)
    elif tc.init == "warm":
        comb = warm_comb(cfg, backbone, key)
    else:
        raise ValueError(f"unknown train.init {tc.init!r}; valid: random, warm")
    if tc.init_attn_gate > 0 or tc.zero_cross_out:
        comb = open_attention_gates(comb, tc.init_attn_gate, tc.zero_cross_out)
    if cfg.train.init_qk_norm != 1.0:
        cross = comb["cross"]
        comb = dict(comb, cross=dict(cross, q_norm=jnp.full_like(cross["q_norm"], cfg.train.init_qk_norm),
                                     k_norm=jnp.full_like(cross["k_norm"], cfg.train.init_qk_norm)))
    return comb

"""Trainable-parameter initialisation, chosen by `TrainConfig.init`.

- "random": the release's N(0, 0.02) linear weights, norms 1, gates 0.
- "warm" [beyond the release]: encoder block k is a copy of decoder layer c_k (the layer cross block k
  precedes); the encoder's k_proj/v_proj and the cross block's q/o projections (with the attention norm that
  feeds q) come from that same layer's self-attention. Gates stay 0, so the model still equals the backbone.
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


def init_comb(cfg, backbone, key) -> dict:
    if cfg.train.init == "random":
        return random_comb(cfg, key)
    if cfg.train.init == "warm":
        return warm_comb(cfg, backbone, key)
    raise ValueError(f"unknown train.init {cfg.train.init!r}; valid: random, warm")

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
- "grow" [beyond the release]: a deeper Comb from a trained one-block Comb (`init_checkpoint`: a run dir, or
  `shipped:smollm2_pointer` for that config's shipped weights), starting from what it already reads: the last
  cross block (before the last decoder layer) and its k/v projections are the trained block's; encoder block 0
  is the trained encoder block, the new encoder blocks are decoder layers with their output projections
  (attention o_proj, MLP down) zero, so every encoder block passes the trained block's output through unchanged
  at step 0; the new cross blocks below are `pointer` blocks
  with their attention gates at tanh `init_attn_gate` (0.1 when left at 0): near the trained model, with a gradient.
- `train.init_checkpoint`: start from a checkpoint's comb params instead (e.g. after a `objective=kv` stage).
- `train.init_attn_gate` > 0: attention gates open; `train.zero_cross_out`: cross o_proj zero (`open_attention_gates`).
- `train.init_qk_norm`: the cross q_norm / k_norm weights (the attention's logit scale) at init.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from comb_jax.errors import CheckpointError
from comb_jax.model.layout import model_layout
from comb_jax.weights.resolve import random_comb
from comb_jax.weights.run_dir import restore_comb_params
from comb_jax.weights.shipped import ShippedModelError, load_shipped


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


def grow_comb(cfg, backbone, one_block: dict, key) -> dict:
    """E-block Comb params of `init="grow"` from a trained one-block Comb `one_block` (see the module docstring)."""
    m = cfg.model
    n = m.num_cross_layers
    if n < 2:
        raise ValueError(f"init=grow adds cross blocks: model.num_cross_layers must be >= 2, got {n}")
    dtype = jnp.dtype(cfg.param_dtype)
    comb = pointer_comb(cfg, backbone, key)
    last = lambda new, old: new.at[n - 1].set(jnp.asarray(old[0], dtype))  # noqa: E731
    layers = dict(comb["encoder"]["layers"])
    layers = {k: v.at[0].set(jnp.asarray(one_block["encoder"]["layers"][k][0], dtype)) for k, v in layers.items()}
    layers["wo"] = layers["wo"].at[1:].set(0.0)  # new encoder blocks: identity at step 0
    layers["w_down"] = layers["w_down"].at[1:].set(0.0)
    encoder = {"layers": layers, "k_proj": last(comb["encoder"]["k_proj"], one_block["encoder"]["k_proj"]),
               "v_proj": last(comb["encoder"]["v_proj"], one_block["encoder"]["v_proj"])}
    gate = np.arctanh(cfg.train.init_attn_gate or 0.1)
    cross = {k: last(v, one_block["cross"][k]) for k, v in comb["cross"].items()}
    cross["gate_attn"] = cross["gate_attn"].at[: n - 1].set(gate)
    cross["gate_mlp"] = cross["gate_mlp"].at[: n - 1].set(0.0)
    return {"encoder": encoder, "cross": cross}


def open_attention_gates(comb: dict, tanh_gate: float, zero_out: bool) -> dict:
    """Attention gates at tanh = `tanh_gate`; `zero_out` also zeroes the cross o_proj, so the model still equals the
    backbone but the o_proj gets a gradient from the first step, and through it q, k_norm, the encoder and its k/v
    projections (with a closed gate none of them does: every path from the context goes through tanh(gate) = 0)."""
    cross = dict(comb["cross"], gate_attn=jnp.full_like(comb["cross"]["gate_attn"], np.arctanh(tanh_gate)))
    if zero_out:
        cross["wo"] = jnp.zeros_like(cross["wo"])
    return dict(comb, cross=cross)


def _restore(cfg, source: str) -> dict:
    """Comb params from `source` ("shipped[:NAME]" or a run dir); a model without the context path
    (`context_layer`) is read as such, so a context path can be added to it."""
    plain = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, context_layer=0))
    if source.split(":")[0] == "shipped":  # the weights this config (or NAME) ships
        name = source.partition(":")[2] or cfg.name
        try:
            return jax.tree.map(jnp.asarray, load_shipped(dataclasses.replace(cfg, name=name)))
        except ShippedModelError:
            if not cfg.model.context_layer:
                raise
            return jax.tree.map(jnp.asarray, load_shipped(dataclasses.replace(plain, name=name)))
    try:
        return jax.tree.map(jnp.asarray, restore_comb_params(source, cfg, prefer="latest"))
    except (CheckpointError, ValueError):  # a run without the context path does not restore with it
        if not cfg.model.context_layer:
            raise
        return jax.tree.map(jnp.asarray, restore_comb_params(source, plain, prefer="latest"))


def with_context_path(cfg, comb: dict) -> dict:
    """`comb` with zero `context_k_proj` / `context_v_proj` added where `cfg` has a context path and it has none:
    the same model, with a path to learn."""
    if not cfg.model.context_layer or "context_k_proj" in comb["encoder"]:
        return comb
    shape = model_layout(cfg.model)["comb"]["encoder"]["context_k_proj"].shape
    zeros = jnp.zeros(shape, comb["encoder"]["k_proj"].dtype)
    return dict(comb, encoder=dict(comb["encoder"], context_k_proj=zeros, context_v_proj=zeros))


def init_comb(cfg, backbone, key) -> dict:
    tc = cfg.train
    if tc.init == "grow":
        if not tc.init_checkpoint:
            raise ValueError("init=grow needs train.init_checkpoint: a one-block Comb (a run dir or shipped)")
        one = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_cross_layers=1))
        if tc.init_checkpoint.split(":")[0] == "shipped":  # "shipped" (this config's) or "shipped:NAME"
            name = tc.init_checkpoint.partition(":")[2] or cfg.name
            one_block = load_shipped(dataclasses.replace(one, name=name))
        else:
            one_block = restore_comb_params(tc.init_checkpoint, one, prefer="latest")
        return grow_comb(cfg, backbone, one_block, key)
    if tc.init_checkpoint:
        comb = with_context_path(cfg, _restore(cfg, tc.init_checkpoint))
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

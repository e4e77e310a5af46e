"""Every parameter of the model declared once: shape, logical axes, initialiser.

The tree has two subtrees with different lifetimes:
- `backbone`: the frozen Llama decoder (its embedding also feeds the encoder, unless the model has its own frozen
  `encoder_embed`, as an imported release checkpoint may);
- `comb`: what Comb trains: `encoder` blocks with their `k_proj`/`v_proj` (and `context_k_proj`/`context_v_proj`
  when the model reads backbone states, `context_layer`), and `cross` blocks.

Abstract shapes, random init and shardings (see `sharding.py`) are all derived from this one declaration.
Repeated blocks are stacked on a leading `layers` axis so the model can `lax.scan` over them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from comb_jax.config import ModelConfig


@dataclass(frozen=True)
class Param:
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    init: str = "normal"  # normal (std 0.02) | ones | zeros

    def __post_init__(self):
        assert len(self.shape) == len(self.axes), (self.shape, self.axes)


def is_param(x) -> bool:
    return isinstance(x, Param)


def block_layout(cfg: ModelConfig, n: int) -> dict[str, Param]:
    """A stack of `n` Llama blocks: [layers, ...] (decoder layers and encoder blocks share it)."""
    e, h, k, d, f = cfg.hidden, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_hidden
    return {
        "attn_norm": Param((n, e), ("layers", "norm"), "ones"),
        "wq": Param((n, e, h, d), ("layers", "embed", "heads", "head_dim")),
        "wk": Param((n, e, k, d), ("layers", "embed", "kv_heads", "head_dim")),
        "wv": Param((n, e, k, d), ("layers", "embed", "kv_heads", "head_dim")),
        "wo": Param((n, h, d, e), ("layers", "heads", "head_dim", "embed")),
        "mlp_norm": Param((n, e), ("layers", "norm"), "ones"),
        "w_gate": Param((n, e, f), ("layers", "embed", "mlp")),
        "w_up": Param((n, e, f), ("layers", "embed", "mlp")),
        "w_down": Param((n, f, e), ("layers", "mlp", "embed")),
    }


def cross_layout(cfg: ModelConfig) -> dict[str, Param]:
    """E gated cross-attention blocks: [cross_layers, ...]."""
    n, e, h, d, f = cfg.num_cross_layers, cfg.hidden, cfg.num_heads, cfg.head_dim, cfg.mlp_hidden
    return {
        "attn_norm": Param((n, e), ("layers", "norm"), "ones"),
        "wq": Param((n, e, h, d), ("layers", "embed", "heads", "head_dim")),
        "q_norm": Param((n, d), ("layers", "head_dim"), "ones"),
        "k_norm": Param((n, d), ("layers", "head_dim"), "ones"),
        "wo": Param((n, h, d, e), ("layers", "heads", "head_dim", "embed")),
        "gate_attn": Param((n,), ("layers",), "zeros"),
        "mlp_norm": Param((n, e), ("layers", "norm"), "ones"),
        "w_gate": Param((n, e, f), ("layers", "embed", "mlp")),
        "w_up": Param((n, e, f), ("layers", "embed", "mlp")),
        "w_down": Param((n, f, e), ("layers", "mlp", "embed")),
        "gate_mlp": Param((n,), ("layers",), "zeros"),
    }


def model_layout(cfg: ModelConfig) -> dict:
    backbone = {
        "embed": Param((cfg.vocab_size, cfg.hidden), ("vocab", "embed")),
        "layers": block_layout(cfg, cfg.num_layers),
        "final_norm": Param((cfg.hidden,), ("norm",), "ones"),
    }
    if not cfg.tie_embeddings:
        backbone["lm_head"] = Param((cfg.hidden, cfg.vocab_size), ("embed", "vocab"))
    if cfg.separate_encoder_embed:  # frozen like the rest of the backbone; read by the encoder only
        backbone["encoder_embed"] = Param((cfg.vocab_size, cfg.hidden), ("vocab", "embed"))
    n, e, k, d = cfg.num_cross_layers, cfg.hidden, cfg.num_kv_heads, cfg.head_dim
    comb = {
        "encoder": {
            "layers": block_layout(cfg, n),
            "k_proj": Param((n, e, k, d), ("layers", "embed", "kv_heads", "head_dim")),
            "v_proj": Param((n, e, k, d), ("layers", "embed", "kv_heads", "head_dim")),
        },
        "cross": cross_layout(cfg),
    }
    if cfg.context_layer:  # the backbone's layer-m states of a chunk token, added to its keys and values
        comb["encoder"]["context_k_proj"] = Param((n, e, k, d), ("layers", "embed", "kv_heads", "head_dim"), "zeros")
        comb["encoder"]["context_v_proj"] = Param((n, e, k, d), ("layers", "embed", "kv_heads", "head_dim"), "zeros")
    return {"backbone": backbone, "comb": comb}


def abstract_params(layout, dtype=jnp.float32):
    """ShapeDtypeStructs for a layout: shapes without memory (parameter counts, dry-run compiles)."""
    return jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, dtype), layout, is_leaf=is_param)


def init_params(layout, key: jax.Array, dtype=jnp.float32, std: float = 0.02):
    """Release initialisation: linear weights N(0, std), norms 1, gates 0."""
    leaves, treedef = jax.tree.flatten(layout, is_leaf=is_param)
    keys = jax.random.split(key, len(leaves))

    def one(p: Param, k):
        if p.init == "ones":
            return jnp.ones(p.shape, dtype)
        if p.init == "zeros":
            return jnp.zeros(p.shape, dtype)
        return (std * jax.random.normal(k, p.shape, jnp.float32)).astype(dtype)

    return jax.tree.unflatten(treedef, [one(p, k) for p, k in zip(leaves, keys)])


def count_params(tree) -> int:
    """Number of scalars in a tree of arrays, ShapeDtypeStructs or Params."""
    leaves = jax.tree.leaves(tree, is_leaf=is_param)
    return sum(math.prod(x.shape) for x in leaves)


def flatten_names(tree, prefix: str = "") -> dict[str, object]:
    """{'comb/cross/wq': leaf, ...}: stable names for logging and checkpoints."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_param)[0]:
        out[prefix + "/".join(str(getattr(p, "key", p)) for p in path)] = leaf
    return out


def check_shapes(layout, params, where: str = "params") -> None:
    """Raise a ValueError naming the first missing, extra or mis-shaped parameter."""
    want = flatten_names(layout)
    got = flatten_names(params)
    for name, p in want.items():
        if name not in got:
            raise ValueError(f"{where}: missing parameter {name} with shape {p.shape}")
        if tuple(np.shape(got[name])) != p.shape:
            raise ValueError(f"{where}: parameter {name} has shape {tuple(np.shape(got[name]))}, expected {p.shape}")
    extra = sorted(set(got) - set(want))
    if extra:
        raise ValueError(f"{where}: unexpected parameters {extra[:5]}")

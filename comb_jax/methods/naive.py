"""The backbone's own KV of a chunk, computed alone at positions 0..L-1: what naive, re-rotated and EPIC reuse
(and KV Packet's documents) cache."""

from __future__ import annotations

import jax.numpy as jnp

from comb_jax.config import ModelConfig
from comb_jax.model.transformer import forward, init_kv_cache


def backbone_chunks(params, tokens, mask, *, cfg: ModelConfig, dtype=jnp.float32):
    """Chunk processor of a backbone-KV pool: the decoder's own KV of each row of tokens [B, L] computed alone at
    positions 0..L-1 (mask [B, L]: its real tokens, a prefix of the row) -> k, v [N, B, L, K, D]."""
    cache = init_kv_cache(cfg, tokens.shape[0], tokens.shape[1], dtype)
    _, cache = forward(params, tokens, cfg, None, cache, mask.sum(-1).astype(jnp.int32), dtype)
    return cache.k, cache.v

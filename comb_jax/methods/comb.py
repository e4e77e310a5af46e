"""Comb's side of a chunk: the encoder turns each chunk, alone, into a PICache that the cross blocks read."""

from __future__ import annotations

import jax.numpy as jnp

from comb_jax.config import ModelConfig
from comb_jax.model.transformer import PICache, encode


def comb_chunks(params, tokens, mask, *, cfg: ModelConfig, dtype=jnp.float32):
    """Chunk processor of the Comb pool: the encoder on tokens, mask [B, L] -> PICache k, v [E, B, L, K, D]."""
    cache = encode(params, tokens, mask, cfg, dtype)
    return cache.k, cache.v


def batch_picache(params, chunk_tokens, chunk_mask, cfg, dtype, remat: bool = False, context_states=None) -> PICache:
    """Encode every chunk on its own, then join each example's chunks along the context axis (a training or eval
    batch; `cfg` is the whole Config).

    chunk_tokens, chunk_mask [B, n, L] -> PICache with k, v [E, B, n * L, K, D] and mask [B, n * L].
    context_states [B, n, L, embed]: the chunks' `chunk_context_states`, precomputed (or None).
    """
    b, n, length = chunk_tokens.shape
    states = None if context_states is None else context_states.reshape(b * n, length, -1)
    cache = encode(params, chunk_tokens.reshape(b * n, length), chunk_mask.reshape(b * n, length), cfg.model, dtype,
                   remat, context_states=states)
    e, _, _, kv, d = cache.k.shape
    return PICache(cache.k.reshape(e, b, n * length, kv, d), cache.v.reshape(e, b, n * length, kv, d),
                   chunk_mask.reshape(b, n * length))

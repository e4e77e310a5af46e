"""Continuous batching on static shapes: S decode slots, `insert_rows` prefilled requests, one `decode_step`.

The state holds every slot's KV cache, its request's dense cross context (keys already k-normed, padded to the
largest context bucket), the last token, its own PRNG stream and sampling parameters. Waiting requests are
prefilled together (`prefill_rows`: a bucketed batch, each row its own PRNG stream, so a row's answer does not
depend on the others) and `insert_rows`ed into free slots between decode steps; a finished request leaves by
being marked inactive (the host passes `active` [S] to each step), so no shape ever changes. The insert and the
step donate the state: the slots are updated in place, as in JetStream's prefill/insert/generate.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from comb_jax.config import ModelConfig
from comb_jax.model.decode import sample
from comb_jax.model.transformer import (
    CrossContext,
    KVCache,
    PICache,
    cross_context,
    forward,
    init_kv_cache,
    lm_logits,
)
from comb_jax.serving.pool import gather_context
from comb_jax.serving.precompiled import Precompiled


class SlotState(NamedTuple):
    """Device state of S decode slots.

    kv_cache: k, v [N, S, M, K, D], lengths [S]; context: CrossContext k, v [E, S, C, K, D], mask [S, C] (None when
    no request reads PICaches: mode full); last_token [S]; key_data [S, 2] uint32 (each slot's PRNG stream);
    temperature, top_p [S].
    """

    kv_cache: KVCache
    context: CrossContext | None
    last_token: jax.Array
    key_data: jax.Array
    temperature: jax.Array
    top_p: jax.Array


def init_slots(cfg: ModelConfig, slots: int, kv_slots: int, context_tokens: int, dtype) -> SlotState:
    """Empty state: `slots` rows, `kv_slots` KV positions per row, `context_tokens` PICache tokens (0: none)."""
    context = None
    if context_tokens:
        shape = (cfg.num_cross_layers, slots, context_tokens, cfg.num_kv_heads, cfg.head_dim)
        context = CrossContext(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                               jnp.zeros((slots, context_tokens), bool))
    key_shape = jax.random.key_data(jax.random.key(0)).shape
    return SlotState(init_kv_cache(cfg, slots, kv_slots, dtype), context, jnp.zeros((slots,), jnp.int32),
                     jnp.zeros((slots, *key_shape), jnp.uint32), jnp.zeros((slots,), jnp.float32),
                     jnp.ones((slots,), jnp.float32))


def admit_buckets(slots: int) -> tuple[int, ...]:
    """Batch sizes of an admission prefill: powers of two below the slot count, and the slot count."""
    return tuple(sorted({1 << i for i in range(slots.bit_length()) if 1 << i < slots} | {slots}))


@jax.jit
def request_key_data(seeds):
    """uint32 seeds [B] -> each one's PRNG key data [B, 2] (one compile per batch bucket)."""
    return jax.vmap(lambda seed: jax.random.key_data(jax.random.key(seed)))(seeds)


def sample_rows(logits, keys, temperature, top_p):
    """`decode.sample` with one PRNG key per row, so a row's draws do not depend on the other slots.

    logits [S, vocab]; keys [S] (typed); temperature, top_p [S] -> [S] int32.
    """
    return jax.vmap(lambda lg, k, t, p: sample(lg[None], k, t[None], p[None])[0])(logits, keys, temperature, top_p)


@Precompiled
@partial(jax.jit, static_argnames=("cfg", "slots", "dtype"))
def prefill_rows(params, pool_k, pool_v, page_table, context_mask, prompt, prompt_lengths, key_data, temperature,
                 top_p, *, cfg: ModelConfig, slots: int, dtype=jnp.float32):
    """Prefill a batch of requests, each with its own PRNG stream, reading their pages (page_table None: none).

    page_table [B, C / page_tokens]; context_mask [B, C]; prompt [B, T] right-padded; prompt_lengths [B];
    key_data [B, 2] (each request's key); temperature, top_p [B]. Returns (KVCache of `slots` positions, CrossContext
    or None, first token [B], key_data [B, 2] after the first draw). Row i is what the same request prefilled
    alone draws: its key is split into (next stream, draw) as `decode.prefill` does.
    """
    ctx = None
    if page_table is not None:
        ctx = cross_context(params, PICache(*gather_context(pool_k, pool_v, page_table, context_mask, dtype)), cfg,
                            dtype)
    cache = init_kv_cache(cfg, prompt.shape[0], slots, dtype)
    hidden, cache = forward(params, prompt, cfg, ctx, cache, prompt_lengths, dtype, fresh_cache=True)
    first, key_data = first_draw(params, hidden, prompt_lengths, key_data, temperature, top_p)
    return cache, ctx, first, key_data


def first_draw(params, hidden, prompt_lengths, key_data, temperature, top_p):
    """The first answer token of each prefilled row: hidden [B, T, H] -> (token [B], key_data [B, 2] of the next
    stream). Each row's key is split into (next stream, draw) as `decode.prefill` does."""
    last = jnp.take_along_axis(hidden, (prompt_lengths - 1)[:, None, None], axis=1)
    keys = jax.vmap(jax.random.split)(jax.random.wrap_key_data(key_data))  # [B, 2]: next stream, draw
    first = sample_rows(lm_logits(params, last)[:, 0], keys[:, 1], temperature, top_p)
    return first, jax.random.key_data(keys[:, 0])


@Precompiled
@partial(jax.jit, donate_argnames=("state",))
def insert_rows(state: SlotState, slot_ids, kv_cache: KVCache, context: CrossContext | None, first_token, key_data,
                temperature, top_p) -> SlotState:
    """Write B prefilled requests into rows `slot_ids` [B] (an id >= S is a padding row, dropped).

    kv_cache: k, v [N, B, M, K, D]; context: k, v [E, B, C, K, D], mask [B, C] with C <= the state's context
    length (padded here; one compile per batch and context bucket); first_token, temperature, top_p [B];
    key_data [B, 2].
    """
    def put(big, rows, axis):
        idx = (slice(None),) * axis + (slot_ids,)
        return big.at[idx].set(rows.astype(big.dtype), mode="drop")

    kv = KVCache(put(state.kv_cache.k, kv_cache.k, 1), put(state.kv_cache.v, kv_cache.v, 1),
                 put(state.kv_cache.lengths, kv_cache.lengths, 0))
    ctx = state.context
    if ctx is not None:
        pad = ctx.mask.shape[1] - context.mask.shape[1]
        dense = lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, pad), (0, 0), (0, 0)))
        ctx = CrossContext(put(ctx.k, dense(context.k), 1), put(ctx.v, dense(context.v), 1),
                           put(ctx.mask, jnp.pad(context.mask, ((0, 0), (0, pad))), 0))
    return SlotState(kv, ctx, put(state.last_token, first_token, 0), put(state.key_data, key_data, 0),
                     put(state.temperature, temperature, 0), put(state.top_p, top_p, 0))


@Precompiled
@partial(jax.jit, static_argnames=("cfg", "dtype"), donate_argnames=("state",))
def decode_step(params, state: SlotState, active, *, cfg: ModelConfig, dtype=jnp.float32):
    """One token for every active slot. active [S] bool -> (state, next tokens [S]).

    Inactive rows keep their last token, PRNG stream and KV length (their cache write is never read).
    """
    hidden, kv = forward(params, state.last_token[:, None], cfg, state.context, state.kv_cache,
                         active.astype(jnp.int32), dtype)
    keys = jax.vmap(jax.random.split)(jax.random.wrap_key_data(state.key_data))  # [S, 2]: next stream, draw
    nxt = sample_rows(lm_logits(params, hidden)[:, 0], keys[:, 1], state.temperature, state.top_p)
    nxt = jnp.where(active, nxt, state.last_token)
    key_data = jnp.where(active[:, None], jax.random.key_data(keys[:, 0]), state.key_data)
    return state._replace(kv_cache=kv, last_token=nxt, key_data=key_data), nxt

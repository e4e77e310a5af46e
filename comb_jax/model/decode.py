"""Prefill and a jit-compiled decode loop over static shapes.

`prefill` runs right-padded prompts [B, T] into an empty KV cache of fixed slots and samples each row's
first token; `decode_loop` is one `lax.while_loop` that feeds the last token back until every row has hit a
stop id or its token budget. Both take the PICache of the batch (or None for the plain backbone).
Sampling is greedy where temperature == 0, otherwise temperature + top-p with explicit PRNG keys.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from comb_jax.config import ModelConfig
from comb_jax.model.transformer import CrossContext, KVCache, PICache, cross_context, forward, init_kv_cache, lm_logits


class DecodeState(NamedTuple):
    """Everything the decode loop carries. tokens: [B, max_new] generated ids (0 past `num_generated`)."""

    kv_cache: KVCache
    last_token: jax.Array  # [B]
    tokens: jax.Array  # [B, max_new]
    num_generated: jax.Array  # [B]
    done: jax.Array  # [B] bool
    rng: jax.Array


def sample(logits, rng, temperature, top_p):
    """logits [B, vocab]; temperature, top_p [B]. Greedy rows (temperature 0) take the argmax."""
    greedy = jnp.argmax(logits, axis=-1)
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # keep the smallest prefix whose mass reaches top_p (always at least the best token)
    cutoff_index = jnp.sum(cum < top_p[:, None], axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_logits, jnp.minimum(cutoff_index, logits.shape[-1] - 1), axis=-1)
    scaled = jnp.where(scaled < cutoff, -jnp.inf, scaled)
    sampled = jax.random.categorical(rng, scaled, axis=-1)
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


def _is_stop(tokens, stop_ids):
    return jnp.isin(tokens, jnp.asarray(stop_ids, jnp.int32))


@partial(jax.jit, static_argnames=("cfg", "slots", "max_new_tokens", "stop_ids", "dtype"))
def prefill(params, prompt, prompt_lengths, picache: PICache | CrossContext | None, rng, temperature, top_p, *,
            cfg: ModelConfig, slots: int, max_new_tokens: int, stop_ids: tuple[int, ...], dtype=jnp.float32):
    """prompt [B, T] right-padded, prompt_lengths [B] -> DecodeState holding the first sampled token."""
    cache = init_kv_cache(cfg, prompt.shape[0], slots, dtype)
    hidden, cache = forward(params, prompt, cfg, picache, cache, prompt_lengths, dtype, fresh_cache=True)
    last = jnp.take_along_axis(hidden, (prompt_lengths - 1)[:, None, None], axis=1)
    rng, key = jax.random.split(rng)
    first = sample(lm_logits(params, last)[:, 0], key, temperature, top_p)
    return start_state(cache, first, rng, max_new_tokens=max_new_tokens, stop_ids=stop_ids)


@partial(jax.jit, static_argnames=("max_new_tokens", "stop_ids"))
def start_state(kv_cache: KVCache, first, rng, *, max_new_tokens: int, stop_ids: tuple[int, ...]) -> DecodeState:
    """The DecodeState after a prefill that filled `kv_cache` and sampled `first` [B]; `rng`: the loop's stream."""
    tokens = jnp.zeros((first.shape[0], max_new_tokens), jnp.int32).at[:, 0].set(first)
    return DecodeState(kv_cache, first, tokens, jnp.ones(first.shape, jnp.int32), _is_stop(first, stop_ids), rng)


@partial(jax.jit, static_argnames=("cfg", "stop_ids", "dtype"), donate_argnames=("state",))
def decode_loop(params, state: DecodeState, picache: PICache | CrossContext | None, max_tokens, temperature, top_p,
                *, cfg: ModelConfig, stop_ids: tuple[int, ...], dtype=jnp.float32) -> DecodeState:
    """Decode until every row is done: a stop id was generated or `max_tokens` [B] reached."""
    width = state.tokens.shape[1]
    max_tokens = jnp.minimum(max_tokens, width)
    # the context's keys are normalised once here, not once per generated token
    ctx = None if picache is None else cross_context(params, picache, cfg, dtype)

    def cond(s: DecodeState):
        return jnp.any(~s.done & (s.num_generated < max_tokens))

    def body(s: DecodeState):
        active = ~s.done & (s.num_generated < max_tokens)
        hidden, cache = forward(params, s.last_token[:, None], cfg, ctx, s.kv_cache, active.astype(jnp.int32),
                                dtype)
        rng, key = jax.random.split(s.rng)
        nxt = sample(lm_logits(params, hidden)[:, 0], key, temperature, top_p)
        nxt = jnp.where(active, nxt, s.last_token)
        rows = jnp.arange(nxt.shape[0])
        tokens = s.tokens.at[rows, s.num_generated].set(jnp.where(active, nxt, 0), mode="drop")
        done = s.done | (active & _is_stop(nxt, stop_ids))
        return DecodeState(cache, nxt, tokens, s.num_generated + active, done, rng)

    return jax.lax.while_loop(cond, body, state)


def generate(params, prompt, prompt_lengths, picache, cfg: ModelConfig, *, max_new_tokens: int, stop_ids=(),
             temperature=None, top_p=None, rng=None, slots: int | None = None, dtype=jnp.float32):
    """Prefill + decode loop. Returns (tokens [B, max_new_tokens], lengths [B]); stop tokens are included."""
    b, t = prompt.shape
    temperature = jnp.zeros((b,), jnp.float32) if temperature is None else jnp.asarray(temperature, jnp.float32)
    top_p = jnp.ones((b,), jnp.float32) if top_p is None else jnp.asarray(top_p, jnp.float32)
    rng = jax.random.key(0) if rng is None else rng
    slots = slots or t + max_new_tokens
    stop_ids = tuple(int(i) for i in stop_ids)
    if picache is not None:  # normalised once for both prefill and the decode loop
        picache = cross_context(params, picache, cfg, dtype)
    state = prefill(params, prompt, prompt_lengths, picache, rng, temperature, top_p, cfg=cfg, slots=slots,
                    max_new_tokens=max_new_tokens, stop_ids=stop_ids, dtype=dtype)
    max_tokens = jnp.full((b,), max_new_tokens, jnp.int32)
    state = decode_loop(params, state, picache, max_tokens, temperature, top_p, cfg=cfg, stop_ids=stop_ids,
                        dtype=dtype)
    return state.tokens, state.num_generated

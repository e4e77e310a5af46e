"""Comb model as pure functions over the parameter tree of `layout.py`.

Shapes use: B batch, T query tokens, S key tokens, L chunk tokens, C context (PICache) tokens,
E cross layers, N decoder layers, H heads, K KV heads, D head_dim, M KV-cache slots.

- `encode`: chunk tokens -> PICache (the trainable encoder; bidirectional, RoPE inside the chunk only).
- `forward`: the decoder (frozen backbone) with gated cross blocks reading a PICache; optional KV cache,
  so the same function serves training (no cache), prefill (empty cache) and decode steps (T = 1).
- `lm_logits`: hidden states -> logits.

The decoder runs as E groups of [stride - 1 decoder layers, cross block k, 1 decoder layer], so cross
block k sits before layer c_k = (k + 1) * stride - 1: a scan over the groups, each a scan over its layers (the
training forward runs group 0 apart, see `_decoder`).

Attention runs as `cfg.attention_impl` says (see `attention`): the einsum reference, or jax.nn.dot_product_attention
with XLA or cuDNN flash attention. Each caller gives the dense mask (the meaning) and, where it has one, its
structure (causal, key lengths), which is what cuDNN is given instead: no [tokens, tokens] matrix on that path.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from comb_jax.config import ModelConfig

NEG_INF = -1e30


class PICache(NamedTuple):
    """Position-independent cache of one or more chunks per request.

    k, v: [E, B, C, K, D] (keys are stored before the cross block's k_norm); mask: [B, C] valid tokens.
    """

    k: jax.Array
    v: jax.Array
    mask: jax.Array


class CrossContext(NamedTuple):
    """A PICache made ready for the cross blocks: keys after each block's k_norm, both in the compute dtype.

    k, v: [E, B, C, K, D]; mask: [B, C]. `cross_context` builds it once per batch of requests, so a decode loop
    does not renormalise the whole context for every generated token.
    """

    k: jax.Array
    v: jax.Array
    mask: jax.Array


class KVCache(NamedTuple):
    """The decoder's own cache. k, v: [N, B, M, K, D] (post-RoPE keys); lengths: [B] tokens written."""

    k: jax.Array
    v: jax.Array
    lengths: jax.Array


def init_kv_cache(cfg: ModelConfig, batch: int, slots: int, dtype=jnp.float32) -> KVCache:
    shape = (cfg.num_layers, batch, slots, cfg.num_kv_heads, cfg.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))


# ----------------------------------------------------------------------------------------------------------
# Building blocks


def rms_norm(x, weight, eps):
    """RMSNorm over the last axis, in float32 like Hugging Face's LlamaRMSNorm."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * y.astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """[D/2] inverse frequencies, with Llama-3 scaling when configured (computed in float32 like HF)."""
    d = cfg.head_dim
    inv = 1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d)))
    sc = cfg.rope_scaling
    if sc is None:
        return inv.astype(np.float32)
    low_wavelen = sc.original_max_position / sc.low_freq_factor
    high_wavelen = sc.original_max_position / sc.high_freq_factor
    wavelen = 2 * np.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / sc.factor, inv)
    smooth = (sc.original_max_position / wavelen - sc.low_freq_factor) / (sc.high_freq_factor - sc.low_freq_factor)
    smoothed = (1 - smooth) * scaled / sc.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(cfg: ModelConfig, positions):
    """positions [B, T] -> (cos, sin) [B, T, D] in the half-split layout of HF's rotate_half."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(cfg))
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
    """x [B, T, heads, D]; cos/sin [B, T, D]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = x.astype(jnp.float32) * cos[:, :, None] + rotated.astype(jnp.float32) * sin[:, :, None]
    return out.astype(x.dtype)


def resolve_attention(cfg: ModelConfig, dtype) -> str:
    """`cfg.attention_impl`, with "auto" made concrete: cudnn on an NVIDIA GPU for bfloat16/float16 and head
    dims it supports (a multiple of 8, at most 128), xla otherwise."""
    if cfg.attention_impl != "auto":
        return cfg.attention_impl
    fused = (jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
             and cfg.head_dim % 8 == 0 and cfg.head_dim <= 128)
    return "cudnn" if fused else "xla"


def attention(q, k, v, mask, impl: str = "einsum", *, causal: bool = False, kv_lengths=None):
    """Grouped-query attention. q [B, T, H, D]; k, v [B, S, K, D]; mask [B, T, S] -> [B, T, H, D].

    Query head h reads KV head h // (H / K). `mask` says which keys each query sees (every impl agrees with it).
    `causal` (top-left aligned, static) and `kv_lengths` [B] (keys s < kv_lengths[b] are valid) describe the same
    mask structurally, when the caller knows it is exactly `causal & (s < kv_lengths)`: cudnn then runs on them
    alone; without them it falls back to the dense mask (as an additive bias). Rows with no visible key give zeros
    on einsum and xla.
    """
    if impl == "einsum":
        return _einsum_attention(q, k, v, mask)
    if impl == "xla":
        out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="xla")
        return jnp.where(mask.any(-1)[:, :, None, None], out, 0).astype(q.dtype)
    if impl == "cudnn":
        if causal or kv_lengths is not None:
            lengths = None if kv_lengths is None else jnp.maximum(kv_lengths, 1).astype(jnp.int32)  # 0 would NaN
            return jax.nn.dot_product_attention(q, k, v, is_causal=causal, key_value_seq_lengths=lengths,
                                                implementation="cudnn")
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="cudnn")
    raise ValueError(f"attention impl {impl!r}; valid: einsum, xla, cudnn (or auto in the config)")


def _einsum_attention(q, k, v, mask):
    """The reference: scores [B, K, H/K, T, S] in float32, masked softmax, probabilities @ v."""
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, h // kv_heads, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) / np.sqrt(d)
    logits = jnp.where(mask[:, None, None], logits, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.where(mask.any(-1)[:, None, None, :, None], probs, 0.0).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, d)


def mlp(x, p):
    """SwiGLU. x [B, T, embed]."""
    gate = jnp.einsum("bte,ef->btf", x, p["w_gate"])
    up = jnp.einsum("bte,ef->btf", x, p["w_up"])
    return jnp.einsum("btf,fe->bte", jax.nn.silu(gate) * up, p["w_down"])


def qkv(x, p, cos, sin):
    q = apply_rope(jnp.einsum("bte,ehd->bthd", x, p["wq"]), cos, sin)
    k = apply_rope(jnp.einsum("bte,ekd->btkd", x, p["wk"]), cos, sin)
    v = jnp.einsum("bte,ekd->btkd", x, p["wv"])
    return q, k, v


def block(x, p, cfg: ModelConfig, cos, sin, mask, kv=None, *, causal: bool = False, kv_lengths=None,
          fresh: bool = False):
    """One Llama block (decoder layer or encoder block). x [B, T, embed].

    Without `kv`, attention is over the T tokens themselves under `mask` [B, T, T].
    With `kv` = (cache_k, cache_v, slots [B, T]): the new keys/values are written into the layer's cache
    [B, M, K, D] at `slots` and attention reads the whole cache under `mask` [B, T, M] -- or, when `fresh` (the
    cache was empty and slots are 0..T-1), only the T new keys under `mask` [B, T, T], which is the same attention.
    `causal` / `kv_lengths`: the structure of `mask`, see `attention`.
    Returns (x, (cache_k, cache_v) or None).
    """
    h = rms_norm(x, p["attn_norm"], cfg.rms_eps)
    q, k, v = qkv(h, p, cos, sin)
    if kv is not None:
        cache_k, cache_v, slots = kv
        rows = jnp.arange(x.shape[0])[:, None]
        cache_k = cache_k.at[rows, slots].set(k.astype(cache_k.dtype), mode="drop")
        cache_v = cache_v.at[rows, slots].set(v.astype(cache_v.dtype), mode="drop")
        if not fresh:
            k, v = cache_k.astype(q.dtype), cache_v.astype(q.dtype)
        kv = (cache_k, cache_v)
    attn = attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, resolve_attention(cfg, q.dtype), causal=causal,
                     kv_lengths=kv_lengths)
    x = x + jnp.einsum("bthd,hde->bte", attn, p["wo"])
    x = x + mlp(rms_norm(x, p["mlp_norm"], cfg.rms_eps), p)
    return x, kv


def cross_context(params, picache: PICache | CrossContext, cfg: ModelConfig, dtype=jnp.float32) -> CrossContext:
    """Apply every cross block's k_norm to its PICache keys (stored before k_norm) and cast to `dtype`.

    For cudnn attention the valid tokens of each row are moved to the front (cross-attention has no positions, so
    the order of keys does not matter): the mask becomes `arange(C) < lengths`, which cudnn takes as key lengths.
    """
    if isinstance(picache, CrossContext):
        return picache
    k_norm = params["comb"]["cross"]["k_norm"].astype(dtype)[:, None, None, None, :]  # [E, 1, 1, 1, D]
    k = rms_norm(picache.k.astype(dtype), k_norm, cfg.rms_eps)
    v, mask = picache.v.astype(dtype), picache.mask
    if resolve_attention(cfg, dtype) == "cudnn":
        order = jnp.argsort(~mask, axis=-1, stable=True)  # [B, C]: valid tokens first, in their order
        k, v = (jnp.take_along_axis(a, order[None, :, :, None, None], axis=2) for a in (k, v))
        mask = jnp.take_along_axis(mask, order, axis=-1)
    return CrossContext(k, v, mask)


def cross_block(x, p, cfg: ModelConfig, ctx_k, ctx_v, ctx_mask):
    """Gated cross-attention, no positions, no causal mask. x [B, T, embed]; ctx_k/v [B, C, K, D]; mask [B, C].

    ctx_k is already normalised by this block's k_norm (see `cross_context`). Rows whose request has no context
    are passed through unchanged (the block is skipped for them). For cudnn the valid tokens come first (as
    `cross_context` lays them out), so the mask is given as key lengths.
    """
    h = rms_norm(x, p["attn_norm"], cfg.rms_eps)
    q = rms_norm(jnp.einsum("bte,ehd->bthd", h, p["wq"]), p["q_norm"], cfg.rms_eps)
    mask = jnp.broadcast_to(ctx_mask[:, None, :], (x.shape[0], x.shape[1], ctx_mask.shape[-1]))
    attn = attention(q, ctx_k.astype(q.dtype), ctx_v.astype(q.dtype), mask, resolve_attention(cfg, q.dtype),
                     kv_lengths=ctx_mask.sum(-1))
    has_ctx = ctx_mask.any(-1)[:, None, None]
    gate_attn = jnp.tanh(p["gate_attn"]).astype(x.dtype)
    x = x + jnp.where(has_ctx, gate_attn * jnp.einsum("bthd,hde->bte", attn, p["wo"]), 0)
    gate_mlp = jnp.tanh(p["gate_mlp"]).astype(x.dtype)
    x = x + jnp.where(has_ctx, gate_mlp * mlp(rms_norm(x, p["mlp_norm"], cfg.rms_eps), p), 0)
    return x


def cast(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


# ----------------------------------------------------------------------------------------------------------
# Encoder


def encode(params, tokens, mask, cfg: ModelConfig, dtype=jnp.float32, remat: bool = False,
           context_states=None) -> PICache:
    """Encode chunks independently. tokens, mask: [B, L] (one chunk per row) -> PICache [E, B, L, K, D].

    The embedding is the backbone's (frozen; its own `encoder_embed` when the model has one); attention is
    bidirectional under the key-padding mask. Chunks are right-padded (each row's mask is a prefix): cudnn attention
    is given the mask as key lengths. `context_states` [B, L, embed]: `chunk_context_states` of the same chunks,
    precomputed (training's frozen-feature cache); computed here when None.
    """
    embed = params["backbone"].get("encoder_embed", params["backbone"]["embed"])
    enc = cast(params["comb"]["encoder"], dtype)
    x = embed[tokens].astype(dtype)
    cos, sin = _rope_from_zero(cfg, tokens)
    attn_mask = jnp.broadcast_to(mask[:, None, :], (tokens.shape[0], tokens.shape[1], tokens.shape[1]))

    kv_lengths = mask.sum(-1)

    def body(x, p):
        layer, k_proj, v_proj = p
        x, _ = block(x, layer, cfg, cos, sin, attn_mask, kv_lengths=kv_lengths)
        k = jnp.einsum("ble,ekd->blkd", x, k_proj)
        v = jnp.einsum("ble,ekd->blkd", x, v_proj)
        return x, (k, v)

    if remat:  # training: recompute each block's activations in the backward pass
        body = jax.checkpoint(body)
    _, (k, v) = jax.lax.scan(body, x, (enc["layers"], enc["k_proj"], enc["v_proj"]))
    if cfg.context_layer:
        states = (chunk_context_states(params["backbone"], tokens, cfg, dtype) if context_states is None
                  else context_states.astype(dtype))
        k = k + jnp.einsum("ble,nekd->nblkd", states, enc["context_k_proj"])
        v = v + jnp.einsum("ble,nekd->nblkd", states, enc["context_v_proj"])
    return PICache(k, v, mask.astype(bool))


def _rope_from_zero(cfg: ModelConfig, tokens):
    """RoPE tables for tokens [B, T] at positions 0..T-1 (a chunk alone, or a decoder row without a cache)."""
    return rope_tables(cfg, jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape))


def chunk_context_states(backbone, tokens, cfg: ModelConfig, dtype=jnp.float32):
    """The context path's input: the backbone's first `context_layer` layers over each chunk alone (causal,
    positions 0..L-1, the encoder's embedding). tokens [B, L] right-padded -> [B, L, embed]; frozen weights only."""
    embed = backbone.get("encoder_embed", backbone["embed"])
    cos, sin = _rope_from_zero(cfg, tokens)
    return backbone_layers(backbone, embed[tokens].astype(dtype), cfg, cos, sin, cfg.context_layer, dtype)


def first_cross_input(backbone, tokens, cfg: ModelConfig, dtype=jnp.float32):
    """The decoder's residual stream where the first cross block reads it: the backbone's layers 0..c_0-1 over
    tokens [B, T] at positions 0..T-1 -> [B, T, embed]. Frozen weights only, so training may cache it
    (`forward_with_taps(first_states=...)`)."""
    cos, sin = _rope_from_zero(cfg, tokens)
    return backbone_layers(backbone, backbone["embed"][tokens].astype(dtype), cfg, cos, sin, cfg.cross_layers[0],
                           dtype)


def backbone_layers(backbone, x, cfg: ModelConfig, cos, sin, count: int, dtype):
    """The backbone's first `count` layers, causal, no cache: x [B, T, embed] -> [B, T, embed]."""
    layers = cast(jax.tree.map(lambda a: a[:count], backbone["layers"]), dtype)
    b, t = x.shape[:2]
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
    step = lambda x, layer: (block(x, layer, cfg, cos, sin, mask, causal=True)[0], None)
    return jax.lax.scan(step, x, layers)[0]


def concat_picaches(caches: list[PICache]) -> PICache:
    """Concatenate PICaches along the context axis (several chunks of the same requests)."""
    return PICache(
        jnp.concatenate([c.k for c in caches], axis=2),
        jnp.concatenate([c.v for c in caches], axis=2),
        jnp.concatenate([c.mask for c in caches], axis=1),
    )


# ----------------------------------------------------------------------------------------------------------
# Decoder


def forward(params, tokens, cfg: ModelConfig, picache: PICache | CrossContext | None = None,
            kv_cache: KVCache | None = None,
            lengths=None, dtype=jnp.float32, remat: bool = False, fresh_cache: bool = False):
    """Decoder forward. tokens [B, T] -> (hidden [B, T, embed] after the final norm, updated KVCache or None).

    Without `kv_cache`: positions 0..T-1 and causal attention over the tokens (training, reference).
    With `kv_cache`: row b's tokens take positions lengths_b .. lengths_b + T - 1 of its cache; `lengths` [B]
    (default T) says how many of the T tokens are real, and the cache's lengths advance by it. Right padding
    is harmless: a padded slot is past every real query and is overwritten by the next real token.
    `picache=None` (or a row whose mask is all false) skips the cross blocks: the plain backbone. A
    `CrossContext` (see `cross_context`) is used as it is; a `PICache` is prepared here.
    `fresh_cache=True` promises that `kv_cache` is empty (lengths 0, a prefill): self-attention then reads the T new
    tokens causally instead of the whole cache, which cudnn runs as flash attention.
    """
    x, new_cache, _ = _decoder(params, tokens, cfg, picache, kv_cache, lengths, dtype, remat, taps=False,
                               fresh_cache=fresh_cache)
    return x, new_cache


def forward_with_taps(params, tokens, cfg: ModelConfig, picache: PICache | CrossContext | None = None,
                      dtype=jnp.float32, remat: bool = False, first_states=None):
    """`forward` without a KV cache that also returns the residual stream where each cross block writes.

    tokens [B, T] -> (hidden [B, T, embed], taps [E, B, T, embed]): taps[k] is the input of decoder layer c_k,
    after cross block k when there is a PICache. With `picache=None` they are the plain backbone's states at the
    same depths: the targets of hidden-state distillation (see `training.loss_fn`). `first_states` [B, T, embed]:
    `first_cross_input(tokens)` precomputed; the decoder then starts at the first cross block.
    """
    x, _, taps = _decoder(params, tokens, cfg, picache, None, None, dtype, remat, taps=True, first_group_apart=True,
                          first_states=first_states)
    return x, taps


def _decoder(params, tokens, cfg, picache, kv_cache, lengths, dtype, remat, taps: bool, fresh_cache: bool = False,
             first_group_apart: bool = False, first_states=None):
    bb = cast({k: v for k, v in params["backbone"].items() if k not in ("embed", "encoder_embed")}, dtype)
    x = params["backbone"]["embed"][tokens].astype(dtype) if first_states is None else first_states.astype(dtype)
    b, t = tokens.shape
    offsets = jnp.zeros((b,), jnp.int32) if kv_cache is None else kv_cache.lengths
    positions = offsets[:, None] + jnp.arange(t)[None, :]
    cos, sin = rope_tables(cfg, positions)
    # the self-attention mask and its structure (see `attention`)
    causal, kv_lengths = False, None
    if kv_cache is None or fresh_cache:
        mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
        causal = True
    else:
        mask = jnp.arange(kv_cache.k.shape[2])[None, None, :] <= positions[:, :, None]
        if t == 1:  # a decode step: every slot up to its own position
            kv_lengths = positions[:, 0] + 1

    def layer_step(carry, layer_and_index):
        x, cache = carry
        layer, i = layer_and_index
        kv = None if cache is None else (cache[0][i], cache[1][i], positions)
        x, kv = block(x, layer, cfg, cos, sin, mask, kv, causal=causal, kv_lengths=kv_lengths,
                      fresh=fresh_cache and cache is not None)
        if cache is not None:
            cache = (cache[0].at[i].set(kv[0]), cache[1].at[i].set(kv[1]))
        return (x, cache), None

    if remat:
        layer_step = jax.checkpoint(layer_step)
    layers = bb["layers"]
    index = jnp.arange(cfg.num_layers)
    cache = None if kv_cache is None else (kv_cache.k, kv_cache.v)

    # one structure with or without a PICache, so that a row without context is the backbone bit for bit
    e, s = cfg.num_cross_layers, cfg.cross_stride
    grouped = jax.tree.map(lambda a: a.reshape(e, s, *a.shape[1:]), (layers, index))
    if picache is None:
        cross = ctx = None
        per_group = (grouped,)
    else:
        cross = cast(params["comb"]["cross"], dtype)
        ctx = cross_context(params, picache, cfg, dtype)
        per_group = (grouped, cross, ctx.k, ctx.v)

    def group_step(carry, xs, skip_head: bool = False):
        group = xs[0]
        head = jax.tree.map(lambda a: a[: s - 1], group)
        tail = jax.tree.map(lambda a: a[s - 1], group)
        if not skip_head:  # skipped when the carry already holds the head's output (`first_states`)
            carry, _ = jax.lax.scan(layer_step, carry, head)
        x, cache = carry
        if ctx is not None:
            x = cross_block(x, xs[1], cfg, xs[2], xs[3], ctx.mask)
        carry, _ = layer_step((x, cache), tail)
        return carry, (x if taps else None)

    if first_group_apart:
        # training (`forward_with_taps`): group 0 outside the scan: its first c_0 layers read no trainable weight,
        # so nothing below the first cross block is differentiated (in a scan the carry would take them into the
        # backward pass). Inference scans every group: a program with one group body, half the compile.
        carry, first = group_step((x, cache), jax.tree.map(lambda a: a[0], per_group),
                                  skip_head=first_states is not None)
        tapped = None if first is None else first[None]
        if e > 1:
            carry, rest = jax.lax.scan(group_step, carry, jax.tree.map(lambda a: a[1:], per_group))
            tapped = None if rest is None else jnp.concatenate([tapped, rest])
    else:
        if first_states is not None:
            raise ValueError("first_states needs first_group_apart (forward_with_taps)")
        carry, tapped = jax.lax.scan(group_step, (x, cache), per_group)
    x, cache = carry

    x = rms_norm(x, bb["final_norm"], cfg.rms_eps).astype(dtype)
    new_cache = None
    if kv_cache is not None:
        advance = jnp.full((b,), t, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
        new_cache = KVCache(cache[0], cache[1], kv_cache.lengths + advance)
    return x, new_cache, tapped


def lm_logits(params, hidden):
    """hidden [B, T, embed] -> float32 logits [B, T, vocab] (tied or untied head)."""
    bb = params["backbone"]
    if "lm_head" in bb:
        return jnp.einsum("bte,ev->btv", hidden, bb["lm_head"].astype(hidden.dtype),
                          preferred_element_type=jnp.float32)
    return jnp.einsum("bte,ve->btv", hidden, bb["embed"].astype(hidden.dtype), preferred_element_type=jnp.float32)

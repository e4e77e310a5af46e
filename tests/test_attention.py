"""Attention implementations (model.attention_impl): the einsum reference against jax.nn.dot_product_attention.

cuDNN cannot run on CPU, so its inputs are checked instead: an emulation that builds the mask from the structure
alone (causal, key lengths: all cuDNN is given) must give the reference's outputs through every caller, including
the cross blocks' compacted context.
"""

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from comb_jax.model import transformer as model
from comb_jax.model.decode import generate
from comb_jax.model.transformer import (
    PICache,
    attention,
    concat_picaches,
    cross_context,
    encode,
    forward,
    init_kv_cache,
    lm_logits,
    resolve_attention,
)


def with_impl(cfg, impl):
    return dataclasses.replace(cfg, attention_impl=impl)


def test_xla_attention_equals_einsum_with_gqa_and_masks():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(3, 5, 6, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(3, 7, 2, 8)), jnp.float32) for _ in range(2))
    mask = jnp.asarray(rng.random((3, 5, 7)) < 0.6).at[1, 2].set(False)  # one query sees nothing
    ref = attention(q, k, v, mask, "einsum")
    got = attention(q, k, v, mask, "xla")
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5)
    assert np.all(np.asarray(got[1, 2]) == 0)


def test_auto_is_xla_on_cpu_and_validated(tiny_cfg):
    assert resolve_attention(tiny_cfg.model, jnp.bfloat16) == "xla"  # cudnn only on a GPU
    assert resolve_attention(with_impl(tiny_cfg.model, "einsum"), jnp.float32) == "einsum"
    from comb_jax.config import ConfigError, load_config

    assert load_config("tiny_comb", ["model.attention_impl=cudnn"]).model.attention_impl == "cudnn"
    with pytest.raises(ConfigError, match="attention_impl"):
        load_config("tiny_comb", ["model.attention_impl=flash"])


def _chunks_cache(params, cfg, rows, lengths=(6, 4), pad=3, seed=9):
    """PICache of two right-padded chunks per row: the context has holes, as the pool's page tails give."""
    rng = np.random.default_rng(seed)
    parts = []
    for n in lengths:
        tokens = rng.integers(1, 256, size=(rows, n + pad))
        mask = np.arange(n + pad)[None, :] < n
        parts.append(encode(params, jnp.asarray(tokens), jnp.asarray(np.repeat(mask, rows, 0)), cfg))
    return concat_picaches(parts)


@partial(jax.jit, static_argnames=("cfg",))
def _logits_both_ways(params, picache, tokens, *, cfg):
    """Logits of a no-cache forward, and of a prefill (fresh cache) of 9 tokens + one decode step per token after."""
    full = lm_logits(params, forward(params, tokens, cfg, picache)[0])
    cache = init_kv_cache(cfg, tokens.shape[0], 32)
    hidden, cache = forward(params, tokens[:, :9], cfg, picache, cache, fresh_cache=True)
    steps = [lm_logits(params, hidden)]
    for t in range(9, tokens.shape[1]):
        hidden, cache = forward(params, tokens[:, t:t + 1], cfg, picache, cache)
        steps.append(lm_logits(params, hidden))
    return full, jnp.concatenate(steps, 1)


def _everything(params, cfg, picache, tokens):
    """(no-cache logits, prefill + decode logits, generated tokens)."""
    full, steps = _logits_both_ways(params, picache, tokens, cfg=cfg)
    out, _ = generate(params, tokens, jnp.full((tokens.shape[0],), tokens.shape[1]), picache, cfg, max_new_tokens=5)
    return np.asarray(full), np.asarray(steps), np.asarray(out)


TOKENS = np.random.default_rng(1).integers(0, 256, (2, 13))


@pytest.fixture(scope="module")
def reference(tiny_cfg, tiny_params):
    """The einsum path's results (computed once for the tests below)."""
    cfg = with_impl(tiny_cfg.model, "einsum")
    picache = _chunks_cache(tiny_params, cfg, 2)
    full, steps, out = _everything(tiny_params, cfg, picache, jnp.asarray(TOKENS))
    np.testing.assert_allclose(steps, full, atol=1e-4)  # prefill (fresh cache) + decode == one forward
    return picache, (full, steps, out)


def test_model_with_xla_attention_equals_einsum(tiny_cfg, tiny_params, reference):
    cfg = with_impl(tiny_cfg.model, "xla")
    got = _everything(tiny_params, cfg, _chunks_cache(tiny_params, cfg, 2), jnp.asarray(TOKENS))
    for a, b in zip(got[:2], reference[1][:2]):
        np.testing.assert_allclose(a, b, atol=1e-4)
    np.testing.assert_array_equal(got[2], reference[1][2])


def _structure_only_attention(q, k, v, mask, impl="einsum", *, causal=False, kv_lengths=None):
    """What cuDNN computes: the mask rebuilt from causal / kv_lengths alone (the dense one only without them)."""
    if impl == "cudnn" and (causal or kv_lengths is not None):
        t, s = q.shape[1], k.shape[1]
        structural = jnp.ones((q.shape[0], t, s), bool)
        if causal:
            structural &= jnp.tril(jnp.ones((t, s), bool))
        if kv_lengths is not None:
            structural &= jnp.arange(s)[None, None, :] < jnp.maximum(kv_lengths, 1)[:, None, None]
        mask = structural
    return model._einsum_attention(q, k, v, mask)


def test_cudnn_structure_describes_the_same_masks(tiny_cfg, tiny_params, reference, monkeypatch):
    """Every caller's causal / key-length description equals its dense mask (cross: after compaction)."""
    tokens = jnp.asarray(TOKENS)
    ref_encoded, ref = reference
    monkeypatch.setattr(model, "attention", _structure_only_attention)
    cudnn_cfg = with_impl(tiny_cfg.model, "cudnn")
    picache = _chunks_cache(tiny_params, cudnn_cfg, 2)
    valid = np.asarray(picache.mask)
    for a, b in ((picache.k, ref_encoded.k), (picache.v, ref_encoded.v)):  # padded tokens are never read
        np.testing.assert_allclose(np.asarray(a)[:, valid], np.asarray(b)[:, valid], atol=1e-5)
    ctx = cross_context(tiny_params, picache, cudnn_cfg)
    lengths = valid.sum(-1)
    assert np.array_equal(np.asarray(ctx.mask), np.arange(valid.shape[1])[None] < lengths[:, None])
    got = _everything(tiny_params, cudnn_cfg, ctx, tokens)
    for a, b in zip(got[:2], ref[:2]):
        np.testing.assert_allclose(a, b, atol=1e-4)
    np.testing.assert_array_equal(got[2], ref[2])
    # a row without context still reads nothing (its key length is clamped to 1 for cudnn, the block is skipped)
    empty = PICache(picache.k, picache.v, picache.mask.at[1].set(False))
    mixed = np.asarray(lm_logits(tiny_params, forward(tiny_params, tokens, cudnn_cfg, empty)[0]))
    plain = np.asarray(lm_logits(tiny_params, forward(tiny_params, tokens, cudnn_cfg)[0]))
    np.testing.assert_allclose(mixed[1], plain[1], atol=1e-5)


def test_xla_attention_gradients_equal_einsum():
    """Training runs through the same path: its gradients are the reference's."""
    rng = np.random.default_rng(4)
    q = jnp.asarray(rng.normal(size=(2, 6, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 9, 2, 8)), jnp.float32) for _ in range(2))
    mask = jnp.asarray(rng.random((2, 6, 9)) < 0.7).at[0, 1].set(False)
    weights = jnp.asarray(rng.normal(size=(2, 6, 4, 8)), jnp.float32)

    def loss(q, k, v, impl):
        return jnp.sum(attention(q, k, v, mask, impl) * weights)

    grads = [jax.grad(loss, argnums=(0, 1, 2))(q, k, v, impl) for impl in ("einsum", "xla")]
    for a, b in zip(*grads):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)

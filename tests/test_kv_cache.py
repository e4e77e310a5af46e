"""KV-cached prefill then single-token decode steps give the logits of one full forward."""

import jax.numpy as jnp
import numpy as np

from comb_jax.model.transformer import PICache, concat_picaches, encode, forward, init_kv_cache, lm_logits


def _full_logits(params, cfg, tokens, picache):
    hidden, _ = forward(params, jnp.asarray(tokens), cfg.model, picache=picache)
    return np.asarray(lm_logits(params, hidden))


def _picache(params, cfg, rows):
    rng = np.random.default_rng(9)
    chunks = [rng.integers(1, 256, size=(rows, n)) for n in (6, 4)]
    return concat_picaches([encode(params, jnp.asarray(c), jnp.ones(c.shape, bool), cfg.model) for c in chunks])


def test_prefill_then_decode_equals_full_forward(tiny_cfg, tiny_params):
    cfg = tiny_cfg.model
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, size=(2, 14))
    for picache in (None, _picache(tiny_params, tiny_cfg, 2)):
        full = _full_logits(tiny_params, tiny_cfg, tokens, picache)
        cache = init_kv_cache(cfg, 2, 32)
        hidden, cache = forward(tiny_params, jnp.asarray(tokens[:, :10]), cfg, picache, cache)
        steps = [np.asarray(lm_logits(tiny_params, hidden))]
        for t in range(10, 14):
            hidden, cache = forward(tiny_params, jnp.asarray(tokens[:, t : t + 1]), cfg, picache, cache)
            steps.append(np.asarray(lm_logits(tiny_params, hidden)))
        np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(np.asarray(cache.lengths), [14, 14])


def test_right_padded_prefill_rows_of_different_lengths(tiny_cfg, tiny_params):
    """Row 1's prompt is shorter; its padding is overwritten by its decode steps and never attended to."""
    cfg = tiny_cfg.model
    rng = np.random.default_rng(1)
    long_row, short_row = rng.integers(0, 256, size=12), rng.integers(0, 256, size=7)
    picache = _picache(tiny_params, tiny_cfg, 2)
    prompt = np.zeros((2, 12), np.int64)
    prompt[0], prompt[1, :7] = long_row, short_row
    prompt[1, 7:] = 99  # garbage padding
    cache = init_kv_cache(cfg, 2, 24)
    hidden, cache = forward(tiny_params, jnp.asarray(prompt), cfg, picache, cache, lengths=jnp.asarray([12, 7]))
    np.testing.assert_array_equal(np.asarray(cache.lengths), [12, 7])
    nxt = np.array([[5], [17]])
    hidden, cache = forward(tiny_params, jnp.asarray(nxt), cfg, picache, cache)
    step = np.asarray(lm_logits(tiny_params, hidden))[:, 0]
    for row, seq in enumerate([np.append(long_row, 5), np.append(short_row, 17)]):
        row_cache = PICache(picache.k[:, row : row + 1], picache.v[:, row : row + 1], picache.mask[row : row + 1])
        one = _full_logits(tiny_params, tiny_cfg, seq[None], row_cache)
        np.testing.assert_allclose(step[row], one[0, -1], atol=1e-5, rtol=0)

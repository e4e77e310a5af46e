"""Comb identities: gates at zero are the backbone, chunk order does not matter, chunks are independent."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from comb_jax.model.layout import init_params, model_layout
from comb_jax.model.transformer import PICache, concat_picaches, encode, forward, lm_logits


def _chunks(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 256, size=(1, n)) for n in lengths]


def _encode_one(params, cfg, tokens):
    return encode(params, jnp.asarray(tokens), jnp.ones(tokens.shape, bool), cfg.model)


def _logits(params, cfg, tokens, picache=None):
    hidden, _ = forward(params, jnp.asarray(tokens), cfg.model, picache=picache)
    return np.asarray(lm_logits(params, hidden))


def test_zero_gates_equal_backbone_exactly(tiny_cfg):
    params = init_params(model_layout(tiny_cfg.model), jax.random.key(3))  # release init: gates 0
    question = np.random.default_rng(1).integers(0, 256, size=(2, 9))
    chunks = _chunks([7, 5])
    picache = concat_picaches([_encode_one(params, tiny_cfg, np.repeat(c, 2, 0)) for c in chunks])
    np.testing.assert_array_equal(_logits(params, tiny_cfg, question, picache), _logits(params, tiny_cfg, question))


def test_nonzero_gates_change_logits(tiny_cfg, tiny_params):
    question = np.random.default_rng(1).integers(0, 256, size=(1, 9))
    picache = _encode_one(tiny_params, tiny_cfg, _chunks([6])[0])
    with_ctx = _logits(tiny_params, tiny_cfg, question, picache)
    without = _logits(tiny_params, tiny_cfg, question)
    assert np.abs(with_ctx - without).max() > 1e-2


def test_row_without_context_is_plain_backbone(tiny_cfg, tiny_params):
    """In a mixed batch, a row whose PICache mask is all false gets exactly the backbone's logits."""
    question = np.random.default_rng(2).integers(0, 256, size=(2, 9))
    pc = _encode_one(tiny_params, tiny_cfg, np.repeat(_chunks([6])[0], 2, 0))
    pc = PICache(pc.k, pc.v, pc.mask.at[1].set(False))
    mixed = _logits(tiny_params, tiny_cfg, question, pc)
    np.testing.assert_array_equal(mixed[1], _logits(tiny_params, tiny_cfg, question[1:])[0])
    assert np.abs(mixed[0] - _logits(tiny_params, tiny_cfg, question[:1])[0]).max() > 1e-2


def test_chunk_order_does_not_change_logits(tiny_cfg, tiny_params):
    question = np.random.default_rng(4).integers(0, 256, size=(1, 11))
    caches = [_encode_one(tiny_params, tiny_cfg, c) for c in _chunks([5, 8, 3])]
    outputs = [_logits(tiny_params, tiny_cfg, question, concat_picaches([caches[i] for i in order]))
               for order in itertools.permutations(range(3))]
    for out in outputs[1:]:
        np.testing.assert_allclose(out, outputs[0], atol=1e-5, rtol=0)
    assert np.abs(outputs[0] - _logits(tiny_params, tiny_cfg, question)).max() > 1e-2


def test_chunk_picache_independent_of_batch_neighbours(tiny_cfg, tiny_params):
    """A chunk encoded alone equals the same chunk encoded in a padded batch with other chunks."""
    a, b, c = _chunks([6, 9, 4], seed=5)
    alone = _encode_one(tiny_params, tiny_cfg, a)
    width = 9
    batch = np.zeros((3, width), np.int64)
    mask = np.zeros((3, width), bool)
    for row, chunk in enumerate([b, a, c]):
        batch[row, : chunk.shape[1]] = chunk[0]
        mask[row, : chunk.shape[1]] = True
    together = encode(tiny_params, jnp.asarray(batch), jnp.asarray(mask), tiny_cfg.model)
    np.testing.assert_allclose(np.asarray(together.k[:, 1, :6]), np.asarray(alone.k[:, 0]), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(together.v[:, 1, :6]), np.asarray(alone.v[:, 0]), atol=1e-5, rtol=0)


def test_padding_in_context_is_ignored(tiny_cfg, tiny_params):
    """Padded (masked) PICache slots do not change the output: buckets are safe."""
    question = np.random.default_rng(6).integers(0, 256, size=(1, 7))
    chunk = _chunks([5], seed=7)[0]
    exact = _encode_one(tiny_params, tiny_cfg, chunk)
    padded_tokens = np.concatenate([chunk, np.full((1, 11), 3)], axis=1)
    padded_mask = np.arange(16)[None] < 5
    padded = encode(tiny_params, jnp.asarray(padded_tokens), jnp.asarray(padded_mask), tiny_cfg.model)
    np.testing.assert_allclose(_logits(tiny_params, tiny_cfg, question, padded),
                               _logits(tiny_params, tiny_cfg, question, exact), atol=1e-5, rtol=0)


def test_an_added_context_path_starts_as_the_same_model(tiny_cfg, tiny_params):
    """`with_context_path` gives a trained Comb zero context projections: with `context_layer` set, its PICaches and
    logits are exactly the ones it had; a nonzero projection then changes them."""
    import dataclasses

    from comb_jax.training.warm_start import with_context_path

    cfg = dataclasses.replace(tiny_cfg, model=dataclasses.replace(tiny_cfg.model, context_layer=2))
    params = dict(tiny_params, comb=with_context_path(cfg, tiny_params["comb"]))
    chunk, question = _chunks([6])[0], np.random.default_rng(4).integers(0, 256, size=(1, 9))
    before = _logits(tiny_params, tiny_cfg, question, _encode_one(tiny_params, tiny_cfg, chunk))
    np.testing.assert_array_equal(_logits(params, cfg, question, _encode_one(params, cfg, chunk)), before)
    encoder = params["comb"]["encoder"]
    moved = dict(params, comb=dict(params["comb"], encoder=dict(encoder, context_k_proj=encoder["k_proj"])))
    assert np.abs(_logits(moved, cfg, question, _encode_one(moved, cfg, chunk)) - before).max() > 1e-4

"""PIC modes on tiny_comb random weights: exact where the maths says so, different where it must be."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from comb_jax.eval.pic_modes import (
    PicRunner,
    assemble,
    attention_similarity,
    chunk_kv,
    context_attention,
    last_layer_attention,
)
from comb_jax.model.buckets import power_of_two as bucket
from comb_jax.model.layout import init_params, model_layout
from comb_jax.model.transformer import block, rope_tables
from comb_jax.text.prompt import Segments

TOL = 1e-5
rng = np.random.default_rng(0)
PREFIX = tuple(int(i) for i in rng.integers(1, 256, 7))
CHUNK_A = tuple(int(i) for i in rng.integers(1, 256, 13))
CHUNK_B = tuple(int(i) for i in rng.integers(1, 256, 11))
CHUNK_C = tuple(int(i) for i in rng.integers(1, 256, 9))
SUFFIX = tuple(int(i) for i in rng.integers(1, 256, 6))
COMB_PROMPT = tuple(int(i) for i in rng.integers(1, 256, 8))


def seg(*chunks, prefix=PREFIX):
    return Segments(prefix, tuple(chunks), SUFFIX, COMB_PROMPT)


@pytest.fixture(scope="module")
def runner(tiny_cfg, tiny_params):
    return PicRunner(tiny_params, tiny_cfg.model, stop_ids=(), max_new_tokens=4, epic_k=4)


def prompt_kv(answer, s):
    """Decoder K/V of the whole prompt [N, T, K, D] after prefill."""
    n = len(s.full)
    return np.asarray(answer.kv_cache.k[:, 0, :n]), np.asarray(answer.kv_cache.v[:, 0, :n])


def assert_same_as_full(runner, s, answer):
    runner.reset()
    full = runner.answer("full", s)
    for got, want in zip(prompt_kv(answer, s), prompt_kv(full, s)):
        np.testing.assert_allclose(got, want, atol=TOL, rtol=TOL)
    np.testing.assert_allclose(answer.last_hidden, full.last_hidden, atol=TOL, rtol=TOL)
    assert answer.tokens == full.tokens


def test_prefix_hit_equals_full_prefill(runner):
    runner.reset()
    s = seg(CHUNK_A, CHUNK_B)
    miss = runner.answer("prefix", s)
    hit = runner.answer("prefix", s)
    assert (miss.chunk_hits, hit.chunk_hits) == (0, 2)
    assert_same_as_full(runner, s, hit)


def test_prefix_hits_only_on_an_identical_prefix(runner):
    runner.reset()
    runner.answer("prefix", seg(CHUNK_A, CHUNK_B, CHUNK_C))
    assert runner.answer("prefix", seg(CHUNK_A, CHUNK_C, CHUNK_B)).chunk_hits == 1  # shared first chunk only
    assert runner.answer("prefix", seg(CHUNK_B, CHUNK_A, CHUNK_C)).chunk_hits == 0
    changed = (CHUNK_A[0] ^ 1,) + CHUNK_A[1:]
    assert runner.answer("prefix", seg(changed, CHUNK_B, CHUNK_C)).chunk_hits == 0


def test_rerotation_equals_computing_the_chunk_at_its_real_position(tiny_cfg, tiny_params):
    """Stored keys (chunk alone at 0..L-1) rotated by o == keys of the chunk computed alone at o..o+L-1."""
    cfg, offset, ids = tiny_cfg.model, 37, CHUNK_A
    k0, v0 = chunk_kv(tiny_params, jnp.asarray([ids]), jnp.int32(len(ids)), cfg=cfg)
    rotated = assemble(k0, v0, jnp.full((len(ids),), offset, jnp.int32), jnp.int32(len(ids)), cfg=cfg,
                       slots=len(ids))
    # independent reference: run the decoder blocks by hand at positions offset.., seeing only the chunk
    n = len(ids)
    positions = offset + jnp.arange(n)[None]
    cos, sin = rope_tables(cfg, positions)
    slots = jnp.arange(n)[None]  # write into a cache of n slots, causal within the chunk
    mask = jnp.tril(jnp.ones((n, n), bool))[None]
    x = tiny_params["backbone"]["embed"][jnp.asarray([ids])]
    for i in range(cfg.num_layers):
        layer = jax.tree.map(lambda a, i=i: a[i], tiny_params["backbone"]["layers"])
        empty = jnp.zeros((1, n, cfg.num_kv_heads, cfg.head_dim))
        x, (k, v) = block(x, layer, cfg, cos, sin, mask, (empty, empty, slots))
        np.testing.assert_allclose(np.asarray(rotated.k[i, 0]), np.asarray(k[0]), atol=TOL, rtol=TOL)
        np.testing.assert_allclose(np.asarray(rotated.v[i, 0]), np.asarray(v[0]), atol=TOL, rtol=TOL)
    # and the rotation is not the identity: naive (unrotated) keys differ
    assert np.abs(np.asarray(k0) - np.asarray(rotated.k[:, 0])).max() > 1e-2


def test_rerotate_of_a_chunk_with_nothing_before_it_equals_full(runner):
    runner.reset()
    s = seg(CHUNK_A, prefix=())
    assert_same_as_full(runner, s, runner.answer("rerotate", s))


def test_epic_recomputing_whole_chunks_equals_full(tiny_cfg, tiny_params):
    runner = PicRunner(tiny_params, tiny_cfg.model, max_new_tokens=4, epic_k=max(map(len, (CHUNK_A, CHUNK_B))))
    s = seg(CHUNK_A, CHUNK_B)
    runner.answer("epic", seg(CHUNK_B, CHUNK_A))  # fill the chunk cache in another order first
    answer = runner.answer("epic", s)
    assert answer.chunk_hits == 2
    assert_same_as_full(runner, s, answer)


def test_naive_and_rerotate_differ_from_full_on_a_second_chunk(runner):
    runner.reset()
    s = seg(CHUNK_A, CHUNK_B)
    full = runner.answer("full", s)
    second = slice(len(PREFIX) + len(CHUNK_A), len(s.context))
    k_full = prompt_kv(full, s)[0][:, second]
    k_naive = prompt_kv(runner.answer("naive", s), s)[0][:, second]
    k_rerotate = prompt_kv(runner.answer("rerotate", s), s)[0][:, second]
    assert np.abs(k_naive - k_full).max() > 1e-2
    assert np.abs(k_rerotate - k_full).max() > 1e-2  # it did not attend to the first chunk
    assert np.abs(k_rerotate - k_naive).max() > 1e-2  # rotated to offset 18, not left at 0


def test_chunk_caches_hit_in_any_order_and_report_their_bytes(runner, tiny_cfg):
    m = tiny_cfg.model
    runner.reset()
    for mode in ("naive", "rerotate", "epic", "comb"):
        assert runner.answer(mode, seg(CHUNK_A, CHUNK_B, CHUNK_C)).chunk_hits == 0
        assert runner.answer(mode, seg(CHUNK_C, CHUNK_A, CHUNK_B)).chunk_hits == 3
    per_layer = 2 * m.num_kv_heads * m.head_dim * 4  # K and V, float32
    assert runner.cache_bytes_per_token("naive") == m.num_layers * per_layer
    assert runner.cache_bytes_per_token("comb") == m.num_cross_layers * per_layer
    assert runner.cache_bytes_per_token("full") == 0


def test_comb_ignores_chunk_order_and_equals_backbone_with_zero_gates(runner, tiny_cfg, tiny_params):
    runner.reset()
    a = runner.answer("comb", seg(CHUNK_A, CHUNK_B, CHUNK_C))
    b = runner.answer("comb", seg(CHUNK_C, CHUNK_B, CHUNK_A))
    np.testing.assert_allclose(a.last_hidden, b.last_hidden, atol=TOL, rtol=TOL)
    no_context = runner.answer("full", Segments((), (), COMB_PROMPT, COMB_PROMPT))
    assert np.abs(a.last_hidden - no_context.last_hidden).max() > 1e-3  # the gates are open: context matters
    fresh = init_params(model_layout(tiny_cfg.model), jax.random.key(1))  # gates 0
    zero_gates = PicRunner({"backbone": tiny_params["backbone"], "comb": fresh["comb"]}, tiny_cfg.model,
                           max_new_tokens=4)
    c = zero_gates.answer("comb", seg(CHUNK_A, CHUNK_B, CHUNK_C))
    np.testing.assert_allclose(c.last_hidden, no_context.last_hidden, atol=TOL, rtol=TOL)
    assert c.tokens == no_context.tokens


def test_attention_similarity(runner, tiny_cfg, tiny_params):
    runner.reset()
    s = seg(CHUNK_A, CHUNK_B)
    full = runner.answer("full", s)
    probs = last_layer_attention(tiny_params, full.kv_cache, jnp.asarray([SUFFIX]), jnp.int32(len(s.context)),
                                 cfg=tiny_cfg.model)
    probs = np.asarray(probs)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    assert np.all(probs[:, :, len(s.full):] == 0)  # causal: nothing past the prompt
    reference = context_attention(runner, s, full)
    assert reference.shape == (len(SUFFIX), tiny_cfg.model.num_heads, len(s.context))
    runner.answer("prefix", s)
    prefix = attention_similarity(context_attention(runner, s, runner.answer("prefix", s)), reference)
    assert prefix == pytest.approx(1.0, abs=1e-6)
    naive = attention_similarity(context_attention(runner, s, runner.answer("naive", s)), reference)
    assert 0.0 < naive < 1 - 1e-4  # tiny random weights attend almost uniformly: close to 1, yet not 1


def test_bucket_and_bad_mode(runner):
    assert [bucket(n) for n in (0, 1, 16, 17, 64, 65)] == [16, 16, 16, 32, 64, 128]
    with pytest.raises(ValueError, match="unknown mode 'fast'"):
        runner.answer("fast", seg(CHUNK_A))

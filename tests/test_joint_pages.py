"""Joint encoding of KV pages: a threshold that fuses nothing is the plain pool, identical pages are stored once
(refcounted), the threshold is the relative distance, and reads of fused chunks return the shared page; the same
for the chunk caches of `PicRunner`, which live in pools too."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from comb_jax.config import MeshConfig
from comb_jax.eval.pic_modes import PicRunner
from comb_jax.model.sharding import make_mesh
from comb_jax.serving.joint_pages import relative_distances
from comb_jax.serving.pool import PagePool, gather_context, gather_tokens
from comb_jax.text.prompt import Segments

PT = 16  # tiny_comb's serve.page_tokens


def make_pool(tiny_cfg, threshold, pages=16, **kwargs):
    serve = dataclasses.replace(tiny_cfg.serve, pool_tokens=pages * tiny_cfg.serve.page_tokens,
                                joint_page_threshold=threshold)
    return PagePool(tiny_cfg.model, serve, "fp", make_mesh(MeshConfig(), jax.devices()[:1]), **kwargs)


def table_chunks(params, tokens, mask, *, cfg, dtype=jnp.float32):
    """A chunk processor whose K/V of each token are rows of params["k"], params["v"] [layers, vocab, K, D]: the
    test decides exactly what every page holds."""
    return params["k"][:, tokens].astype(dtype), params["v"][:, tokens].astype(dtype)


def table_pool(tiny_cfg, threshold):
    return make_pool(tiny_cfg, threshold, layers=2, processor=table_chunks)


def stored(pool, entry):
    """What a read of `entry` gets: k, v [layers, stored tokens, K, D]."""
    k, v = gather_tokens(pool.k, pool.v, jnp.asarray(pool.token_slots(entry))[None])
    return np.asarray(k[:, 0]), np.asarray(v[:, 0])


def ids(seed, n):
    return np.random.default_rng(seed).integers(1, 256, n).tolist()


def store(pool, params, chunks):
    entries = [pool.acquire(c)[0] for c in chunks]
    pool.write(params, entries, batch=2)
    return entries


def dense(pool, entries):
    table, mask = pool.page_table([entries], sum(len(e.pages) for e in entries) * PT)
    k, v, _ = gather_context(pool.k, pool.v, jnp.asarray(table), jnp.asarray(mask))
    return np.asarray(k)[:, 0][:, mask[0]], np.asarray(v)[:, 0][:, mask[0]]


def test_threshold_that_fuses_nothing_is_the_plain_pool(tiny_cfg, tiny_params):
    chunks = [ids(0, 40), ids(1, 16), ids(2, 23)]
    plain, joint = make_pool(tiny_cfg, -1.0), make_pool(tiny_cfg, 0.0)
    plain_entries, joint_entries = store(plain, tiny_params, chunks), store(joint, tiny_params, chunks)
    assert [e.pages for e in joint_entries] == [e.pages for e in plain_entries]
    assert joint.used_pages == plain.used_pages == 3 + 1 + 2 and joint.sharing.fused_pages == 0
    for a, b in zip(dense(plain, plain_entries), dense(joint, joint_entries)):
        np.testing.assert_array_equal(a, b)


def per_token_params(params):
    """Encoder attention outputs zeroed: each token's K/V depend on that token alone, so equal token pages give equal
    pages (with attention every page of a chunk depends on all of it)."""
    enc = params["comb"]["encoder"]
    layers = dict(enc["layers"], wo=jnp.zeros_like(enc["layers"]["wo"]))
    return {**params, "comb": {**params["comb"], "encoder": {**enc, "layers": layers}}}


def test_identical_pages_are_stored_once_and_refcounted(tiny_cfg, tiny_params):
    params = per_token_params(tiny_params)
    shared = ids(5, PT)
    a, b = shared + ids(6, 10), shared + ids(7, PT)  # same first page, different rest
    plain, joint = make_pool(tiny_cfg, -1.0), make_pool(tiny_cfg, 0.0)
    plain_a, plain_b = store(plain, params, [a, b])
    joint_a, joint_b = store(joint, params, [a, b])
    assert joint_b.pages[0] == joint_a.pages[0] and joint_b.pages[1] != joint_a.pages[1]
    assert (plain.used_pages, joint.used_pages) == (4, 3)
    assert joint.sharing.compression([joint_a, joint_b]) == pytest.approx(4 / 3)
    for x, y in zip(dense(plain, [plain_a, plain_b]), dense(joint, [joint_a, joint_b])):
        np.testing.assert_array_equal(x, y)  # reads are exact: the fused page held the same values
    # evicting a keeps the shared page for b; evicting b too frees everything
    for e in (joint_a, joint_b):
        joint.release(e)
    before = dense(joint, [joint_b])
    joint.pin(b)
    joint._evict_until(joint.num_pages)
    assert joint.find(a) is None and joint.used_pages == 2
    for x, y in zip(before, dense(joint, [joint_b])):
        np.testing.assert_array_equal(x, y)
    joint.pin(b, False)
    joint._evict_until(joint.num_pages)
    assert joint.used_pages == 0 and sorted(joint.free) == list(range(joint.num_pages))


def table_params(tiny_cfg, rows):
    """Random K/V rows for tokens 0..63, then rows[token] = (source token, k scale, v offset) for the others."""
    m = tiny_cfg.model
    rng = np.random.default_rng(0)
    k, v = rng.normal(size=(2, 2, m.vocab_size, m.num_kv_heads, m.head_dim)).astype(np.float32)
    for token, (source, scale, offset) in rows.items():
        k[:, token], v[:, token] = k[:, source] * scale, v[:, source] + offset
    return {"k": jnp.asarray(k), "v": jnp.asarray(v)}


def test_threshold_is_the_relative_distance(tiny_cfg):
    rng = np.random.default_rng(0)
    k, v = rng.normal(size=(2, 2, PT, 3, 4)).astype(np.float32)
    eps = 0.01
    near_k = k * (1 + eps)  # v unchanged
    d = relative_distances(near_k, v, k[:, None], v[:, None], PT)
    np.testing.assert_allclose(d, [eps / (1 + eps)], rtol=1e-4)  # ||k eps|| / ||k (1 + eps)||
    # in a pool: chunk b's page is chunk a's with K scaled by 1 + eps
    a, b = list(range(PT)), list(range(64, 64 + PT))
    params = table_params(tiny_cfg, {64 + i: (i, 1 + eps, 0.0) for i in range(PT)})
    for threshold, fused in ((2 * eps, True), (eps / 2, False)):
        pool = table_pool(tiny_cfg, threshold)
        entry_a, entry_b = store(pool, params, [a, b])
        assert (entry_b.pages == entry_a.pages) == fused and pool.used_pages == (1 if fused else 2)
        assert pool.sharing.compression([entry_a, entry_b]) == (2.0 if fused else 1.0)
        got_k, got_v = stored(pool, entry_b)
        want_a, want_b = stored(pool, entry_a)[0], np.asarray(params["k"][:, 64:64 + PT])
        np.testing.assert_array_equal(got_k, want_a if fused else want_b)  # a fused page reads the stored page
        np.testing.assert_array_equal(got_v, np.asarray(params["v"][:, :PT]))


def test_partial_pages_compare_their_valid_tokens_only(tiny_cfg):
    long, short, other = list(range(2 * PT)), list(range(64, 64 + PT + 5)), list(range(128, 128 + PT))
    rows = {64 + i: (i, 1.0, 0.0) for i in range(PT + 5)}  # short = long's first PT + 5 tokens
    rows.update({128 + i: (i, 1.0, 1.0) for i in range(PT)})  # other: long's first page, values + 1
    params = table_params(tiny_cfg, rows)
    pool = table_pool(tiny_cfg, 0.0)
    entry_long, entry_short = store(pool, params, [long, short])  # both of short's pages fuse
    assert pool.used_pages == 2 and entry_short.pages == entry_long.pages
    for got, want in zip(stored(pool, entry_short), stored(pool, entry_long)):
        np.testing.assert_array_equal(got, want[:, : PT + 5])
    store(pool, params, [other])  # values differ: not fused
    assert pool.used_pages == 3


def test_runner_joint_pages_fuse_a_shared_causal_prefix_page_and_answer_as_before(tiny_cfg, tiny_params):
    """The backbone's own chunk KV is causal: chunks that start with the same page-aligned tokens store that page
    once; the answers do not change."""
    shared = tuple(ids(8, PT))
    chunks = (shared + tuple(ids(9, 7)), shared + tuple(ids(10, 12)), tuple(ids(11, 9)))
    seg = Segments(tuple(ids(12, 5)), chunks, tuple(ids(13, 6)), tuple(ids(14, 6)))
    plain = PicRunner(tiny_params, tiny_cfg.model, max_new_tokens=4)
    joint = PicRunner(tiny_params, tiny_cfg.model, max_new_tokens=4, joint_threshold=0.0, joint_page_tokens=PT)
    for mode in ("naive", "rerotate"):
        a, b = plain.answer(mode, seg), joint.answer(mode, seg)
        assert a.tokens == b.tokens
        np.testing.assert_array_equal(a.last_hidden, b.last_hidden)
        # prefix 1 page + chunks 2 + 2 + 1: 6 logical pages, the shared first page stored once
        assert plain.page_compression(mode) is None and joint.page_compression(mode) == pytest.approx(6 / 5)
        assert joint.cache_bytes_per_token(mode) < plain.cache_bytes_per_token(mode)
    comb_joint = PicRunner(tiny_params, tiny_cfg.model, max_new_tokens=4, joint_threshold=0.0, joint_page_tokens=PT)
    assert comb_joint.answer("comb", seg).tokens == plain.answer("comb", seg).tokens
    assert comb_joint.page_compression("comb") == 1.0  # bidirectional encoder: no page is repeated


def test_eval_threshold_argument():
    from comb_jax.eval.harness import _thresholds

    assert _thresholds("0.4") == 0.4 and _thresholds("-1") == -1.0
    assert _thresholds("naive=1.15,comb=0.45") == {"naive": 1.15, "comb": 0.45}

"""PagePool over other pages than Comb PICaches: backbone KV (naive / rerotate / epic) and KV packets, and PicRunner
keeping every mode's chunk caches in pools: what the pools hold is exactly what the per-chunk functions compute,
answers do not change, and joint encoding that fuses nothing changes nothing."""

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from comb_jax.config import MeshConfig
from comb_jax.eval.pic_modes import PicRunner, _pad, assemble, chunk_kv
from comb_jax.methods import kvpacket
from comb_jax.methods.naive import backbone_chunks
from comb_jax.model.buckets import power_of_two as bucket
from comb_jax.model.sharding import make_mesh
from comb_jax.model.transformer import encode
from comb_jax.serving import quant
from comb_jax.serving.pool import PagePool, gather_tokens
from comb_jax.text.prompt import Segments

rng = np.random.default_rng(7)
PREFIX = tuple(int(i) for i in rng.integers(1, 256, 7))
CHUNKS = tuple(tuple(int(i) for i in rng.integers(1, 256, n)) for n in (13, 16, 23))
SUFFIX = tuple(int(i) for i in rng.integers(1, 256, 6))


def seg(chunks=CHUNKS):
    return Segments(PREFIX, tuple(chunks), SUFFIX, SUFFIX)


def with_adapter(params, p):
    adapter = kvpacket.init_kvpacket(params["backbone"], p, key=jax.random.key(0), noise=1.0)
    return {**params, "kvpacket": jax.tree.map(jnp.asarray, adapter)}


def make_pool(tiny_cfg, layers, processor, extra_tokens=0, pages=16):
    serve = dataclasses.replace(tiny_cfg.serve, pool_tokens=pages * tiny_cfg.serve.page_tokens)
    return PagePool(tiny_cfg.model, serve, "fp", make_mesh(MeshConfig(), jax.devices()[:1]), layers=layers,
                    processor=processor, extra_tokens=extra_tokens)


def store(pool, params, chunks, batch=1):
    entries = [pool.acquire(c)[0] for c in chunks]
    pool.write(params, entries, batch=batch)
    return entries


def read(pool, entry):
    """k, v [layers, stored tokens, K, D] of one entry, gathered from its pages."""
    k, v = gather_tokens(pool.k, pool.v, jnp.asarray(pool.token_slots(entry))[None])
    return np.asarray(k[:, 0]), np.asarray(v[:, 0])


def reference_kv(params, cfg, ids):
    """`pic_modes.chunk_kv` of one chunk, as the runner computed it before the pools: k, v [N, L, K, D]."""
    k, v = chunk_kv(params, _pad(ids, bucket(len(ids))), jnp.int32(len(ids)), cfg=cfg)
    return np.asarray(k[:, : len(ids)]), np.asarray(v[:, : len(ids)])


def test_backbone_pool_pages_are_chunk_kv_exactly(tiny_cfg, tiny_params):
    m = tiny_cfg.model
    pool = make_pool(tiny_cfg, m.num_layers, backbone_chunks)
    entries = store(pool, tiny_params, CHUNKS)
    assert pool.k.shape == (m.num_layers, pool.num_pages, 16, m.num_kv_heads, m.head_dim)
    assert [len(e.pages) for e in entries] == [1, 1, 2]
    for ids, entry in zip(CHUNKS, entries):
        for got, want in zip(read(pool, entry), reference_kv(tiny_params, m, ids)):
            np.testing.assert_array_equal(got, want)


@partial(jax.jit, static_argnames=("cfg",))
def one_trailer(params, doc_k, doc_v, doc_length, *, cfg):
    """Reference: the trailer K/V behind one document alone. doc_k, doc_v [N, L, K, D]; doc_length [] ->
    k, v [N, P, K, D]."""
    k, v = kvpacket.trailer_kv(params["backbone"], params["kvpacket"], doc_k[:, None], doc_v[:, None],
                               jnp.reshape(doc_length, (1,)), cfg)
    return k[:, 0], v[:, 0]


def test_packet_pool_pages_are_doc_kv_then_trailer(tiny_cfg, tiny_params):
    m, p = tiny_cfg.model, 3
    params = with_adapter(tiny_params, p)
    pool = make_pool(tiny_cfg, m.num_layers, kvpacket.packet_chunks, extra_tokens=p)
    entries = store(pool, params, CHUNKS)
    assert [len(e.pages) for e in entries] == [1, 2, 2]  # 13 + 3 = 16, 16 + 3, 23 + 3 tokens
    batched_pool = make_pool(tiny_cfg, m.num_layers, kvpacket.packet_chunks, extra_tokens=p)
    batched = store(batched_pool, params, CHUNKS[:2] + (CHUNKS[2][:9],), batch=3)  # rows of different lengths
    for i, ids in enumerate(CHUNKS):
        n = len(ids)
        doc_k, doc_v = chunk_kv(params, _pad(ids, bucket(n)), jnp.int32(n), cfg=m)
        tk, tv = one_trailer(params, doc_k, doc_v, jnp.int32(n), cfg=m)
        want = (np.concatenate([np.asarray(doc_k[:, :n]), np.asarray(tk)], 1),
                np.concatenate([np.asarray(doc_v[:, :n]), np.asarray(tv)], 1))
        for got, w in zip(read(pool, entries[i]), want):
            np.testing.assert_array_equal(got, w)
        if i < 2:
            for got, w in zip(read(batched_pool, batched[i]), want):
                np.testing.assert_allclose(got, w, atol=1e-5, rtol=1e-5)


def test_naive_answers_exactly_as_from_chunk_kv(tiny_cfg, tiny_params):
    """The reference assembles the context from `chunk_kv` directly, as the runner did before the pools."""
    m = tiny_cfg.model
    runner = PicRunner(tiny_params, m, max_new_tokens=4)
    for s in (seg(), seg(CHUNKS[::-1]), seg(CHUNKS[:1] * 2)):  # the last one holds one chunk twice
        parts = [reference_kv(tiny_params, m, ids) for ids in (s.prefix,) + s.chunks]
        length = len(s.context)
        width = bucket(length)
        pad = ((0, 0), (0, width - length), (0, 0), (0, 0))
        cache = assemble(jnp.asarray(np.pad(np.concatenate([k for k, _ in parts], 1), pad)),
                         jnp.asarray(np.pad(np.concatenate([v for _, v in parts], 1), pad)),
                         jnp.zeros((width,), jnp.int32), jnp.int32(length), cfg=m, slots=runner._slots(len(s.full)))
        hidden, cache, logits = runner._prefill_rest(cache, s.suffix)
        want = runner._finish(0.0, cache, logits, hidden, None, 0, len(s.chunks), True)
        got = runner.answer("naive", s)
        assert got.tokens == want.tokens
        np.testing.assert_array_equal(got.last_hidden, want.last_hidden)
        for a, b in ((got.kv_cache.k, want.kv_cache.k), (got.kv_cache.v, want.kv_cache.v)):
            np.testing.assert_array_equal(np.asarray(a[:, :, :length]), np.asarray(b[:, :, :length]))
    assert got.chunk_hits == 2  # the repeated chunk: stored by its first occurrence
    assert runner.answer("naive", seg()).chunk_hits == 3


@pytest.mark.parametrize("mode", ["naive", "kvpacket", "comb"])
def test_joint_threshold_that_fuses_nothing_is_the_pool_without_it(tiny_cfg, tiny_params, mode):
    params = with_adapter(tiny_params, 2)
    plain = PicRunner(params, tiny_cfg.model, max_new_tokens=4)
    joint = PicRunner(params, tiny_cfg.model, max_new_tokens=4, joint_threshold={mode: 0.0})
    for s in (seg(), seg(CHUNKS[::-1])):
        a, b = plain.answer(mode, s), joint.answer(mode, s)
        assert a.tokens == b.tokens and a.chunk_hits == b.chunk_hits
        np.testing.assert_array_equal(a.last_hidden, b.last_hidden)
    assert plain.page_compression(mode) is None and joint.page_compression(mode) == 1.0
    assert joint.cache_bytes_per_token(mode) == plain.cache_bytes_per_token(mode) > 0
    for (key, pool), joint_pool in zip(plain.pools.items(), joint.pools.values()):
        assert [e.pages for b in pool.entries.values() for e in b] == [
            e.pages for b in joint_pool.entries.values() for e in b], key


def test_identical_chunks_under_two_keys_store_one_physical_page(tiny_cfg, tiny_params):
    """A backbone pool whose processor ignores token identity beyond the first page's: two different chunks (two
    keys) with the same K/V store their page once under joint encoding, and both read it."""
    m = tiny_cfg.model
    a, b = tuple(range(1, 17)), tuple(range(101, 117))
    embed = np.asarray(tiny_params["backbone"]["embed"]).copy()
    embed[list(b)] = embed[list(a)]  # b's tokens embed as a's: the same K/V from different ids
    params = {**tiny_params, "backbone": {**tiny_params["backbone"], "embed": jnp.asarray(embed)}}
    plain, joint = PicRunner(params, m, max_new_tokens=2), PicRunner(params, m, max_new_tokens=2, joint_threshold=0.0)
    for runner in (plain, joint):
        runner.answer("naive", Segments((), (a, b), SUFFIX, SUFFIX))
    pool, plain_pool = joint.pools["naive", "backbone"], plain.pools["naive", "backbone"]
    entry_a, entry_b = pool.find(a), pool.find(b)
    assert entry_a is not entry_b and entry_a.pages == entry_b.pages
    assert (plain_pool.used_pages, pool.used_pages) == (2, 1)
    assert joint.page_compression("naive") == 2.0
    assert joint.cache_bytes_per_token("naive") == plain.cache_bytes_per_token("naive") / 2
    for got, want in zip(read(pool, entry_b), reference_kv(params, m, b)):
        np.testing.assert_array_equal(got, want)


def test_int8_comb_pool_reads_the_round_trip_of_the_encoder(tiny_cfg, tiny_params):
    m = tiny_cfg.model
    runner = PicRunner(tiny_params, m, max_new_tokens=2, pic_dtype="int8")
    runner.answer("comb", seg())
    pool = runner.pools["comb", "comb"]
    assert isinstance(pool.k, quant.Int8Pages)
    per_token = 2 * m.num_cross_layers * m.num_kv_heads * (m.head_dim + 2)  # int8 values + a float16 scale
    assert runner.cache_bytes_per_token("comb") == per_token
    ids = CHUNKS[2]
    cache = encode(tiny_params, _pad(ids, 32), jnp.asarray(np.arange(32) < len(ids))[None], m)
    for got, want in zip(read(pool, pool.find(ids)), (cache.k, cache.v)):
        np.testing.assert_array_equal(got, np.asarray(quant.round_trip(want[:, 0, : len(ids)], "int8")))


def test_pools_evict_idle_chunks_and_reserve_sizes_them(tiny_cfg, tiny_params):
    runner = PicRunner(tiny_params, tiny_cfg.model, max_new_tokens=2, pool_tokens=64)  # 4 pages of 16
    for chunks in (CHUNKS[:2], CHUNKS[2:], CHUNKS[:2]):
        assert runner.answer("naive", seg(chunks)).chunk_hits == 0  # each request evicts the last one's chunks
    runner.reserve([seg(CHUNKS[:2]), seg(CHUNKS[2:])])
    runner.reset()
    assert runner.pool_tokens == 16 * (1 + 1 + 1 + 2)
    for chunks in (CHUNKS[:2], CHUNKS[2:]):
        runner.answer("naive", seg(chunks))
    assert runner.answer("naive", seg(CHUNKS)).chunk_hits == 3

"""PICache page pool: index (ids equality, LRU, refcounts, pinning, errors) and the page round trip."""

import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from comb_jax.config import MeshConfig
from comb_jax.model.sharding import make_mesh
from comb_jax.model.transformer import encode
from comb_jax.serving.pool import ChunkTooLongError, PagePool, PoolFullError, fingerprint, gather_context


def one_device_mesh():
    return make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])


def small_pool(tiny_cfg, pages=4, fp="fp"):
    serve = dataclasses.replace(tiny_cfg.serve, pool_tokens=pages * tiny_cfg.serve.page_tokens)
    return PagePool(tiny_cfg.model, serve, fp, one_device_mesh())


def chunk(seed, n):
    return np.random.default_rng(seed).integers(0, 256, n).tolist()


def test_hit_miss_and_ids_equality_under_hash_collision(tiny_cfg, monkeypatch):
    pool = small_pool(tiny_cfg)
    monkeypatch.setattr(pool, "key", lambda ids: "same")  # every chunk collides on one key
    a, b = chunk(0, 10), chunk(1, 10)
    entry_a, hit = pool.acquire(a)
    assert not hit and entry_a.refcount == 1 and len(entry_a.pages) == 1
    again, hit = pool.acquire(list(a))
    assert hit and again is entry_a and entry_a.refcount == 2
    # b shares a's key but not its ids: a miss with its own pages, and each finds its own entry
    entry_b, hit = pool.acquire(b)
    assert not hit and entry_b is not entry_a and entry_b.pages != entry_a.pages
    assert pool.find(a) is entry_a and pool.find(b) is entry_b
    assert (pool.stats.hits, pool.stats.misses) == (1, 2)


def test_lru_eviction_refcounts_and_pinning(tiny_cfg):
    pool = small_pool(tiny_cfg, pages=4)  # 4 pages of 16 tokens
    a, b, c, d = (chunk(i, 16) for i in range(4))
    entries = {name: pool.acquire(ids)[0] for name, ids in zip("abcd", (a, b, c, d))}
    assert pool.used_pages == 4
    # in use: nothing can be evicted, a new chunk cannot fit
    with pytest.raises(PoolFullError, match="pool full"):
        pool.acquire(chunk(9, 5))
    assert pool.stats.evictions == 0 and all(pool.find(x) for x in (a, b, c, d))
    for e in entries.values():
        pool.release(e)
    pool.acquire(a)  # touch a: b is now the least recently used
    pool.release(entries["a"])
    pool.pin(c)
    e_new, hit = pool.acquire(chunk(10, 20))  # 2 pages: evicts b, then d (c is pinned, a more recent)
    assert not hit and len(e_new.pages) == 2
    assert pool.find(b) is None and pool.find(d) is None
    assert pool.find(a) is entries["a"] and pool.find(c) is entries["c"]
    assert pool.stats.evictions == 2
    assert sorted(e_new.pages) == sorted(entries["b"].pages + entries["d"].pages)
    with pytest.raises(RuntimeError):
        pool.release(entries["b"])  # refcount already 0


def test_errors_for_oversize_chunk_and_oversize_request(tiny_cfg):
    pool = small_pool(tiny_cfg, pages=2)
    with pytest.raises(ChunkTooLongError, match="max_chunk_tokens=64"):
        pool.acquire(chunk(0, 65))
    with pytest.raises(PoolFullError, match="needs 3 pages but the whole pool has 2: it can never fit"):
        pool.acquire(chunk(0, 40))
    assert pool.used_pages == 0 and len(pool) == 0


def test_fingerprint_tracks_encoder_weights_and_tokenizer(tiny_params):
    enc, embed = tiny_params["comb"]["encoder"], tiny_params["backbone"]["embed"]
    base = fingerprint(enc, embed, "tok-a")
    assert base == fingerprint(jax.tree.map(np.array, enc), np.array(embed), "tok-a")
    assert base != fingerprint(enc, embed, "tok-b")
    bumped = jax.tree.map(lambda x: x, enc)
    bumped["k_proj"] = bumped["k_proj"].at[0, 0, 0, 0].add(1e-3)
    assert base != fingerprint(bumped, embed, "tok-a")


def test_written_pages_gather_to_the_encoder_output(tiny_cfg, tiny_params):
    """Chunk processor round trip: pages written in a batch == model.encode of each chunk on its own."""
    pool = small_pool(tiny_cfg, pages=16)
    lengths = (5, 16, 23, 64, 40)
    chunks = [chunk(20 + i, n) for i, n in enumerate(lengths)]
    entries = [pool.acquire(ids)[0] for ids in chunks]
    pool.write(tiny_params, entries, batch=2)  # buckets 16, 32, 64; more chunks than the batch
    assert all(e.written for e in entries)
    rows = [entries[:2], entries[2:], []]  # two requests with several chunks, one without
    table, mask = pool.page_table(rows, 256)
    k, v, _ = gather_context(pool.k, pool.v, table, mask)
    for row, row_entries in enumerate(rows):
        want = [encode(tiny_params, np.asarray([e.ids]), np.ones((1, e.length), bool), tiny_cfg.model)
                for e in row_entries]
        got_k = np.asarray(k[:, row])[:, mask[row]]
        got_v = np.asarray(v[:, row])[:, mask[row]]
        assert got_k.shape[1] == sum(lengths[i] for i in range(len(entries)) if entries[i] in row_entries)
        if want:
            np.testing.assert_allclose(got_k, np.concatenate([w.k[:, 0] for w in want], 1), atol=1e-5)
            np.testing.assert_allclose(got_v, np.concatenate([w.v[:, 0] for w in want], 1), atol=1e-5)


def test_pool_is_sharded_over_kv_heads_on_the_tensor_axis(tiny_cfg):
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=2), jax.devices()[:2])
    pool = PagePool(tiny_cfg.model, tiny_cfg.serve, "fp", mesh)
    assert pool.k.shape == (2, 64, 16, 2, 16)
    assert pool.k.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec(None, None, None, "tensor")), 5)
    assert pool.k.addressable_shards[0].data.shape == (2, 64, 16, 1, 16)

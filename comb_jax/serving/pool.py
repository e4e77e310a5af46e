"""The chunk-cache page pool: preallocated K/V pages on device, a host-side chunk index, and the chunk processor.

Storage: k, v `[layers, pages, page_tokens, kv_heads, head_dim]`, sharded over kv_heads on the mesh's tensor axis,
in `serve.pic_dtype` (int8: `quant.Int8Pages`, int8 values plus a float16 scale per token and head). A chunk of L
tokens stores L + extra_tokens tokens and owns ceil((L + extra_tokens) / page_tokens) pages (its last page is
partly filled).

What a page holds is the pool's chunk processor's output (`processor(params, tokens, mask, *, cfg, dtype) -> k, v
[layers, B, L + extra_tokens, K, D]`, row b's stored tokens first): by default Comb PICaches
(`methods.comb.comb_chunks`, E cross layers, extra 0; the serving engine's pool); `methods.naive.backbone_chunks`
stores the backbone's own KV of each chunk alone (N layers: the naive / rerotate / epic chunk caches of
`pic_modes.PicRunner`), `methods.kvpacket.packet_chunks` that KV followed by the KV Packet trailer (extra_tokens = P).

Index: key = sha256(fingerprint of encoder weights + tokenizer, token ids); a hit also compares the ids
themselves, so a hash collision can never serve the wrong chunk. Entries carry a reference count (requests
using them), a pin flag, and sit in an LRU order; only idle (refcount 0), unpinned entries are evicted.

`write_chunks` runs the processor on a batch of chunks of one bucketed length and scatters their K/V into their pages
in place (the pool buffers are donated), one compile per bucket (and processor). `gather_tokens` / `gather_context`
read pages back as dense arrays.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from comb_jax.config import ModelConfig, ServeConfig
from comb_jax.methods.comb import comb_chunks
from comb_jax.model.buckets import bucket_for
from comb_jax.model.sharding import logical_sharding
from comb_jax.serving import quant
from comb_jax.serving.joint_pages import PageSharing

POOL_AXES = ("layers", "pages", "page_tokens", "kv_heads", "head_dim")


class RequestError(ValueError):
    """A request that cannot be served (the message says why); other requests still run."""


class ChunkTooLongError(RequestError):
    pass


class PoolFullError(RequestError):
    pass


def fingerprint(encoder_params, embed, tokenizer_id: str = "") -> str:
    """sha256 over the encoder weights, the (frozen) embedding it reads and a tokenizer identity string."""
    h = hashlib.sha256(tokenizer_id.encode())
    for leaf in jax.tree.leaves((encoder_params, embed)):
        a = np.asarray(leaf)
        h.update(str((a.shape, a.dtype)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


@dataclass
class Entry:
    """One cached chunk. pages: pool page ids in token order; written: its K/V are in the pool."""

    ids: tuple[int, ...]
    pages: list[int]
    refcount: int = 0
    pinned: bool = False
    written: bool = False

    @property
    def length(self) -> int:
        return len(self.ids)


@dataclass
class PoolStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


def page_bytes(serve: ServeConfig, cfg: ModelConfig, dtype) -> int:
    """Device bytes of one page (K and V of every cross layer) stored as `serve.pic_dtype` (`dtype`: compute)."""
    return serve.page_tokens * quant.bytes_per_token(cfg, serve.pic_dtype, dtype)


def pool_pages(serve: ServeConfig, cfg: ModelConfig, dtype, bytes_limit: int | None = None) -> int:
    """Number of pages: `pool_tokens` / page_tokens, or, when pool_fraction > 0, as many pages as fit in that
    fraction of device memory (`bytes_limit`, default the device's): int8 pages are half the size, so twice as many.
    """
    if serve.pool_fraction > 0:
        limit = bytes_limit or (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
        if not limit:
            raise ValueError("serve.pool_fraction needs a device that reports memory_stats()['bytes_limit'];"
                             " set serve.pool_tokens instead")
        return max(1, int(limit * serve.pool_fraction) // page_bytes(serve, cfg, dtype))
    return max(1, serve.pool_tokens // serve.page_tokens)


def entry_key(fingerprint: str, ids) -> str:
    """The key of a chunk's entry in every tier (pool, host memory, disk): sha256 of the model fingerprint and ids."""
    return hashlib.sha256(fingerprint.encode() + np.asarray(ids, np.int64).tobytes()).hexdigest()


class PagePool:
    """Device page buffers + host index. Not thread-safe (one engine drives it).

    layers / processor / extra_tokens: what a page holds (module docstring); the default is the Comb PICache pool.
    `serve.pool_fraction` sizes Comb pools only (its bytes per page are the cross layers').
    """

    def __init__(self, cfg: ModelConfig, serve: ServeConfig, fingerprint_str: str, mesh, dtype=jnp.float32, *,
                 layers: int | None = None, processor=comb_chunks, extra_tokens: int = 0):
        for b in serve.chunk_buckets:
            if b % serve.page_tokens:
                raise ValueError(f"chunk bucket {b} is not a multiple of page_tokens={serve.page_tokens}")
        if max(serve.chunk_buckets) < serve.max_chunk_tokens:
            raise ValueError(f"max_chunk_tokens={serve.max_chunk_tokens} exceeds the largest chunk bucket "
                             f"{max(serve.chunk_buckets)}")
        self.cfg, self.serve, self.fingerprint, self.dtype = cfg, serve, fingerprint_str, dtype
        self.processor, self.extra_tokens = processor, extra_tokens
        self.num_pages = pool_pages(serve, cfg, dtype)
        layers = cfg.num_cross_layers if layers is None else layers
        shape = (layers, self.num_pages, serve.page_tokens, cfg.num_kv_heads, cfg.head_dim)
        self.sharding = logical_sharding(shape, POOL_AXES, mesh)
        if serve.pic_dtype == "int8":
            self.sharding = quant.Int8Pages(self.sharding, logical_sharding(shape[:-1], POOL_AXES[:-1], mesh))
        zeros = _zeros_fn(shape, serve.pic_dtype, jnp.dtype(dtype), self.sharding)
        self.k, self.v = zeros(), zeros()  # arrays, or quant.Int8Pages for pic_dtype int8
        self.free: list[int] = list(range(self.num_pages - 1, -1, -1))  # pop() hands out low ids first
        # page refcounts; with serve.joint_page_threshold >= 0 close pages are shared (entry.pages: physical ids)
        self.sharing = PageSharing(self.num_pages, serve.page_tokens, serve.joint_page_threshold)
        self.entries: OrderedDict[str, list[Entry]] = OrderedDict()  # LRU order: oldest first
        self.stats = PoolStats()
        self.on_evict = None  # called with each evicted entry before its pages are reused (a lower cache tier)

    # -- index --------------------------------------------------------------------------------------------

    def key(self, ids) -> str:
        return entry_key(self.fingerprint, ids)

    def find(self, ids) -> Entry | None:
        ids = tuple(int(i) for i in ids)
        for entry in self.entries.get(self.key(ids), ()):
            if entry.ids == ids:  # equality on the ids, never the hash alone
                return entry
        return None

    def pages_for(self, length: int) -> int:
        """Pages a chunk of `length` tokens owns."""
        return math.ceil((length + self.extra_tokens) / self.serve.page_tokens)

    def stored_tokens(self, entry: Entry) -> int:
        """Tokens the pool holds for `entry`: its chunk's, then `extra_tokens` (e.g. a KV Packet trailer)."""
        return entry.length + self.extra_tokens

    def token_slots(self, entry: Entry) -> np.ndarray:
        """Flat pool slots (page * page_tokens + offset) of `entry`'s stored tokens, in order [stored_tokens]."""
        pt, token = self.serve.page_tokens, np.arange(self.stored_tokens(entry))
        return np.asarray(entry.pages, np.int64)[token // pt] * pt + token % pt

    @property
    def used_pages(self) -> int:
        return self.num_pages - len(self.free)

    def __len__(self) -> int:
        return sum(len(v) for v in self.entries.values())

    def _touch(self, key: str):
        self.entries.move_to_end(key)

    def _evict_until(self, pages_needed: int):
        """Evict idle, unpinned entries, least recently used first, until `pages_needed` pages are free."""
        for key in list(self.entries):
            if len(self.free) >= pages_needed:
                return
            bucket = self.entries[key]
            for entry in [e for e in bucket if e.refcount == 0 and not e.pinned]:
                if self.on_evict is not None and entry.written:
                    self.on_evict(entry)
                bucket.remove(entry)
                self.free.extend(reversed(self.sharing.release(entry.pages)))
                self.stats.evictions += 1
            if not bucket:
                del self.entries[key]

    def acquire(self, ids, count: bool = True) -> tuple[Entry, bool]:
        """Look a chunk up (hit) or reserve pages for it (miss); either way its refcount goes up by one.

        Returns (entry, hit). A miss returns an entry with written=False: the caller must `write_chunks` it.
        Raises ChunkTooLongError or PoolFullError (nothing is left reserved then). `count=False` leaves the hit and
        miss counters alone, for a caller that counts only what it serves (`record`).
        """
        ids = tuple(int(i) for i in ids)
        if not ids:
            raise RequestError("empty chunk")
        if len(ids) > self.serve.max_chunk_tokens:
            raise ChunkTooLongError(f"chunk of {len(ids)} tokens exceeds max_chunk_tokens="
                                    f"{self.serve.max_chunk_tokens}")
        key = self.key(ids)
        entry = self.find(ids)
        if entry is not None:
            entry.refcount += 1
            self._touch(key)
            self.stats.hits += count
            return entry, True
        need = self.pages_for(len(ids))
        if need > self.num_pages:
            raise PoolFullError(f"chunk of {len(ids)} tokens needs {need} pages but the whole pool has "
                                f"{self.num_pages}: it can never fit")
        self._evict_until(need)
        if len(self.free) < need:
            in_use = sum(e.refcount > 0 or e.pinned for b in self.entries.values() for e in b)
            raise PoolFullError(f"pool full: chunk needs {need} pages, {len(self.free)} free of {self.num_pages} "
                                f"after evicting every idle entry ({in_use} entries in use or pinned)")
        entry = Entry(ids, [self.free.pop() for _ in range(need)], refcount=1)
        self.sharing.allocate(entry.pages, self.stored_tokens(entry))
        self.entries.setdefault(key, []).append(entry)
        self._touch(key)
        self.stats.misses += count
        return entry, False

    def record(self, hits: int, misses: int):
        """Count a served request's lookups (see `acquire(count=False)`)."""
        self.stats.hits += hits
        self.stats.misses += misses

    def release(self, entry: Entry):
        if entry.refcount <= 0:
            raise RuntimeError("release of a pool entry that is not in use")
        entry.refcount -= 1

    def drop_unwritten(self, entry: Entry):
        """Undo a miss whose encoding never happened (the request failed): free its pages now."""
        key = self.key(entry.ids)
        bucket = self.entries.get(key, [])
        if entry in bucket and not entry.written and entry.refcount == 0:
            bucket.remove(entry)
            self.free.extend(reversed(self.sharing.release(entry.pages)))
            if not bucket:
                del self.entries[key]

    def pin(self, ids, pinned: bool = True):
        entry = self.find(ids)
        if entry is None:
            raise KeyError("pin: chunk is not in the pool")
        entry.pinned = pinned

    # -- device side --------------------------------------------------------------------------------------

    def write(self, params, entries: list[Entry], batch: int):
        """Run the chunk processor on `entries` (misses) and write their pages, `batch` chunks per call, grouped by
        length bucket."""
        by_bucket: dict[int, list[Entry]] = {}
        for e in entries:
            by_bucket.setdefault(bucket_for(e.length, self.serve.chunk_buckets, error=RequestError), []).append(e)
        for length, group in sorted(by_bucket.items()):
            for start in range(0, len(group), batch):
                part = group[start:start + batch]
                tokens = np.zeros((batch, length), np.int32)
                mask = np.zeros((batch, length), bool)
                # out of range -> dropped
                page_ids = np.full((batch, self.pages_for(length)), self.num_pages, np.int32)
                for row, e in enumerate(part):
                    tokens[row, :e.length] = e.ids
                    mask[row, :e.length] = True
                    page_ids[row, :len(e.pages)] = e.pages
                self.k, self.v = write_chunks(params, self.k, self.v, tokens, mask, page_ids, cfg=self.cfg,
                                              dtype=self.dtype, processor=self.processor)
                for e in part:
                    e.written = True
                self.free.extend(reversed(self.sharing.fuse(self, part)))

    def page_table(self, entries_per_row: list[list[Entry]], context_tokens: int):
        """Per-request dense view: page ids [B, context_tokens / page_tokens] and a token mask [B, context_tokens].

        A request's chunks are laid out page by page in order; the unused tail of each chunk's last page is
        masked out, so the gathered context holds exactly the chunks' tokens.
        """
        pt = self.serve.page_tokens
        table = np.zeros((len(entries_per_row), context_tokens // pt), np.int32)
        mask = np.zeros((len(entries_per_row), context_tokens), bool)
        for row, entries in enumerate(entries_per_row):
            slot = 0
            for e in entries:
                table[row, slot:slot + len(e.pages)] = e.pages
                mask[row, slot * pt: slot * pt + self.stored_tokens(e)] = True
                slot += len(e.pages)
        return table, mask


@functools.lru_cache
def _zeros_fn(shape, pic_dtype: str, dtype, sharding):
    """A jit function making an empty pool buffer; cached, so that pools of one shape compile it once."""
    return jax.jit(lambda: quant.zeros(shape, pic_dtype, dtype), out_shardings=sharding)


@partial(jax.jit, static_argnames=("cfg", "dtype", "processor"), donate_argnames=("pool_k", "pool_v"))
def write_chunks(params, pool_k, pool_v, tokens, mask, page_ids, *, cfg: ModelConfig, dtype=jnp.float32,
                 processor=comb_chunks):
    """Run the chunk processor on chunks and write what it stores into their pages in place.

    tokens, mask [B, L] (L a multiple of page_tokens); page_ids [B, ceil((L + extra) / page_tokens)] for a processor
    storing L + extra tokens per chunk (out-of-range ids are dropped: padding rows and pages past a chunk's end).
    pool_k/v [layers, P, page_tokens, K, D] (donated), arrays or `quant.Int8Pages` (the chunks are quantised here).
    """
    new_k, new_v = processor(params, tokens, mask, cfg=cfg, dtype=dtype)
    pt = pool_k.shape[2]
    flat_ids = page_ids.reshape(-1)

    def scatter(pool, new):
        layers, b, length, kv_heads, head_dim = new.shape
        new = jnp.pad(new, ((0, 0), (0, 0), (0, page_ids.shape[1] * pt - length), (0, 0), (0, 0)))
        pages = quant.store(new.reshape(layers, flat_ids.shape[0], pt, kv_heads, head_dim), pool)
        return jax.tree.map(lambda p, n: p.at[:, flat_ids].set(n, mode="drop"), pool, pages)

    return scatter(pool_k, new_k), scatter(pool_v, new_v)


@partial(jax.jit, static_argnames=("dtype",))
def gather_tokens(pool_k, pool_v, slots, valid=None, dtype=None):
    """Pool slots -> dense arrays. slots [B, C] (flat page * page_tokens + offset) -> k, v [layers, B, C, K, D].

    valid [B, C] (optional): tokens outside it read as zeros. k, v come in `dtype` (default: the pool's dtype;
    float32 for an int8 pool, which is dequantised here).
    """
    def dense(pool):
        flat = jax.tree.map(lambda a: a.reshape(a.shape[0], -1, *a.shape[3:]), pool)  # [layers, P * pt, ...]
        tokens = quant.load(jax.tree.map(lambda a: a[:, slots], flat),
                            dtype or (jnp.float32 if isinstance(pool, quant.Int8Pages) else pool.dtype))
        return tokens if valid is None else jnp.where(valid[None, :, :, None, None], tokens, 0)

    return dense(pool_k), dense(pool_v)


@partial(jax.jit, static_argnames=("dtype",))
def gather_context(pool_k, pool_v, page_table, mask, dtype=None):
    """Pages -> dense per-request PICache arrays. page_table [B, P_ctx]; mask [B, C] -> k, v [E, B, C, K, D].

    C = P_ctx * page_tokens; masked slots (each chunk's unused last-page tail) hold whatever the page does.
    """
    pt = pool_k.shape[2]
    slots = (page_table[:, :, None] * pt + jnp.arange(pt)).reshape(page_table.shape[0], -1)
    return (*gather_tokens(pool_k, pool_v, slots, dtype=dtype), mask)

"""Automatic prefix caching (`--mode prefix`): the baseline a user would run instead of Comb, as vLLM's APC.

The request is the full prompt (documents inlined, as `--mode full` builds it). The backbone's own KV of every
whole page of a prompt is kept in a `PagePool` of N-layer pages (the pool machinery of the naive chunk caches:
buffers, free list, `pic_dtype`); this module is its index. A page is a `Block` keyed by a hash chained over
every token up to and including it (key_k = sha256(key_{k-1} + page k's ids), key_-1 the pool's fingerprint), so a
block is reused only after exactly the same tokens, in the same order, from the prompt's first token. A lookup
walks the chain from the first page and checks each block's ids and parent, so a hash collision can never serve
the wrong KV.

Per admitted prompt (`PrefixCache.admit`): the longest chain of written blocks is reused (at most
(len - 1) // page_tokens pages: the last prompt token is always prefilled, it gives the first token's logits);
the prompt's other whole pages get fresh blocks, evicting idle leaf blocks least recently used first; when the
pool has no idle page left the rest of the prompt is simply not cached (never an error). The caller prefills
the rest of the prompt on top of the reused pages (`extend_rows`: their KV gathered into the first
P * page_tokens slots of a dense cache, the prompt's next tokens at their true positions), writes the new
blocks' pages from the prefilled cache (`write_pages`) and releases the plan: the slot keeps its own dense copy,
so blocks are held only for the length of one admission.

Shapes are buckets: the reused page count P is padded to `page_buckets` (0 and the prompt buckets in whole
pages), the rest of the prompt to the prompt buckets, so nothing compiles after warm-up.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from comb_jax.config import ModelConfig
from comb_jax.model.buckets import bucket_for
from comb_jax.model.transformer import KVCache, forward
from comb_jax.serving import quant
from comb_jax.serving.pool import PagePool, RequestError, gather_tokens
from comb_jax.serving.precompiled import Precompiled
from comb_jax.serving.slots import first_draw, prefill_rows


@dataclass(eq=False)
class Block:
    """One cached page of backbone KV: page k of a prompt. `pages` is [page id] (a one-page entry, so code that
    counts an entry's pages reads blocks too); parent: page k - 1's block (None for a prompt's first page)."""

    key: bytes
    parent: Block | None
    ids: tuple[int, ...]
    pages: list[int]
    refcount: int = 0
    children: int = 0
    written: bool = False


@dataclass
class Plan:
    """One prompt's admission: `length` tokens in pages of `page_tokens`. reused: the cached blocks its prefill
    reads (pages 0..len(reused) - 1); new: the blocks it writes (prompt page index, block); held: every block
    whose refcount this plan holds."""

    length: int
    page_tokens: int
    reused: list[Block] = field(default_factory=list)
    new: list[tuple[int, Block]] = field(default_factory=list)
    held: list[Block] = field(default_factory=list)

    @property
    def reused_tokens(self) -> int:
        return len(self.reused) * self.page_tokens

    @property
    def hits(self) -> int:
        """Pages read from the cache."""
        return len(self.reused)

    @property
    def misses(self) -> int:
        """Whole pages prefilled (kept in the pool or not)."""
        return self.length // self.page_tokens - len(self.reused)


@dataclass
class PrefixStats:
    prompts: int = 0
    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens whose KV came from the cache instead of a prefill
    evictions: int = 0


def page_buckets(prompt_buckets, page_tokens: int) -> tuple[int, ...]:
    """Buckets of the reused page count: 0 (a cold prompt: a plain prefill) and each prompt bucket in whole pages."""
    return tuple(sorted({0} | {b // page_tokens for b in prompt_buckets if b >= page_tokens}))


class PrefixCache:
    """The block index over `pool` (a PagePool of backbone-KV pages) and the prefill that reads it. Not thread-safe
    (one engine or scheduler drives it). prompt_buckets: the whole prompt's (mode full's) buckets, which bound both
    the rest of a prompt and its reused prefix. `stats` counts tokens; the caller counts page hits (`Plan.hits`)."""

    def __init__(self, pool: PagePool, prompt_buckets):
        self.pool, self.page_tokens = pool, pool.serve.page_tokens
        self.prompt_buckets = tuple(sorted(prompt_buckets))
        self.page_buckets = page_buckets(self.prompt_buckets, self.page_tokens)
        self.blocks: OrderedDict[bytes, Block] = OrderedDict()  # LRU order: oldest first
        self.root = hashlib.sha256(b"prefix:" + pool.fingerprint.encode()).digest()
        self.stats = PrefixStats()

    def __len__(self) -> int:
        return len(self.blocks)

    def _key(self, parent: Block | None, ids: tuple[int, ...]) -> bytes:
        return hashlib.sha256((parent.key if parent else self.root) + np.asarray(ids, np.int64).tobytes()).digest()

    def _child(self, parent: Block | None, ids: tuple[int, ...]) -> tuple[bytes, Block | None]:
        """(key, the block of `ids` after `parent` if one is indexed, verified on ids and parent)."""
        key = self._key(parent, ids)
        block = self.blocks.get(key)
        ok = block is not None and block.parent is parent and block.ids == ids
        return key, block if ok else None

    def _hold(self, plan: Plan, block: Block):
        block.refcount += 1
        self.blocks.move_to_end(block.key)  # root to leaf: a parent is never less recent than its children
        plan.held.append(block)

    def _free_page(self) -> int | None:
        """A free pool page, evicting the least recently used idle leaf block if need be; None when every page
        is held."""
        if not self.pool.free:
            for block in self.blocks.values():
                if block.refcount == 0 and block.children == 0:
                    self._evict(block)
                    break
        if not self.pool.free:
            return None
        page = self.pool.free.pop()
        self.pool.sharing.allocate([page], self.page_tokens)
        return page

    def _evict(self, block: Block):
        del self.blocks[block.key]
        if block.parent is not None:
            block.parent.children -= 1
        self.pool.free.extend(self.pool.sharing.release(block.pages))
        self.pool.stats.evictions += 1
        self.stats.evictions += 1

    def admit(self, ids) -> Plan:
        """Hold the longest cached prefix of `ids` and fresh blocks for its other whole pages (see the module
        docstring). Blocks another plan of the same admission writes are held but neither reused nor written."""
        ids, pt = tuple(int(i) for i in ids), self.page_tokens
        plan = Plan(len(ids), pt)
        parent = None
        for k in range(len(ids) // pt):
            page = ids[k * pt:(k + 1) * pt]
            key, block = self._child(parent, page)
            if block is not None:
                if block.written and len(plan.reused) == k and k < (len(ids) - 1) // pt:
                    plan.reused.append(block)
                self._hold(plan, block)
            else:
                if key in self.blocks:  # a stale or colliding block under this key: cache no further
                    break
                where = self._free_page()
                if where is None:  # every page is in use: the rest of this prompt is not cached
                    break
                block = Block(key, parent, page, [where])
                self.blocks[key] = block
                if parent is not None:
                    parent.children += 1
                plan.new.append((k, block))
                self._hold(plan, block)
            parent = block
        return plan

    def write_table(self, plans: list[Plan], rows: int, width: int) -> np.ndarray:
        """Pool page of each prompt page a plan writes, [rows, width]; num_pages (dropped) everywhere else."""
        table = np.full((rows, width), self.pool.num_pages, np.int32)
        for row, plan in enumerate(plans):
            for k, block in plan.new:
                table[row, k] = block.pages[0]
        return table

    def done(self, plans: list[Plan], written: bool = True):
        """After the prefill: mark the new blocks written (or drop them, `written=False`: the prefill failed),
        release every plan and count its prompt. A failed admission is undone last plan first (a later plan's
        blocks may hang under an earlier one's)."""
        for plan in plans if written else reversed(plans):
            for block in reversed(plan.held):
                block.refcount -= 1
            for _, block in reversed(plan.new):
                block.written = written
                if not written and block.refcount == 0 and block.children == 0:
                    self._evict(block)
                    self.pool.stats.evictions -= 1  # never served: not an eviction
                    self.stats.evictions -= 1
            if written:
                self.stats.prompts += 1
                self.stats.prompt_tokens += plan.length
                self.stats.reused_tokens += plan.reused_tokens

    def prefill(self, params, prompts: list[list[int]], key_data, temperature, top_p, *, slots: int,
                cfg: ModelConfig, dtype=jnp.float32):
        """Admit, prefill and cache `prompts` in one bucketed call -> (`prefill_rows`' output for B rows, plans).

        key_data [B, 2], temperature, top_p [B]: B >= len(prompts) (the batch bucket; later rows are padding).
        Each prompt reads its longest cached prefix; its new whole pages are written to the pool before return.
        """
        pt, b = self.page_tokens, key_data.shape[0]
        plans = [self.admit(ids) for ids in prompts]
        try:
            rest = [ids[plan.reused_tokens:] for ids, plan in zip(prompts, plans)]
            t = bucket_for(max(len(r) for r in rest), self.prompt_buckets, error=RequestError)
            p = bucket_for(max(len(plan.reused) for plan in plans), self.page_buckets, error=RequestError)
            prompt, lengths = np.zeros((b, t), np.int32), np.ones((b,), np.int32)
            table, prefix_lengths = np.zeros((b, p), np.int32), np.zeros((b,), np.int32)
            for row, (ids, plan) in enumerate(zip(rest, plans)):
                prompt[row, :len(ids)], lengths[row] = ids, len(ids)
                table[row, :len(plan.reused)] = [block.pages[0] for block in plan.reused]
                prefix_lengths[row] = plan.reused_tokens
            out = self._run(params, table, prefix_lengths, prompt, lengths, key_data, temperature, top_p,
                            slots=slots, cfg=cfg, dtype=dtype)
            self.pool.k, self.pool.v = write_pages(self.pool.k, self.pool.v, out[0],
                                                   self.write_table(plans, b, slots // pt))
        except BaseException:
            self.done(plans, written=False)
            raise
        self.done(plans)
        return out, plans

    def warmup(self, params, key_data, temperature, top_p, *, slots: int, cfg: ModelConfig, dtype=jnp.float32):
        """Compile `prefill` for batch size B = key_data.shape[0], every prompt x page bucket, ahead of time
        (nothing runs, nothing is written). Returns the output's shapes (for the caller's own warm-up)."""
        b, pt = key_data.shape[0], self.page_tokens
        for t in self.prompt_buckets:
            for p in self.page_buckets:
                fn, args = self._program(params, np.zeros((b, p), np.int32), np.zeros((b,), np.int32),
                                         np.zeros((b, t), np.int32), np.ones((b,), np.int32), key_data, temperature,
                                         top_p)
                shapes = fn.compile(*args, cfg=cfg, slots=slots, dtype=dtype)
        write_pages.compile(self.pool.k, self.pool.v, shapes[0], np.full((b, slots // pt), self.pool.num_pages,
                                                                          np.int32))
        return shapes

    def _run(self, params, table, prefix_lengths, prompt, lengths, key_data, temperature, top_p, *, slots, cfg,
             dtype):
        fn, args = self._program(params, table, prefix_lengths, prompt, lengths, key_data, temperature, top_p)
        return fn(*args, cfg=cfg, slots=slots, dtype=dtype)

    def _program(self, params, table, prefix_lengths, prompt, lengths, key_data, temperature, top_p):
        """The prefill program for this page bucket and its arguments: mode full's plain prefill (causal over the
        prompt alone) when nothing is reused, else `extend_rows` over the reused pages."""
        if table.shape[1] == 0:
            return prefill_rows, (params, None, None, None, None, prompt, lengths, key_data, temperature, top_p)
        return extend_rows, (params, self.pool.k, self.pool.v, table, prefix_lengths, prompt, lengths, key_data,
                             temperature, top_p)


@Precompiled
@partial(jax.jit, static_argnames=("cfg", "slots", "dtype"))
def extend_rows(params, pool_k, pool_v, page_table, prefix_lengths, prompt, prompt_lengths, key_data, temperature,
                top_p, *, cfg: ModelConfig, slots: int, dtype=jnp.float32):
    """Prefill prompts that continue cached prefixes, with `slots.prefill_rows`' contract and PRNG streams.

    page_table [B, P] (P the page bucket): row b's reused pages first, any page after them; prefix_lengths [B]:
    row b's reused tokens (its real pages * page_tokens); prompt [B, T] right-padded: each row's tokens after its
    prefix; prompt_lengths [B] (of those); key_data [B, 2]; temperature, top_p [B]. The prefix KV is gathered into
    the first P * page_tokens slots of a window of min(P * page_tokens + T, slots) slots, and the prompt goes on
    at positions prefix_lengths + 0.. (a slot of a padding page or padding token lies past every real query,
    which masks it). Returns (KVCache of `slots` >= P * page_tokens positions, None, first token [B],
    key_data [B, 2]): slot i holds position i, as a plain prefill's cache does.
    """
    b, p = page_table.shape
    pt = pool_k.shape[2]
    # every row's real positions end below its prompt length <= slots: a mixed batch's window is capped there
    window = min(p * pt + prompt.shape[1], slots)
    tokens = (page_table[:, :, None] * pt + jnp.arange(pt)).reshape(b, p * pt)
    k, v = gather_tokens(pool_k, pool_v, tokens, dtype=dtype)  # [N, B, P * pt, K, D]
    pad = lambda a, n: jnp.pad(a, ((0, 0), (0, 0), (0, n - a.shape[2]), (0, 0), (0, 0)))  # noqa: E731
    cache = KVCache(pad(k, window), pad(v, window), prefix_lengths.astype(jnp.int32))
    hidden, cache = forward(params, prompt, cfg, None, cache, prompt_lengths, dtype)
    first, key_data = first_draw(params, hidden, prompt_lengths, key_data, temperature, top_p)
    cache = KVCache(pad(cache.k, slots), pad(cache.v, slots), cache.lengths)
    return cache, None, first, key_data


@Precompiled
@partial(jax.jit, donate_argnames=("pool_k", "pool_v"))
def write_pages(pool_k, pool_v, kv_cache: KVCache, page_ids):
    """Store prefilled prompt pages into the pool in place: page k of row b (cache slots k * page_tokens ..) goes
    to pool page page_ids[b, k]. kv_cache k, v [N, B, M, K, D]; page_ids [B, M // page_tokens] (num_pages: not
    written); pool_k/v [N, pages, page_tokens, K, D] (donated), arrays or `quant.Int8Pages`."""
    pt = pool_k.shape[2]
    flat_ids = page_ids.reshape(-1)

    def scatter(pool, new):
        n, b, _, kv_heads, head_dim = new.shape
        new = new[:, :, :page_ids.shape[1] * pt].reshape(n, b * page_ids.shape[1], pt, kv_heads, head_dim)
        return jax.tree.map(lambda a, x: a.at[:, flat_ids].set(x, mode="drop"), pool, quant.store(new, pool))

    return scatter(pool_k, kv_cache.k), scatter(pool_v, kv_cache.v)

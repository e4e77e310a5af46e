"""Batch serving engine: PICache pool lookup, chunk encoding, batched prefill, one jit-compiled decode loop.

Per batch of up to `serve.max_batch` requests (the batch axis is always padded to max_batch):
1. lookup: every chunk is acquired from the pool (hit) or reserved (miss); misses are encoded together by
   the chunk processor, which writes their pages in place;
2. prefill (`prefill_with_pages`): each request's pages are gathered into a dense per-request context of a
   bucketed length (`serve.context_buckets`) with a token mask, and the prompts (bucketed lengths,
   `serve.prompt_buckets`) run through the decoder, which samples the first token;
3. generate (`decode.decode_loop`, donated state): a `lax.while_loop` until every row hit a stop id or its
   token budget.
A batch in which no request has chunks runs the plain backbone (no cross blocks). Every shape is a bucket,
so after `warmup()` no request mix within the buckets compiles anything (see `model.compiles.compile_count`).

What becomes a pool entry follows `model.context_encoding`: per_chunk (each chunk its own entry, any order
reuses them) or whole_context (a request's chunks concatenated into one entry, as the release trains; reused only
for the same chunks in the same order), with the tokenizer's BOS first in each entry when `model.context_bos`.
The pool's hit and miss counters count each served request once (not a deferred or failed one).

mode="full" is the no-PIC baseline: the caller inlines the chunks into the prompt (`Request.chunk_ids`
empty), and the prompt buckets grow by the context buckets so the whole prompt is prefilled by the decoder.
mode="prefix" takes the same prompts and buckets, and reuses the backbone's own KV of each prompt's longest
cached prefix (whole pages, `serving.prefix`: the pool holds N-layer backbone KV pages instead of PICaches);
`Result.chunk_hits` / `chunk_misses` count its reused / prefilled whole pages.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from comb_jax.config import Config, MeshConfig
from comb_jax.methods.naive import backbone_chunks
from comb_jax.model.buckets import bucket_for
from comb_jax.model.decode import decode_loop, prefill, start_state
from comb_jax.model.layout import model_layout
from comb_jax.model.sharding import make_mesh, shard_params
from comb_jax.model.transformer import PICache, cross_context
from comb_jax.serving.pool import (
    Entry,
    PagePool,
    PoolFullError,
    RequestError,
    fingerprint,
    gather_context,
    write_chunks,
)
from comb_jax.serving.prefix import PrefixCache, PrefixStats
from comb_jax.serving.slots import (
    SlotState,
    admit_buckets,
    decode_step,
    init_slots,
    insert_rows,
    prefill_rows,
    request_key_data,
)


@dataclass
class Request:
    """prompt_ids: the chat-templated prompt; chunk_ids: each chunk's token ids (encoded independently)."""

    id: str
    prompt_ids: list[int]
    chunk_ids: list[list[int]] = field(default_factory=list)
    max_tokens: int = 0  # 0: serve.max_new_tokens
    temperature: float = 0.0
    top_p: float = 1.0


@dataclass
class Result:
    id: str
    tokens: list[int] = field(default_factory=list)  # generated ids, stop id excluded
    ttft_s: float | None = None
    chunk_hits: int = 0
    chunk_misses: int = 0
    error: str | None = None
    cached_tokens: int = 0  # mode prefix: prompt tokens whose KV came from the prefix cache


@partial(jax.jit, static_argnames=("cfg", "slots", "max_new_tokens", "stop_ids", "dtype"))
def prefill_with_pages(params, pool_k, pool_v, page_table, context_mask, prompt, prompt_lengths, rng, temperature,
                       top_p, *, cfg, slots, max_new_tokens, stop_ids, dtype=jnp.float32):
    """Gather each request's pages into its dense context [E, B, C, K, D], then prefill the prompts.

    page_table [B, C / page_tokens]; context_mask [B, C]; prompt [B, T]. Returns (DecodeState, CrossContext):
    the keys are normalised here once, and the decode loop reuses them as they are.
    """
    ctx = cross_context(params, PICache(*gather_context(pool_k, pool_v, page_table, context_mask, dtype)), cfg, dtype)
    state = prefill(params, prompt, prompt_lengths, ctx, rng, temperature, top_p, cfg=cfg, slots=slots,
                    max_new_tokens=max_new_tokens, stop_ids=stop_ids, dtype=dtype)
    return state, ctx


def _pad_rows(values, rows: int, fill, dtype) -> np.ndarray:
    """values [n] -> [rows], the rows past n `fill` (a bucketed batch's padding)."""
    return np.array(list(values) + [fill] * (rows - len(values)), dtype)


def serving_mesh(cfg: Config):
    """Serving replicates over data and shards over the tensor axis only (the batch is small and static)."""
    tensor = max(1, cfg.mesh.tensor)
    return make_mesh(MeshConfig(data=1, fsdp=1, tensor=tensor), jax.local_devices()[:tensor])


class Engine:
    """Serves batches of `Request`s (`run`) and steps decode slots for the scheduler. params: the full tree
    {"backbone", "comb"}; stop_ids end generation.

    The interface `serving.scheduler.Scheduler` uses, and nothing else of the engine (JetStream's prefill / insert /
    generate split): the scheduler owns the slots' state, their jobs and which pool entries each holds; the engine
    owns the weights, the dtype, the shapes (buckets) and the jitted calls.
    - what it serves: `pool` (the `PagePool` the scheduler looks entries up in), `mode`, `stop_ids`, `slots`
      (decode slots), `admit_buckets` (batch sizes of an admission), `seed` (of requests that bring none);
    - a request's limits: `context_entries(request)` (its pool entries' ids), `document_ids(entry_ids)` (the
      inverse for one document), `entry_pages(entries)` and `context_tokens(entries)` (what it needs of the pool
      and of the context), `max_prompt_tokens`, `max_entry_tokens`, `max_context_tokens`, `check(request)`;
    - the device: `init_decode_state()` -> `SlotState`; `encode(entries)` writes the unwritten entries' pages;
      `prefill(prompts, entries, seeds, temperature, top_p)` -> those requests prefilled on their pages (a
      prefix, as `slots.prefill_rows` returns it); `insert(state, slot_ids, prefix, temperature, top_p)` -> the
      state with them in their slots; `generate(state, active)` -> (state, one token per slot);
      `warmup_encoder()` and `warmup_slots(state)` compile every shape these use.
    """

    def __init__(self, cfg: Config, params, *, stop_ids=(), tokenizer_id: str = "raw-ids", mode: str = "comb",
                 mesh=None, bos_id: int | None = None):
        if mode not in ("comb", "full", "prefix"):
            raise ValueError(f"mode must be 'comb', 'full' or 'prefix', got {mode!r}")
        if cfg.model.context_bos and bos_id is None and mode == "comb":
            raise ValueError("model.context_bos=true needs the tokenizer's BOS id (Engine(bos_id=...))")
        self.cfg, self.serve, self.mode, self.bos_id = cfg, cfg.serve, mode, bos_id
        self.dtype = jnp.dtype(cfg.compute_dtype)
        self.mesh = mesh if mesh is not None else serving_mesh(cfg)
        self.params = shard_params(params, model_layout(cfg.model), self.mesh)
        self.stop_ids = tuple(int(i) for i in stop_ids)
        encoder_embed = params["backbone"].get("encoder_embed", params["backbone"]["embed"])
        fp = fingerprint(params["comb"]["encoder"], encoder_embed, tokenizer_id)
        if mode == "prefix":  # pages of the backbone's own KV, as the naive chunk caches' pool holds
            self.pool = PagePool(cfg.model, cfg.serve, fp, self.mesh, self.dtype, layers=cfg.model.num_layers,
                                 processor=backbone_chunks)
        else:
            self.pool = PagePool(cfg.model, cfg.serve, fp, self.mesh, self.dtype)
        s = self.serve
        self.context_buckets = tuple(sorted(b for b in s.context_buckets if b % s.page_tokens == 0))
        if len(self.context_buckets) != len(s.context_buckets):
            raise ValueError(f"context buckets {s.context_buckets} must be multiples of page_tokens={s.page_tokens}")
        self.prompt_buckets = tuple(sorted(s.prompt_buckets))
        if mode in ("full", "prefix"):  # the chunks are inside the prompt
            top = max(s.prompt_buckets)
            self.prompt_buckets = tuple(sorted(set(s.prompt_buckets) | {c + top for c in self.context_buckets}))
        self.prefix = PrefixCache(self.pool, self.prompt_buckets) if mode == "prefix" else None
        self.rng = jax.random.key(s.seed)
        self.admit_buckets = admit_buckets(self.slots)
        self._slot_context = max(self.context_buckets) if mode == "comb" else 0  # a slot's PICache tokens

    @classmethod
    def for_codec(cls, cfg: Config, params, codec, mode: str = "comb") -> Engine:
        """An engine that stops, fingerprints and starts entries (BOS) as `codec`'s tokenizer says."""
        return cls(cfg, params, stop_ids=codec.stop_ids, tokenizer_id=codec.name, mode=mode, bos_id=codec.bos_id)

    # -- validation ---------------------------------------------------------------------------------------

    def context_entries(self, r: Request) -> list[list[int]]:
        """Token ids of a request's pool entries: one per chunk (per_chunk) or all chunks concatenated in order
        (whole_context); each starts with BOS when `model.context_bos`."""
        m = self.cfg.model
        entries = [[int(i) for i in ids] for ids in r.chunk_ids]
        if m.context_encoding == "whole_context" and entries:
            entries = [[i for ids in entries for i in ids]]
        if m.context_bos:
            entries = [[self.bos_id, *ids] for ids in entries]
        return entries

    def document_ids(self, entry_ids) -> list[int]:
        """A single document's ids from its pool entry's (`context_entries` of that one document, undone)."""
        ids = list(entry_ids)
        if self.cfg.model.context_bos and ids and ids[0] == self.bos_id:
            ids = ids[1:]
        return ids

    def entry_pages(self, entries) -> int:
        """Pool pages the distinct entries (token ids each) need together."""
        return sum(self.pool.pages_for(len(ids)) for ids in {tuple(ids) for ids in entries})

    def context_tokens(self, entries) -> int:
        """The page-rounded context a request with these entries reads (a repeated entry counts again)."""
        return sum(self.pool.pages_for(len(ids)) for ids in entries) * self.serve.page_tokens

    @property
    def slots(self) -> int:
        return self.serve.max_batch

    @property
    def seed(self) -> int:
        return self.serve.seed

    @property
    def max_prompt_tokens(self) -> int:
        return max(self.prompt_buckets)

    @property
    def kv_slots(self) -> int:
        """A slot's KV positions: the largest prompt bucket and its answer (one decode-loop shape in every mode)."""
        return self.max_prompt_tokens + self.serve.max_new_tokens

    @property
    def max_entry_tokens(self) -> int:
        return self.serve.max_chunk_tokens

    @property
    def max_context_tokens(self) -> int:
        """The longest page-rounded context a request may read."""
        return min(self.serve.max_context_tokens, max(self.context_buckets))

    def check(self, r: Request):
        """RequestError when `r` can never be served by this engine (shapes, budgets, vocabulary, pool size)."""
        s = self.serve
        if not r.prompt_ids:
            raise RequestError("empty prompt")
        if len(r.prompt_ids) > self.max_prompt_tokens:
            raise RequestError(f"prompt of {len(r.prompt_ids)} tokens exceeds the largest prompt bucket "
                               f"{self.max_prompt_tokens}")
        if not 0 <= r.max_tokens <= s.max_new_tokens:
            raise RequestError(f"max_tokens={r.max_tokens} outside [0, serve.max_new_tokens={s.max_new_tokens}]")
        if not 0 <= r.temperature < float("inf") or not 0 < r.top_p <= 1:
            raise RequestError(f"temperature={r.temperature} must be finite and >= 0 and top_p={r.top_p} in (0, 1]")
        if self.mode in ("full", "prefix") and r.chunk_ids:
            raise RequestError(f"mode {self.mode!r} takes the chunks inlined in the prompt, not as chunk_ids")
        vocab = self.cfg.model.vocab_size
        entries = self.context_entries(r)
        for ids in [r.prompt_ids, *entries]:
            if any(not 0 <= int(i) < vocab for i in ids):
                raise RequestError(f"token id outside the vocabulary [0, {vocab})")
        whole = self.cfg.model.context_encoding == "whole_context"
        for n, ids in enumerate(entries):
            where = "the whole context (chunks)" if whole else f"chunks[{n}]"
            if len(ids) == 0:
                raise RequestError(f"{where} is empty")
            if len(ids) > self.max_entry_tokens:
                raise RequestError(f"{where}: chunk of {len(ids)} tokens exceeds serve.max_chunk_tokens="
                                   f"{self.max_entry_tokens}")
        pages = self.entry_pages(entries)
        if pages > self.pool.num_pages:
            raise RequestError(f"chunks: the context needs {pages} pages but the whole pool has "
                               f"{self.pool.num_pages}: this request can never fit (serve.pool_tokens)")
        context, limit = self.context_tokens(entries), self.max_context_tokens
        if context > limit:
            raise RequestError(f"chunks: context of {context} page-rounded tokens exceeds {limit} "
                               f"(max_context_tokens / largest context bucket)")

    # -- pool ---------------------------------------------------------------------------------------------

    def _acquire(self, r: Request):
        """All of a request's entries, or none (released again) if one does not fit. Counted once served."""
        held = []
        try:
            for ids in self.context_entries(r):
                held.append(self.pool.acquire(ids, count=False))
        except RequestError:
            self._release([e for e, _ in held])
            raise
        return held

    def _release(self, entries):
        for e in entries:
            self.pool.release(e)
            self.pool.drop_unwritten(e)

    # -- slots: the scheduler's device calls ----------------------------------------------------------------

    def init_decode_state(self) -> SlotState:
        """Empty decode slots: `slots` rows of prompt + answer KV and (mode comb) the largest context bucket."""
        return init_slots(self.cfg.model, self.slots, self.kv_slots, self._slot_context, self.dtype)

    def encode(self, entries: list[Entry]) -> list[Entry]:
        """Write the pages of the entries not written yet (each once, together); returns those it wrote."""
        misses = list({id(e): e for e in entries if not e.written}.values())
        if misses:
            self.pool.write(self.params, misses, self.serve.encode_batch)
        return misses

    def prefill(self, prompts: list[list[int]], entries: list[list[Entry]], seeds, temperature, top_p):
        """Prefill prompts reading their entries' pages, padded to an admission bucket -> prefix (KVCache,
        CrossContext or None, first tokens [B], key data [B, 2], as `slots.prefill_rows`); rows past len(prompts)
        are padding. seeds: uint32 per prompt (each request's own PRNG stream)."""
        args, static = self._prefill_arguments(prompts, entries, seeds, temperature, top_p)
        return prefill_rows(*args, **static)

    def _prefill_arguments(self, prompts, entries, seeds, temperature, top_p) -> tuple[tuple, dict]:
        """`prefill`'s call of `prefill_rows`: (arguments, static arguments)."""
        n, s = len(prompts), self.serve
        b = bucket_for(n, self.admit_buckets, error=RequestError)
        t = bucket_for(max(len(p) for p in prompts), self.prompt_buckets, error=RequestError)
        prompt = np.zeros((b, t), np.int32)
        lengths = np.ones((b,), np.int32)
        for row, p in enumerate(prompts):
            prompt[row, :len(p)] = p
            lengths[row] = len(p)
        key_data = request_key_data(_pad_rows(seeds, b, 0, np.uint32))
        temp, top = _pad_rows(temperature, b, 0.0, np.float32), _pad_rows(top_p, b, 1.0, np.float32)
        static = dict(cfg=self.cfg.model, slots=self.kv_slots, dtype=self.dtype)
        if not self._slot_context:
            return (self.params, None, None, None, None, prompt, lengths, key_data, temp, top), static
        context = max(1, max(sum(len(x.pages) for x in row) for row in entries) * s.page_tokens)
        table, mask = self.pool.page_table(list(entries) + [[]] * (b - n),
                                           bucket_for(context, self.context_buckets, error=RequestError))
        return (self.params, self.pool.k, self.pool.v, table, mask, prompt, lengths, key_data, temp, top), static

    def prefill_prefix(self, prompts: list[list[int]], seeds, temperature, top_p):
        """Mode prefix: `PrefixCache.prefill` on an admission bucket -> (prefix as `prefill`, one plan per prompt:
        its reused and prefilled pages)."""
        b = bucket_for(len(prompts), self.admit_buckets, error=RequestError)
        return self.prefix.prefill(self.params, prompts, request_key_data(_pad_rows(seeds, b, 0, np.uint32)),
                                   _pad_rows(temperature, b, 0.0, np.float32), _pad_rows(top_p, b, 1.0, np.float32),
                                   slots=self.kv_slots, cfg=self.cfg.model, dtype=self.dtype)

    def insert(self, state: SlotState, slot_ids: list[int], prefix, temperature, top_p) -> SlotState:
        """`state` with the prefilled requests in rows `slot_ids` (the prefix's padding rows, and rows past
        len(slot_ids), are dropped); temperature, top_p per inserted request. Donates `state`."""
        return insert_rows(state, *self._insert_arguments(slot_ids, prefix, temperature, top_p))

    def _insert_arguments(self, slot_ids, prefix, temperature, top_p) -> tuple:
        """`insert`'s arguments of `insert_rows` after the state (prefix: arrays, or their shapes)."""
        kv, ctx, first, key_data = prefix
        b = first.shape[0]
        return (_pad_rows(slot_ids, b, self.slots, np.int32), kv, ctx, first, key_data,
                _pad_rows(temperature, b, 0.0, np.float32), _pad_rows(top_p, b, 1.0, np.float32))

    def generate(self, state: SlotState, active) -> tuple[SlotState, jax.Array]:
        """One decode step of every active slot (active [S] bool) -> (state, next token [S]). Donates `state`."""
        return decode_step(self.params, state, active, cfg=self.cfg.model, dtype=self.dtype)

    def warmup_encoder(self):
        """Compile the chunk processor per chunk bucket (mode comb), writing nothing (every page dropped)."""
        if self.mode != "comb":
            return
        s = self.serve
        for length in s.chunk_buckets:
            tokens = np.zeros((s.encode_batch, length), np.int32)
            drop = np.full((s.encode_batch, length // s.page_tokens), self.pool.num_pages, np.int32)
            self.pool.k, self.pool.v = write_chunks(self.params, self.pool.k, self.pool.v, tokens,
                                                    tokens.astype(bool), drop, cfg=self.cfg.model, dtype=self.dtype)

    def warmup_slots(self, state: SlotState) -> SlotState:
        """Compile `prefill` (mode prefix: `prefill_prefix`) per admission x prompt x context bucket, `insert` per
        batch and context bucket and `generate`, ahead of time (nothing runs: on a CPU, running the prefills on
        zeros cost minutes); the state is returned unchanged."""
        page = self.serve.page_tokens
        for b in self.admit_buckets:
            if self.mode == "prefix":  # per batch x prompt x reused-page bucket, inside `PrefixCache.warmup`
                shapes = self.prefix.warmup(self.params, request_key_data(np.zeros((b,), np.uint32)),
                                            np.zeros((b,), np.float32), np.ones((b,), np.float32),
                                            slots=self.kv_slots, cfg=self.cfg.model, dtype=self.dtype)
                insert_rows.compile(state, *self._insert_arguments([], shapes, [], []))
                continue
            for t in self.prompt_buckets:
                for c in (self.context_buckets if self._slot_context else (0,)):
                    fake = [Entry((0,) * c, [0] * (c // page), written=True)] if c else []  # masked page 0
                    args, static = self._prefill_arguments([[0] * t] * b, [fake] * b, [np.uint32(0)] * b, [0.0] * b,
                                                           [1.0] * b)
                    shapes = prefill_rows.compile(*args, **static)
                    insert_rows.compile(state, *self._insert_arguments([], shapes, [], []))
        # compiled, not run: a run would see the state as `init_slots` made it (uncommitted arrays), which a jit
        # keys apart from the state an insert returns
        decode_step.compile(self.params, state, np.zeros(self.slots, bool), cfg=self.cfg.model, dtype=self.dtype)
        return state

    # -- batches ------------------------------------------------------------------------------------------

    def run(self, requests: list[Request], progress=None, on_result=None) -> list[Result]:
        """Serve every request; results in request order. A bad request gets `Result.error`, the rest run.

        `on_result(result)` is called as each result becomes final (errors at once, answers after their batch),
        so a caller can write them out before the whole run is over.
        """
        results = {r.id: Result(r.id) for r in requests}
        if len(results) != len(requests):
            raise ValueError("request ids must be unique")

        def finish(done: list[Result]):
            for res in done:
                if progress is not None:
                    progress.update(1)
                if on_result is not None:
                    on_result(res)

        pending = collections.deque()
        for r in requests:
            try:
                self.check(r)
                pending.append(r)
            except RequestError as e:
                results[r.id].error = str(e)
                finish([results[r.id]])
        while pending:
            start = time.perf_counter()
            batch, held = [], []
            while pending and len(batch) < self.serve.max_batch:
                r = pending[0]
                try:
                    got = self._acquire(r)
                except RequestError as e:
                    if isinstance(e, PoolFullError) and batch:  # room may free up once this batch is done
                        break
                    pending.popleft()
                    results[r.id].error = str(e)
                    finish([results[r.id]])
                    continue
                pending.popleft()
                batch.append(r)
                held.append(got)
                results[r.id].chunk_hits = sum(hit for _, hit in got)
                results[r.id].chunk_misses = sum(not hit for _, hit in got)
            if not batch:
                continue
            try:
                self._run_batch(batch, [[e for e, _ in got] for got in held], results, start)
            finally:
                for got in held:
                    self._release([e for e, _ in got])
            for r in batch:  # served: now its lookups (mode prefix: its pages) count
                self.pool.record(results[r.id].chunk_hits, results[r.id].chunk_misses)
            finish([results[r.id] for r in batch])
        return [results[r.id] for r in requests]

    def _run_batch(self, batch: list[Request], entries: list[list], results: dict, start: float):
        if self.mode == "prefix":  # no entries: each prompt reads its longest cached prefix
            return self._run_prefix_batch(batch, results, start)
        s = self.serve
        b = s.max_batch
        self.encode([e for row in entries for e in row])

        t = bucket_for(max(len(r.prompt_ids) for r in batch), self.prompt_buckets, error=RequestError)
        prompt = np.zeros((b, t), np.int32)
        lengths = np.ones((b,), np.int32)  # padding rows: one token, no budget
        max_tokens = np.zeros((b,), np.int32)
        temperature = np.zeros((b,), np.float32)
        top_p = np.ones((b,), np.float32)
        for row, r in enumerate(batch):
            prompt[row, :len(r.prompt_ids)] = r.prompt_ids
            lengths[row] = len(r.prompt_ids)
            max_tokens[row] = r.max_tokens or s.max_new_tokens
            temperature[row], top_p[row] = r.temperature, r.top_p
        self.rng, key = jax.random.split(self.rng)
        static = dict(cfg=self.cfg.model, stop_ids=self.stop_ids, dtype=self.dtype)
        prefill_static = dict(static, slots=t + s.max_new_tokens, max_new_tokens=s.max_new_tokens)

        context = max(sum(len(e.pages) for e in row) for row in entries) * s.page_tokens
        if context:
            c = bucket_for(context, self.context_buckets, error=RequestError)
            table, mask = self.pool.page_table(entries + [[]] * (b - len(batch)), c)
            state, ctx = prefill_with_pages(self.params, self.pool.k, self.pool.v, table, mask, prompt, lengths,
                                            key, temperature, top_p, **prefill_static)
        else:
            ctx = None
            state = prefill(self.params, prompt, lengths, None, key, temperature, top_p, **prefill_static)
        state.last_token.block_until_ready()
        ttft = time.perf_counter() - start
        self._decode(batch, state, ctx, max_tokens, temperature, top_p, results, ttft)

    def _decode(self, batch, state, ctx, max_tokens, temperature, top_p, results: dict, ttft: float):
        static = dict(cfg=self.cfg.model, stop_ids=self.stop_ids, dtype=self.dtype)
        state = decode_loop(self.params, state, ctx, max_tokens, temperature, top_p, **static)
        tokens, counts = np.asarray(state.tokens), np.asarray(state.num_generated)
        for row, r in enumerate(batch):
            out = tokens[row, :counts[row]].tolist()
            if out and out[-1] in self.stop_ids:
                out = out[:-1]
            res = results[r.id]
            res.tokens, res.ttft_s = out, ttft

    def _run_prefix_batch(self, batch: list[Request], results: dict, start: float):
        """Mode prefix: `PrefixCache.prefill` (each row its own PRNG stream, split from the engine's), then the
        decode loop. Each row's page hits and misses go to its Result (`run` counts them once served)."""
        s, b = self.serve, self.serve.max_batch
        max_tokens = np.zeros((b,), np.int32)
        temperature = np.zeros((b,), np.float32)
        top_p = np.ones((b,), np.float32)
        for row, r in enumerate(batch):
            max_tokens[row] = r.max_tokens or s.max_new_tokens
            temperature[row], top_p[row] = r.temperature, r.top_p
        self.rng, key, rows = jax.random.split(self.rng, 3)
        (kv, _, first, _), plans = self.prefix.prefill(
            self.params, [r.prompt_ids for r in batch], jax.random.key_data(jax.random.split(rows, b)), temperature,
            top_p, slots=self.kv_slots, cfg=self.cfg.model, dtype=self.dtype)
        first.block_until_ready()
        ttft = time.perf_counter() - start
        for r, plan in zip(batch, plans):
            res = results[r.id]
            res.chunk_hits, res.chunk_misses, res.cached_tokens = plan.hits, plan.misses, plan.reused_tokens
        state = start_state(kv, first, key, max_new_tokens=s.max_new_tokens, stop_ids=self.stop_ids)
        self._decode(batch, state, None, max_tokens, temperature, top_p, results, ttft)

    # -- warm-up ------------------------------------------------------------------------------------------

    def warmup(self):
        """Compile every bucket: chunk processor per chunk bucket, prefill + decode per prompt x context bucket."""
        s, b = self.serve, self.serve.max_batch
        if self.mode == "prefix":
            return self._warmup_prefix()
        self.warmup_encoder()
        contexts = [0] + (list(self.context_buckets) if self.mode == "comb" else [])
        for t in self.prompt_buckets:
            for c in contexts:
                requests = [Request(f"warmup-{i}", [0], max_tokens=1) for i in range(b)]
                entries = [[] for _ in range(b)]
                if c:  # a fake entry spanning the context bucket, never written to the pool (page 0, masked)
                    entries[0] = [Entry((0,) * c, [0] * (c // s.page_tokens), written=True)]
                requests[0].prompt_ids = [0] * t
                self._run_batch(requests, entries, {r.id: Result(r.id) for r in requests}, time.perf_counter())

    def _warmup_prefix(self):
        """Mode prefix: the prefill per prompt x reused-page bucket, then one short batch for the decode loop."""
        b = self.serve.max_batch
        self.prefix.warmup(self.params, jax.random.key_data(jax.random.split(jax.random.key(0), b)),
                           np.zeros((b,), np.float32), np.ones((b,), np.float32), slots=self.kv_slots,
                           cfg=self.cfg.model, dtype=self.dtype)
        requests = [Request("warmup", [0], max_tokens=1)]  # shorter than a page: nothing is cached
        self._run_prefix_batch(requests, {"warmup": Result("warmup")}, time.perf_counter())
        self.prefix.stats = PrefixStats()

"""The scheduler thread: owns the device, admits requests into free decode slots between steps.

One loop, one thread (every JAX call happens here, so the pool's donated buffers are never raced):
1. run queued tasks (document uploads, listings, unpins: they touch the pool too);
2. admit, batched: take every waiting request (oldest first) that has a free slot and whose documents fit the
   pool, acquire their PICaches (device pool hit, else promoted from the host or disk tier, else reserved),
   encode all their misses together (`Engine.encode`, then written through to disk), prefill them in one
   bucketed call (`Engine.prefill`, batch bucket `Engine.admit_buckets`: powers of two up to the slot count) and
   `Engine.insert` them into their slots;
3. one `Engine.generate` step for all slots; each active slot checks its own stop ids, stop strings and token
   budget, streams its new text, and leaves at once when done (its pages are released).
The engine is used only through its scheduler interface (see `Engine`'s docstring). Shapes never change after
`warmup()`: prompts and contexts are bucketed as in the batch engine, the slot state is fixed, and page moves
between tiers use fixed page counts (see `store.read_entry`).

Mode prefix (`serving.prefix`) goes through the same batched admission with no documents: step 2's prefill is
`Engine.prefill_prefix` (`PrefixCache.prefill`), which reads each prompt's longest cached prefix (backbone KV
pages), prefills the rest in one bucketed call and caches the new whole pages; no pages stay held while a request
decodes.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import jax
import numpy as np

from comb_jax.serving.engine import Engine, Request
from comb_jax.serving.limits import DEFAULT_MAX_QUEUE, QueueFull
from comb_jax.serving.metrics import TIERS, ServerMetrics
from comb_jax.serving.names import DocumentIndex, is_content_id
from comb_jax.serving.pool import Entry, PoolFullError, RequestError
from comb_jax.serving.protocol import APIError, Document, Generation
from comb_jax.serving.store import (
    PICacheStore,
    entry_key,
    gather_pages,
    max_entry_pages,
    pool_arrays,
    pool_layout,
    read_entry,
    scatter_pages,
    set_pool_arrays,
    store_fingerprint,
    write_entry,
)

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One generation request. `on_event(kind, payload)` is called on the scheduler thread with ("delta", text),
    ("done", outcome dict) or ("error", APIError); `cancel()` (any thread) frees its slot and pages at the next
    step."""

    id: str
    gen: Generation
    on_event: Callable[[str, object], None]
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of text already streamed
    held: list[Entry] = field(default_factory=list)
    tiers: list[str | None] = field(default_factory=list)  # per entry: the tier it came from, None: encoded
    first_token_at: float | None = None
    full_since: float | None = None
    cached_prompt_tokens: int = 0  # mode prefix: prompt tokens read from the prefix cache

    def cancel(self):
        self.cancelled = True


@dataclass
class DocumentRecord:
    """A document the server knows: raw token ids, text (when given in this process), names, pin state."""

    ids: list[int]
    text: str | None = None
    names: set[str] = field(default_factory=set)
    pinned_until: float | None = None  # math.inf: pinned until DELETE


class Scheduler:
    """Continuous batching over `engine.slots` decode slots. when_full: "reject" (429 when the pool is full of
    pinned pages) or "wait" (queue up to `full_wait_s` for pins to expire or be deleted, then 429). At most
    `max_queue` requests wait for a slot; one more gets 429 with Retry-After."""

    def __init__(self, engine: Engine, codec, store: PICacheStore | None = None, *, when_full: str = "reject",
                 full_wait_s: float = 30.0, metrics: ServerMetrics | None = None, max_queue: int = DEFAULT_MAX_QUEUE):
        if when_full not in ("reject", "wait"):
            raise ValueError(f"when_full must be 'reject' or 'wait', got {when_full!r}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        self.max_queue = max_queue
        self.engine, self.codec, self.store, self.pool = engine, codec, store, engine.pool
        self.when_full, self.full_wait_s = when_full, full_wait_s
        self.metrics = metrics or ServerMetrics()
        self.slots = engine.slots
        self.admissions: list[int] = []  # requests per admission prefill call, in order (for tests and benches)
        self.state = engine.init_decode_state()
        self.active = np.zeros(self.slots, bool)
        self.slot_jobs: list[Job | None] = [None] * self.slots
        self.waiting: deque[Job] = deque()
        self.tasks: deque[tuple[Callable, Future]] = deque()
        self.cond = threading.Condition()
        self.ready = threading.Event()
        self.failed: BaseException | None = None
        self.stopping = False
        self.thread: threading.Thread | None = None
        self.seed_counter = 0
        self.fingerprint = store.fingerprint if store else store_fingerprint(self.pool.fingerprint,
                                                                              pool_layout(self.pool))
        self.documents: dict[str, DocumentRecord] = {}
        self.names: dict[str, str] = {}  # name -> document id (a cache of the index, for lookups from any thread)
        self.bytes_per_token = sum(a.shape[0] * math.prod(a.shape[3:]) * a.dtype.itemsize
                                   for a in pool_arrays(self.pool).values())
        disk = store.disk if store is not None else None
        self.index = DocumentIndex(disk.dir / "index.sqlite" if disk is not None else None)
        if store is not None:
            self.pool.on_evict = lambda entry: store.spill(entry.ids, read_entry(self.pool, entry))
            for key, ids in store.disk_entries():  # documents a previous process encoded
                self._register(Document(self.engine.document_ids(ids)), key)
        self._load_index()

    # -- lifecycle ----------------------------------------------------------------------------------------

    def start(self):
        self.thread = threading.Thread(target=self._run, name="comb-scheduler", daemon=True)
        self.thread.start()
        return self

    def stop(self):
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join()
        if self.store is not None:
            self.store.close()
        self.index.close()

    def submit(self, job: Job):
        """Queue a job; QueueFull (429) when `max_queue` jobs are waiting already."""
        with self.cond:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(len(self.waiting))
            self.waiting.append(job)
            self.metrics.queue_depth.set(len(self.waiting))
            self.metrics.in_flight.inc()
            self.cond.notify_all()

    def call(self, fn: Callable, *args) -> Future:
        """Run `fn(*args)` on the scheduler thread between steps (it may touch the pool)."""
        fut: Future = Future()
        with self.cond:
            self.tasks.append((lambda: fn(*args), fut))
            self.cond.notify_all()
        return fut

    # -- documents ----------------------------------------------------------------------------------------

    def entry_ids(self, doc_ids: list[int]) -> tuple[int, ...]:
        """A single document's pool entry ids (with BOS first when the model encodes chunks that way)."""
        return tuple(self.engine.context_entries(Request("doc", [0], [doc_ids]))[0])

    def document_id(self, doc_ids: list[int]) -> str:
        return "doc-" + entry_key(self.fingerprint, self.entry_ids(doc_ids))[:32]

    def _register(self, doc: Document, key: str | None = None) -> str:
        doc_id = "doc-" + key[:32] if key else self.document_id(doc.ids)
        rec = self.documents.setdefault(doc_id, DocumentRecord(list(doc.ids)))
        if doc.text is not None and rec.text is None:
            rec.text = doc.text
        if doc.name:
            self._name(doc.name, doc_id)
        return doc_id

    def _name(self, name: str, doc_id: str) -> str | None:
        """Give `name` to `doc_id` (in the index first: durable before it is used); returns the document that
        had the name before, if another."""
        old = self.names.get(name)
        if old != doc_id:
            self.index.set_name(name, doc_id)
            if old in self.documents:
                self.documents[old].names.discard(name)
            self.names[name] = doc_id
        self.documents[doc_id].names.add(name)
        return old if old != doc_id else None

    def _load_index(self):
        """Names and pins of an earlier process (pins reach the pool after warm-up: `_restore_pins`)."""
        for name, doc_id in self.index.names().items():
            self.names[name] = doc_id
            if doc_id in self.documents:
                self.documents[doc_id].names.add(name)
        for doc_id, until in self.index.pins().items():
            if doc_id in self.documents:
                self.documents[doc_id].pinned_until = until

    def _restore_pins(self):
        """Scheduler thread, after warm-up: bring pinned documents into the pool and pin them there."""
        for doc_id, rec in self.documents.items():
            if rec.pinned_until is None:
                continue
            try:
                entry, _tier = self._lookup(self.entry_ids(rec.ids))
                if not entry.written:  # on no tier any more: nothing to pin
                    self._release([entry])
                    continue
            except PoolFullError:
                log.warning("PICache pool too small to restore every pin: %s stays on disk", doc_id)
                continue
            entry.pinned = True
            self._release([entry])

    def _document_id_of(self, name_or_id: str) -> str | None:
        """Content ids and names never mix: a content-id-shaped key is looked up by content only."""
        return name_or_id if is_content_id(name_or_id) else self.names.get(name_or_id)

    def find_document(self, name_or_id: str) -> Document | None:
        """A known document by its id or a name it was given (safe from any thread: dict reads)."""
        rec = self.documents.get(self._document_id_of(name_or_id))
        return None if rec is None else Document(list(rec.ids), rec.text, None)

    def _tier(self, doc_ids) -> str | None:
        ids = self.entry_ids(doc_ids)
        entry = self.pool.find(ids)
        if entry is not None and entry.written:
            return "device"
        return self.store.tier(ids) if self.store is not None else None

    def encode_documents(self, docs: list[Document], pin: bool, ttl_s: float | None) -> list[dict]:
        """Scheduler thread: make sure each document has a PICache (encoding misses), pin it if asked."""
        return self.encode_documents_durably(docs, pin, ttl_s)[0]

    def encode_documents_durably(self, docs: list[Document], pin: bool,
                                 ttl_s: float | None) -> tuple[list[dict], list[Future]]:
        """`encode_documents`, plus one future per document that completes when its entry is on disk (at once
        without a store directory): acknowledge the documents only once these are done."""
        held = []
        try:
            for d in docs:
                held.append(self._lookup(self.entry_ids(d.ids)))
            self._encode_misses([e for e, _ in held])
        except PoolFullError as e:
            self._release([e for e, _ in held])
            raise APIError(429, f"the PICache pool is full of pinned pages: {e}", param="documents",
                           code="pool_full") from None
        except BaseException:
            self._release([e for e, _ in held])
            raise
        out = []
        now = time.time()
        for d, (entry, tier) in zip(docs, held):
            doc_id = self._register(Document(d.ids, d.text))
            replaced = self._name(d.name, doc_id) if d.name else None
            rec = self.documents[doc_id]
            if pin or ttl_s:
                entry.pinned = True
                until = now + ttl_s if ttl_s else math.inf
                rec.pinned_until = until if rec.pinned_until is None else max(until, rec.pinned_until)
                self.index.set_pin(doc_id, rec.pinned_until)
            out.append(self._describe(doc_id, rec, found_in=tier or "encoded", replaced=replaced))
        durable = [self._durable(entry) for entry, _ in held]
        self._release([e for e, _ in held])
        self._count_lookups([t for _, t in held])
        return out, durable

    def _durable(self, entry: Entry) -> Future:
        """The entry's disk write (pending or done); one that never happened or failed is written again now."""
        if self.store is None:
            fut: Future = Future()
            fut.set_result(None)
            return fut
        fut = self.store.durable(entry.ids)
        return fut if fut is not None else self.store.persist(entry.ids, read_entry(self.pool, entry))

    def _describe(self, doc_id: str, rec: DocumentRecord, **extra) -> dict:
        tokens = len(self.entry_ids(rec.ids))
        until = rec.pinned_until
        return {"id": doc_id, "object": "document", "names": sorted(rec.names), "tokens": tokens,
                "bytes": tokens * self.bytes_per_token, "tier": self._tier(rec.ids) or "none",
                "pinned": until is not None, "pinned_until": None if until in (None, math.inf) else until, **extra}

    def list_documents(self) -> list[dict]:
        return [self._describe(doc_id, rec) for doc_id, rec in self.documents.items()]

    def unpin(self, name_or_id: str) -> dict | None:
        doc_id = self._document_id_of(name_or_id)
        rec = self.documents.get(doc_id)
        if rec is None:
            return None
        self._unpin(doc_id, rec)
        return self._describe(doc_id, rec)

    def _unpin(self, doc_id: str, rec: DocumentRecord):
        if rec.pinned_until is not None:
            self.index.clear_pin(doc_id)
        rec.pinned_until = None
        entry = self.pool.find(self.entry_ids(rec.ids))
        if entry is not None:
            entry.pinned = False

    def _expire_pins(self):
        now = time.time()
        for doc_id, rec in self.documents.items():
            if rec.pinned_until is not None and rec.pinned_until <= now:
                self._unpin(doc_id, rec)

    # -- validation (any thread: reads configuration only) --------------------------------------------------

    def check_upload(self, docs: list[Document]):
        """413 when an upload's documents together need more pages than the whole pool (429 is for "not now")."""
        pages = self.engine.entry_pages([self.entry_ids(d.ids) for d in docs])
        if pages > self.pool.num_pages:
            raise APIError(413, f"'documents' need {pages} pool pages together but the whole PICache pool has "
                                f"{self.pool.num_pages}: this upload can never fit; send fewer documents at once",
                           param="documents", code="documents_too_large")

    def check(self, gen: Generation, prompt_field: str):
        """APIError (400 naming the field, or 413) when the request can never be served."""
        e = self.engine
        top = e.max_prompt_tokens
        if len(gen.prompt_ids) > top:
            status = 413 if gen.inline_document_tokens else 400
            raise APIError(status, f"'{prompt_field}': the prompt has {len(gen.prompt_ids)} tokens"
                                   f"{' with the documents inlined' if status == 413 else ''}; this server takes at "
                                   f"most {top}", param=prompt_field, code="context_length_exceeded")
        request = Request("check", gen.prompt_ids, [d.ids for d in gen.documents], gen.max_tokens,
                          gen.temperature, gen.top_p)
        entries = e.context_entries(request)
        whole = len(entries) == 1 and len(gen.documents) > 1
        for i, ids in enumerate(entries):
            if len(ids) > e.max_entry_tokens:
                where = "documents" if whole else f"documents[{i}]"
                raise APIError(400, f"'{where}' has {len(ids)} tokens; a document may have at most "
                                    f"{e.max_entry_tokens} (serve.max_chunk_tokens)", param=where,
                               code="document_too_long")
        pages = e.entry_pages(entries)
        if pages > self.pool.num_pages:
            raise APIError(413, f"'documents' need {pages} pool pages but the whole PICache pool has "
                                f"{self.pool.num_pages}: this request can never fit", param="documents",
                           code="context_too_large")
        context, limit = e.context_tokens(entries), e.max_context_tokens
        if context > limit:
            raise APIError(413, f"'documents' make a context of {context} page-rounded tokens; this server reads at "
                                f"most {limit} per request", param="documents", code="context_too_large")
        try:
            e.check(request)  # the batch engine's own checks (vocabulary, budgets): a backstop
        except RequestError as err:
            raise APIError(400, str(err)) from None

    # -- the loop -----------------------------------------------------------------------------------------

    def _run(self):
        try:
            self.warmup()
        except BaseException as e:
            self.failed = e
            log.exception("warm-up failed")
            return
        try:
            self._restore_pins()
        except Exception:  # a pin that cannot come back costs its speed, not the server
            log.exception("restoring pins failed")
        self.ready.set()
        while True:
            with self.cond:
                if self.stopping:
                    break
                free = not self.active.all()
                idle = not self.tasks and not self.active.any() and (not self.waiting or not free or self._blocked)
                if idle:
                    self.cond.wait(timeout=0.02 if self.waiting else 0.5)
                tasks = list(self.tasks)
                self.tasks.clear()
            for fn, fut in tasks:
                try:
                    fut.set_result(fn())
                except BaseException as e:
                    fut.set_exception(e)
            try:
                self._expire_pins()
                self._admit()
                if self.active.any():
                    self._step()
            except Exception as e:  # a bug: fail what is running, keep serving
                log.exception("scheduler step failed")
                for slot in np.flatnonzero(self.active):
                    self._finish(int(slot), None, APIError(500, f"internal error: {type(e).__name__}: {e}"))
            self._gauges()
        for slot in np.flatnonzero(self.active):
            self._finish(int(slot), None, APIError(503, "the server is shutting down"))
        while self.waiting:
            self._fail_waiting(self.waiting.popleft(), APIError(503, "the server is shutting down"))

    _blocked = False  # the oldest waiting request is waiting for pool pages

    def _gauges(self):
        m = self.metrics
        m.pool_pages_in_use.set(self.pool.used_pages)
        m.pool_pages.set(self.pool.num_pages)
        m.queue_depth.set(len(self.waiting))
        m.active_slots.set(int(self.active.sum()))
        if self.store is not None:
            m.host_entries.set(len(self.store.host.entries))

    def _fail_waiting(self, job: Job, error: APIError):
        self.metrics.in_flight.dec()
        job.on_event("error", error)

    def _admit(self):
        """Admit every waiting request that has a slot and fits the pool: encode their misses together, prefill
        them in one call. A request that does not fit (pool full) waits at the head for a later turn."""
        self._blocked = False
        free = int((~self.active).sum())
        batch: list[Job] = []
        pending: set[int] = set()  # entries this admission encodes: a later request finds them as device hits
        while self.waiting and len(batch) < free:
            job = self.waiting[0]
            if job.cancelled:
                self.waiting.popleft()
                self.metrics.in_flight.dec()
                continue
            try:
                self._acquire(job)
            except PoolFullError as e:
                if batch:  # admit what fits now; this one retries next turn
                    break
                now = time.perf_counter()
                job.full_since = job.full_since or now
                if self.active.any():  # pages come free as running requests finish
                    self._blocked = True
                    return
                if self.when_full == "reject" or now - job.full_since > self.full_wait_s:
                    self.waiting.popleft()
                    self._fail_waiting(job, APIError(429, f"the PICache pool is full of pinned pages: {e}",
                                                     param="documents", code="pool_full"))
                    continue
                self._blocked = True
                return
            except RequestError as e:
                self.waiting.popleft()
                self._fail_waiting(job, APIError(400, str(e), param="documents"))
                continue
            self.waiting.popleft()
            job.tiers = ["device" if t is None and id(e) in pending else t for e, t in zip(job.held, job.tiers)]
            pending.update(id(e) for e, t in zip(job.held, job.tiers) if t is None)
            self._count_lookups(job.tiers)
            batch.append(job)
        if not batch:
            return
        try:
            self._encode_misses([e for job in batch for e in job.held])
            free_slots = [int(i) for i in np.flatnonzero(~self.active)[:len(batch)]]
            self._prefill_into(batch, free_slots)
        except Exception as e:
            log.exception("admission failed")
            for job in batch:
                if job.held and all(j is not job for j in self.slot_jobs):
                    self._release(job.held)
                    job.held = []
                    self._fail_waiting(job, APIError(500, f"internal error: {type(e).__name__}: {e}"))

    def _lookup(self, ids) -> tuple[Entry, str | None]:
        """A pool entry for `ids`, refcount held: ("device") a pool hit, ("host"/"disk") promoted from the store,
        or (None) reserved and still to be encoded."""
        entry, hit = self.pool.acquire(ids, count=False)
        if hit and entry.written:
            return entry, "device"
        if not hit and self.store is not None:
            try:
                found = self.store.get(ids)
                if found is not None:
                    write_entry(self.pool, entry, found[0])
                    entry.written = True
                    return entry, found[1]
            except BaseException:
                self._release([entry])
                raise
        return entry, None

    def _acquire(self, job: Job):
        """All of a request's entries or none (misses reserved, encoded by the caller with the rest of the
        admission). The caller counts the lookups once the request is admitted."""
        request = Request(job.id, job.gen.prompt_ids, [d.ids for d in job.gen.documents])
        held = []
        try:
            for ids in self.engine.context_entries(request):
                held.append(self._lookup(ids))
        except BaseException:
            self._release([e for e, _ in held])
            raise
        job.held, job.tiers = [e for e, _ in held], [t for _, t in held]
        for d in job.gen.documents:
            self._register(d)

    def _count_lookups(self, tiers: list[str | None]):
        for t in tiers:
            if t is None:
                self.metrics.picache_misses.inc()
            else:
                self.metrics.picache_hits.labels(tier=t).inc()
        self.pool.record(sum(t == "device" for t in tiers), sum(t != "device" for t in tiers))

    def _encode_misses(self, entries: list[Entry]):
        misses = self.engine.encode(entries)
        if self.store is not None:
            for e in misses:  # written through, so the next process finds them
                self.store.persist(e.ids, read_entry(self.pool, e))

    def _release(self, entries: list[Entry]):
        for e in entries:
            self.pool.release(e)
            self.pool.drop_unwritten(e)

    def _seed(self, gen: Generation) -> np.uint32:
        if gen.seed is not None:
            return np.uint32(gen.seed % (1 << 32))
        self.seed_counter += 1
        return np.uint32((self.engine.seed * 1_000_003 + self.seed_counter) % (1 << 32))

    def _prefill_prefix(self, jobs: list[Job], seeds, temperature, top_p):
        """Mode prefix: `Engine.prefill_prefix`; counts each prompt's reused and prefilled pages."""
        prefix, plans = self.engine.prefill_prefix([job.gen.prompt_ids for job in jobs], seeds, temperature, top_p)
        for job, plan in zip(jobs, plans):
            job.cached_prompt_tokens = plan.reused_tokens
            self.metrics.prefix_prompt(plan.length, plan.reused_tokens, plan.hits, plan.misses)
            self.pool.record(plan.hits, plan.misses)
        return prefix

    def _prefill_into(self, jobs: list[Job], slot_ids: list[int]):
        gens = [job.gen for job in jobs]
        temps, tops = [g.temperature for g in gens], [g.top_p for g in gens]
        seeds = [self._seed(g) for g in gens]
        if self.engine.mode == "prefix":
            prefix = self._prefill_prefix(jobs, seeds, temps, tops)
        else:
            prefix = self.engine.prefill([g.prompt_ids for g in gens], [job.held for job in jobs], seeds, temps, tops)
        self.state = self.engine.insert(self.state, slot_ids, prefix, temps, tops)
        first = np.asarray(prefix[2])
        self.admissions.append(len(jobs))
        now = time.perf_counter()
        for job, slot in zip(jobs, slot_ids):
            job.first_token_at = now
            self.metrics.ttft.observe(now - job.arrived)
            self.metrics.prompt_tokens.inc(len(job.gen.prompt_ids))
            self.metrics.tokens(1)
            self.active[slot] = True
            self.slot_jobs[slot] = job
        for row, slot in enumerate(slot_ids):
            self._advance(slot, int(first[row]))

    def _step(self):
        self.state, nxt = self.engine.generate(self.state, self.active)
        nxt = np.asarray(nxt)
        self.metrics.tokens(int(self.active.sum()))
        for slot in np.flatnonzero(self.active):
            self._advance(int(slot), int(nxt[slot]))

    def _advance(self, slot: int, token: int):
        """A slot's new token: stream its text, or finish on a stop id, a stop string, the budget or a cancel."""
        job = self.slot_jobs[slot]
        if job.cancelled:
            return self._finish(slot, "cancelled")
        if token in self.engine.stop_ids:
            return self._finish(slot, "stop")
        job.tokens.append(token)
        text = self.codec.decode(job.tokens)
        cuts = [i for i in (text.find(s) for s in job.gen.stop) if i >= 0]
        if cuts:
            return self._finish(slot, "stop", text=text[:min(cuts)])
        if len(job.tokens) >= job.gen.max_tokens:
            return self._finish(slot, "length", text=text)
        safe = len(text) - 1 if text.endswith("\ufffd") else len(text)  # a character still being decoded
        for s in job.gen.stop:  # hold back what may be the start of a stop string
            for k in range(min(len(s) - 1, safe), 0, -1):
                if text[:safe].endswith(s[:k]):
                    safe -= k
                    break
        if safe > job.sent:
            job.on_event("delta", text[job.sent:safe])
            job.sent = safe

    def _finish(self, slot: int, reason: str | None, error: APIError | None = None, text: str | None = None):
        job = self.slot_jobs[slot]
        self.active[slot] = False
        self.slot_jobs[slot] = None
        self._release(job.held)
        self.metrics.in_flight.dec()
        if reason == "cancelled":
            return
        if error is not None:
            job.on_event("error", error)
            return
        if text is None:
            text = self.codec.decode(job.tokens)
        if len(text) > job.sent:
            job.on_event("delta", text[job.sent:])
            job.sent = len(text)
        self.metrics.latency.observe(time.perf_counter() - job.arrived)
        job.on_event("done", {"text": text, "finish_reason": reason, "usage": self._usage(job),
                              "documents": [self.document_id(d.ids) for d in job.gen.documents]})

    def _usage(self, job: Job) -> dict:
        gen = job.gen
        lengths = [e.length for e in job.held]
        documents = sum(lengths) if gen.documents else gen.inline_document_tokens
        cached = sum(n for n, t in zip(lengths, job.tiers) if t is not None)
        self.metrics.document_tokens.inc(documents)
        self.metrics.cached_document_tokens.inc(cached)
        prompt = len(gen.prompt_ids)
        return {"prompt_tokens": prompt, "completion_tokens": len(job.tokens),
                "total_tokens": prompt + len(job.tokens),
                "prompt_tokens_details": {"cached_tokens": job.cached_prompt_tokens}, "document_tokens": documents,
                "cached_document_tokens": cached,
                "document_hits": {t: sum(x == t for x in job.tiers) for t in TIERS},
                "document_misses": sum(x is None for x in job.tiers)}

    # -- warm-up ------------------------------------------------------------------------------------------

    def warmup(self):
        """Compile every shape the loop uses: the chunk processor per chunk bucket, the tier page moves, the
        prefill per prompt x context bucket, `insert` per context bucket, and the decode step."""
        self.engine.warmup_encoder()
        if self.engine.mode == "comb" and self.store is not None:
            pool = self.pool
            width = max_entry_pages(pool)
            values = gather_pages(pool_arrays(pool), np.zeros((width,), np.int32))
            set_pool_arrays(pool, scatter_pages(pool_arrays(pool), np.full((width,), pool.num_pages, np.int32),
                                                jax.tree.map(np.asarray, values)))
        self.state = self.engine.warmup_slots(self.state)

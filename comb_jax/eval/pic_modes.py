"""Ways of answering one request (prefix + chunks + question) on the same model, side by side (spec section 6).

A request arrives as token ids (`text.prompt.Segments`): a fixed template `prefix`, the `chunks`, and a `suffix` holding
the question and the assistant header. The decoder-side modes all put exactly `prefix + chunks + suffix` into
the decoder's KV cache, slot for slot, and differ only in how the context slots get there:

- "full": the whole prompt is prefilled, nothing is cached.
- "prefix": exact prefix caching. The KV of every prefix ending at a chunk boundary is kept in a small
  host-side LRU cache; a request reuses the longest cached prefix whose token ids are identical and prefills
  the rest. Exact by construction.
- "naive": every chunk's KV is computed by the decoder alone at positions 0..L-1 and cached per chunk; a
  request concatenates them behind the (exactly cached) template prefix with no correction.
- "rerotate": the same per-chunk cache, but the keys are rotated to the chunk's real position o. The stored
  keys carry RoPE at chunk-local positions j, i.e. they are the pre-RoPE keys up to a fixed known rotation;
  rotations compose (R(o) R(j) = R(o + j)), so rotating by o gives exactly the keys the chunk would have had
  had it been computed alone at positions o..o+L-1.
- "epic": "rerotate" plus recomputing the first `epic_k` tokens of every chunk with attention to everything
  before them (EPIC / LegoLink: those tokens act as attention sinks when a chunk is computed alone).
- "comb": each chunk is encoded by the Comb encoder into a PICache (cached per chunk), the PICaches are
  concatenated, and only `comb_prompt` (the question alone, chat-templated) is prefilled through the cross
  blocks. The context never enters the decoder's KV cache.
- "kvpacket": KV Packet (comb_jax/methods/kvpacket.py): "naive"'s per-chunk backbone KV, each followed by the KV of a
  few trained soft tokens (computed once per chunk, cached with it), with no rotation or recomputation.

The chunk caches of naive / rerotate / epic / kvpacket / comb (and the template-prefix entries the chunk-reuse modes
keep) live in device page pools (`pool.PagePool`, one per mode and kind of page: backbone KV, KV packets, Comb
PICaches), gathered into a dense context per request. `joint_threshold` >= 0 (a float, or {mode: threshold}) turns on
the pools' joint encoding (`joint_pages.PageSharing`): pages close to a stored page (relative distance <= threshold)
are served from that shared page.

Every mode returns an `Answer`: greedy tokens, time to first token, how many chunks were served from cache.
The compute is a handful of jit-compiled pure functions over `model.forward` / `model.encode`; the exact prefix
cache is a host-side dict in `PicRunner`. Variable lengths are padded to power-of-two buckets (right padding is
harmless to `forward`, see its docstring) so that few shapes compile.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from comb_jax.config import MeshConfig, ModelConfig, ServeConfig
from comb_jax.methods.comb import comb_chunks
from comb_jax.methods.kvpacket import num_tokens, packet_chunks
from comb_jax.methods.naive import backbone_chunks
from comb_jax.model.buckets import power_of_two
from comb_jax.model.decode import DecodeState, decode_loop
from comb_jax.model.sharding import make_mesh
from comb_jax.model.transformer import KVCache, PICache, apply_rope, forward, init_kv_cache, lm_logits, rope_tables
from comb_jax.serving.pool import PagePool, gather_tokens
from comb_jax.text.prompt import Segments

MODES = ("full", "prefix", "naive", "rerotate", "epic", "comb", "kvpacket")
# the context sits in the decoder's KV cache slot for slot ("kvpacket" adds trailer slots, so it is not one of them)
DECODER_MODES = ("full", "prefix", "naive", "rerotate", "epic")


@dataclass
class Answer:
    tokens: list[int]  # generated ids, stop id excluded
    ttft_s: float  # request start (ids on host) to first token id on host
    total_s: float  # request start to the last generated token on host
    chunk_hits: int  # chunks served from this mode's cache
    num_chunks: int
    kv_cache: KVCache | None = None  # decoder cache after the prompt prefill (decoder-side modes)
    last_hidden: np.ndarray | None = None  # [embed] final-norm hidden state that predicts the first token


def _pad(ids, width: int) -> jax.Array:
    out = np.zeros((1, width), np.int32)
    out[0, :len(ids)] = ids
    return jnp.asarray(out)


# ----------------------------------------------------------------------------------------------------------
# Pure compute (jit): each takes `cfg` (a hashable ModelConfig) and `dtype` as static arguments.


@partial(jax.jit, static_argnames=("cfg", "dtype"))
def extend(params, cache: KVCache, tokens, num_real, *, cfg: ModelConfig, dtype=jnp.float32):
    """Append tokens [1, T] (first `num_real` real) at the cache's length.

    Returns (hidden [1, T, embed], cache advanced by num_real, float32 logits [1, vocab] of the last real token).
    """
    hidden, cache = forward(params, tokens, cfg, None, cache, jnp.reshape(num_real, (1,)), dtype)
    last = jax.lax.dynamic_slice_in_dim(hidden, num_real - 1, 1, axis=1)
    return hidden, cache, lm_logits(params, last)[:, 0]


@partial(jax.jit, static_argnames=("cfg", "slots", "dtype"))
def comb_prefill(params, picache: PICache, tokens, num_real, *, cfg: ModelConfig, slots: int, dtype=jnp.float32):
    """Prefill the Comb prompt [1, T] reading `picache`; returns (hidden, cache, last-token logits [1, vocab])."""
    cache = init_kv_cache(cfg, 1, slots, dtype)
    hidden, cache = forward(params, tokens, cfg, picache, cache, jnp.reshape(num_real, (1,)), dtype)
    last = jax.lax.dynamic_slice_in_dim(hidden, num_real - 1, 1, axis=1)
    return hidden, cache, lm_logits(params, last)[:, 0]


@partial(jax.jit, static_argnames=("cfg", "dtype"))
def chunk_kv(params, tokens, num_real, *, cfg: ModelConfig, dtype=jnp.float32):
    """The decoder's own KV of tokens [1, L] computed alone at positions 0..L-1 -> k, v [N, L, K, D] (what a
    backbone-KV pool stores: `pool.backbone_chunks`)."""
    k, v = backbone_chunks(params, tokens, jnp.arange(tokens.shape[1])[None, :] < num_real, cfg=cfg, dtype=dtype)
    return k[:, 0], v[:, 0]


@partial(jax.jit, static_argnames=("cfg", "slots"))
def assemble(keys, values, shift, length, *, cfg: ModelConfig, slots: int) -> KVCache:
    """Context KV [N, S, K, D] -> a one-row KVCache of `slots` slots holding it, with `length` tokens written.

    Key s is rotated by RoPE through `shift[s]` positions (0 leaves it unchanged: cos 0 = 1, sin 0 = 0).
    """
    cos, sin = rope_tables(cfg, shift[None, :])
    keys = apply_rope(keys, cos, sin)
    pad = ((0, 0), (0, slots - keys.shape[1]), (0, 0), (0, 0))
    return KVCache(jnp.pad(keys, pad)[:, None], jnp.pad(values, pad)[:, None], jnp.reshape(length, (1,)))


@partial(jax.jit, static_argnames=("cfg", "dtype"))
def last_layer_attention(params, cache: KVCache, tokens, start, *, cfg: ModelConfig, dtype=jnp.float32):
    """Attention probabilities [T, H, M] of tokens [1, T] at slots start.. in the decoder's last layer.

    `cache` must already hold every slot the tokens see (e.g. the cache right after their prefill). The last
    layer's normalised input is `forward` over the first N-1 layers with the final norm swapped for the last
    layer's attention norm; its queries then attend over the cache's last-layer keys, causally.
    """
    n = cfg.num_layers
    bb = params["backbone"]
    last = jax.tree.map(lambda a: a[n - 1], bb["layers"])
    head = {"embed": bb["embed"], "layers": jax.tree.map(lambda a: a[: n - 1], bb["layers"]),
            "final_norm": last["attn_norm"]}
    head_cfg = dataclasses.replace(cfg, num_layers=n - 1, num_cross_layers=1)
    head_cache = KVCache(cache.k[: n - 1], cache.v[: n - 1], jnp.reshape(start, (1,)))
    h, _ = forward({"backbone": head}, tokens, head_cfg, None, head_cache, None, dtype)
    positions = start + jnp.arange(tokens.shape[1])[None, :]
    cos, sin = rope_tables(cfg, positions)
    q = apply_rope(jnp.einsum("bte,ehd->bthd", h, last["wq"].astype(dtype)), cos, sin)
    keys = cache.k[n - 1].astype(dtype)  # [1, M, K, D]
    group = cfg.num_heads // cfg.num_kv_heads
    logits = jnp.einsum("bthd,bmhd->bthm", q, jnp.repeat(keys, group, axis=2),
                        preferred_element_type=jnp.float32) / np.sqrt(cfg.head_dim)
    visible = jnp.arange(keys.shape[1])[None, None, None, :] <= positions[:, :, None, None]
    return jax.nn.softmax(jnp.where(visible, logits, -jnp.inf), axis=-1)[0]


# ----------------------------------------------------------------------------------------------------------
# Host side: per-mode caches, assembly, timing


class PicRunner:
    """Answers requests in any mode on one model. Each mode has its own caches (`reset()` empties them).

    params: {"backbone", "comb"}; stop_ids end generation; epic_k: tokens recomputed at the start of each chunk
    in "epic"; prefix_entries: capacity of the exact prefix cache (LRU, in requests); pic_dtype: how "comb"'s chunk
    caches are stored (`serve.pic_dtype`, e.g. int8; the backbone KV pools store the compute dtype);
    joint_threshold: joint encoding of the chunk-cache pools (< 0 off; one for every mode or {mode: threshold});
    joint_page_tokens: their page size; pool_tokens: tokens each pool holds (`reserve` raises it for a request set;
    a full pool evicts its least recently used chunks).
    """

    def __init__(self, params, cfg: ModelConfig, *, stop_ids=(), max_new_tokens: int = 32, epic_k: int = 16,
                 dtype=jnp.float32, prefix_entries: int = 16, pic_dtype: str = "auto", joint_threshold: float = -1.0,
                 joint_page_tokens: int = 16, pool_tokens: int = 8192):
        if epic_k < 1:
            raise ValueError(f"epic_k must be >= 1, got {epic_k}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.params, self.cfg, self.dtype, self.pic_dtype = params, cfg, dtype, pic_dtype
        self.stop_ids = tuple(int(i) for i in stop_ids)
        self.max_new_tokens, self.epic_k, self.prefix_entries = max_new_tokens, epic_k, prefix_entries
        self.joint_threshold, self.joint_page_tokens = joint_threshold, joint_page_tokens
        self.pool_tokens = pool_tokens
        self.mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.local_devices()[:1])
        self.reset()

    def reset(self):
        # prefix mode: token-id prefix at a chunk boundary -> (k, v [N, P_entry, K, D] numpy, entry id)
        self.prefix_cache: collections.OrderedDict = collections.OrderedDict()
        # chunk caches: (mode, kind) -> PagePool, made on first use (dropped here, so their device memory goes)
        self.pools: dict[tuple[str, str], PagePool] = {}

    def _threshold(self, mode: str) -> float:
        t = self.joint_threshold  # one for every mode, or {mode: threshold}
        return t.get(mode, -1.0) if isinstance(t, dict) else t

    def _pool(self, mode: str, kind: str) -> PagePool:
        """The pool of `mode`'s `kind` of pages: "backbone" (the decoder's own KV of a chunk alone: naive, rerotate,
        epic, and kvpacket's template prefix), "packet" (that + the KV Packet trailer) or "comb" (PICaches)."""
        if (mode, kind) not in self.pools:
            pt, layers, extra, pic_dtype = self.joint_page_tokens, self.cfg.num_layers, 0, "auto"
            if kind == "comb":
                processor, layers, pic_dtype = comb_chunks, self.cfg.num_cross_layers, self.pic_dtype
            elif kind == "packet":
                processor, extra = packet_chunks, num_tokens(self.params["kvpacket"])
            else:
                processor = backbone_chunks
            # chunks up to max_position tokens, padded to page multiples of powers of two (pt = 16: `bucket`'s)
            buckets = tuple(pt << i for i in range(max(0, math.ceil(math.log2(self.cfg.max_position / pt))) + 1))
            serve = ServeConfig(page_tokens=pt, pool_tokens=max(self.pool_tokens, pt), pool_fraction=0.0,
                                max_chunk_tokens=buckets[-1], chunk_buckets=buckets, pic_dtype=pic_dtype,
                                joint_page_threshold=self._threshold(mode))
            self.pools[mode, kind] = PagePool(self.cfg, serve, f"pic_modes/{mode}/{kind}", self.mesh, self.dtype,
                                              layers=layers, processor=processor, extra_tokens=extra)
        return self.pools[mode, kind]

    def reserve(self, segments):
        """Size the pools made from now on (`reset` drops the current ones) to hold every chunk and template prefix
        of `segments` at once, so that a run over them never evicts."""
        pt = self.joint_page_tokens
        extra = int(self.params["kvpacket"]["trailer"].shape[0]) if "kvpacket" in self.params else 0
        pieces = {c for s in segments for c in s.chunks + s.comb_chunks} | {s.prefix for s in segments}
        need = sum(pt * math.ceil((len(c) + extra) / pt) for c in pieces if c)
        self.pool_tokens = max(self.pool_tokens, need)

    def _pools_of(self, mode: str) -> list[PagePool]:
        return [pool for (m, _), pool in self.pools.items() if m == mode]

    def cache_bytes_per_token(self, mode: str) -> float:
        """Bytes this mode keeps per cached context token, measured on what its caches hold now (0 if empty).

        For the pools: the bytes of the physical pages' valid tokens over the logical tokens they serve (the
        template prefix and KV Packet trailers included), so a pool that fuses no page reports its per-token bytes.
        """
        if mode == "prefix":
            entries = {entry_id: (k, v) for k, v, entry_id in self.prefix_cache.values()}.values()
            tokens = sum(k.shape[1] for k, _ in entries)
            return sum(k.nbytes + v.nbytes for k, v in entries) / tokens if tokens else 0.0
        stored, logical = 0, 0
        for pool in self._pools_of(mode):
            entries = [e for bucket in pool.entries.values() for e in bucket if e.written]
            slot_bytes = sum(a.nbytes for a in jax.tree.leaves((pool.k, pool.v))) / (pool.num_pages
                                                                                   * pool.serve.page_tokens)
            physical = {p for e in entries for p in e.pages}
            stored += slot_bytes * int(sum(pool.sharing.valid[p] for p in physical))
            logical += sum(pool.stored_tokens(e) for e in entries)
        return stored / logical if logical else 0.0

    def page_compression(self, mode: str) -> float | None:
        """Logical over physical pages of `mode`'s chunk caches under joint encoding; None when it is off."""
        pools = self._pools_of(mode)
        if self._threshold(mode) < 0 or not pools:
            return None
        logical, physical = 0, 0
        for pool in pools:
            entries = [e for bucket in pool.entries.values() for e in bucket]
            logical += sum(len(e.pages) for e in entries)
            physical += len({p for e in entries for p in e.pages})
        return logical / max(1, physical)

    def answer(self, mode: str, seg: Segments) -> Answer:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
        if not seg.suffix or not seg.comb_prompt:
            raise ValueError("a request needs a non-empty suffix (question) and comb_prompt")
        return getattr(self, f"_{mode}")(seg)

    # -- shared pieces -----------------------------------------------------------------------------------

    def _slots(self, prompt_len: int) -> int:
        return power_of_two(prompt_len + self.max_new_tokens, 64)

    def _prefill_rest(self, cache: KVCache, ids) -> tuple:
        """Prefill `ids` behind what `cache` holds; returns (hidden of the last real token, cache, logits)."""
        hidden, cache, logits = extend(self.params, cache, _pad(ids, power_of_two(len(ids))), jnp.int32(len(ids)),
                                       cfg=self.cfg, dtype=self.dtype)
        return hidden[0, len(ids) - 1], cache, logits

    def _finish(self, start, cache, logits, last_hidden, picache, hits, num_chunks, keep_cache) -> Answer:
        """Sample the first token (TTFT), then run the jit-compiled decode loop."""
        first = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # greedy, as decode.sample at temperature 0
        int(first[0])  # the first token id is on the host
        ttft = time.perf_counter() - start
        rng = jax.random.key(0)
        greedy = (jnp.zeros((1,), jnp.float32), jnp.ones((1,), jnp.float32))
        last_hidden = np.asarray(last_hidden)
        prefill_cache = cache if keep_cache else None
        if keep_cache:  # decode_loop donates its state: keep our own copy of the prompt's cache
            cache = jax.tree.map(jnp.copy, cache)
        tokens = jnp.zeros((1, self.max_new_tokens), jnp.int32).at[:, 0].set(first)
        done = jnp.isin(first, jnp.asarray(self.stop_ids, jnp.int32))
        state = DecodeState(cache, first, tokens, jnp.ones((1,), jnp.int32), done, rng)
        state = decode_loop(self.params, state, picache, jnp.full((1,), self.max_new_tokens, jnp.int32), *greedy,
                            cfg=self.cfg, stop_ids=self.stop_ids, dtype=self.dtype)
        out = np.asarray(state.tokens[0, : int(state.num_generated[0])]).tolist()
        total = time.perf_counter() - start
        if out and out[-1] in self.stop_ids:
            out = out[:-1]
        return Answer(out, ttft, total, hits, num_chunks, prefill_cache, last_hidden)

    def cached_context(self, pieces) -> tuple[jax.Array, jax.Array, list[int], int]:
        """Dense context from the pools. pieces: [(pool, ids, counted)] in context order; chunks missing from their
        pool are computed by its processor and stored (equality is on the ids themselves).

        Returns k, v [layers, W, K, D] (each piece's stored tokens back to back, zeros from their total to
        W = power_of_two(total)), the stored tokens of each piece, and how many `counted` pieces were hits. A request's
        entries are in use (not evictable) until its context is gathered.
        """
        entries, hits = [], 0
        try:
            for pool, ids, counted in pieces:
                entry, hit = pool.acquire(ids, count=False)
                entries.append((pool, entry))
                hits += hit and counted
            for pool in {id(p): p for p, _ in entries}.values():
                misses = {id(e): e for p, e in entries if p is pool and not e.written}  # a chunk twice: once
                pool.write(self.params, list(misses.values()), batch=1)
            lengths = [pool.stored_tokens(e) for pool, e in entries]
            width = power_of_two(sum(lengths))
            k = v = None
            for pool in {id(p): p for p, _ in entries}.values():  # each pool fills its pieces' slots, zeros elsewhere
                slots, valid, at = np.zeros((1, width), np.int32), np.zeros((1, width), bool), 0
                for (p, e), n in zip(entries, lengths):
                    if p is pool:
                        slots[0, at:at + n], valid[0, at:at + n] = pool.token_slots(e), True
                    at += n
                pk, pv = gather_tokens(pool.k, pool.v, slots, valid, dtype=self.dtype)
                k, v = (pk, pv) if k is None else (k + pk, v + pv)
        finally:
            for pool, e in entries:
                pool.release(e)
                pool.drop_unwritten(e)  # a failed request leaves no reserved pages behind
        return k[:, 0], v[:, 0], lengths, hits

    # -- modes -------------------------------------------------------------------------------------------

    def _full(self, seg: Segments) -> Answer:
        start = time.perf_counter()
        cache = init_kv_cache(self.cfg, 1, self._slots(len(seg.full)), self.dtype)
        hidden, cache, logits = self._prefill_rest(cache, seg.full)
        return self._finish(start, cache, logits, hidden, None, 0, len(seg.chunks), True)

    def _prefix(self, seg: Segments) -> Answer:
        start = time.perf_counter()
        bounds = [len(seg.prefix) + sum(len(c) for c in seg.chunks[:i]) for i in range(len(seg.chunks) + 1)]
        full, context = seg.full, seg.context
        cache = init_kv_cache(self.cfg, 1, self._slots(len(full)), self.dtype)
        reused, hits = 0, 0
        for i in range(len(bounds) - 1, -1, -1):  # longest cached prefix first
            key = context[: bounds[i]]
            if key in self.prefix_cache:
                self.prefix_cache.move_to_end(key)
                k, v, _ = self.prefix_cache[key]
                reused, hits = bounds[i], i
                n = reused
                cache = KVCache(cache.k.at[:, 0, :n].set(k[:, :n]), cache.v.at[:, 0, :n].set(v[:, :n]),
                                jnp.full((1,), n, jnp.int32))
                break
        hidden, cache, logits = self._prefill_rest(cache, full[reused:])
        answer = self._finish(start, cache, logits, hidden, None, hits, len(seg.chunks), True)
        if reused < len(context):  # store the context's KV once, reachable from every chunk boundary
            k = np.asarray(cache.k[:, 0, : len(context)])
            v = np.asarray(cache.v[:, 0, : len(context)])
            for b in bounds:
                self.prefix_cache[context[:b]] = (k, v, id(k))
                self.prefix_cache.move_to_end(context[:b])
            while len({e for _, _, e in self.prefix_cache.values()}) > self.prefix_entries:
                self.prefix_cache.popitem(last=False)
        return answer

    def _chunk_reuse(self, seg: Segments, mode: str) -> Answer:
        """naive / rerotate / epic: per-chunk decoder KV computed alone, placed behind the template prefix."""
        start = time.perf_counter()
        pool = self._pool(mode, "backbone")
        # the template prefix always sits at position 0: its cached KV is exact
        pieces = [(pool, seg.prefix, False)] if seg.prefix else []
        keys, values, _, hits = self.cached_context(pieces + [(pool, ids, True) for ids in seg.chunks])
        offsets = seg.chunk_offsets()
        shift = np.zeros(keys.shape[1], np.int32)
        if mode != "naive":
            for ids, offset in zip(seg.chunks, offsets):
                shift[offset:offset + len(ids)] = offset
        length = len(seg.context)
        cache = assemble(keys, values, jnp.asarray(shift), jnp.int32(length), cfg=self.cfg,
                         slots=self._slots(len(seg.full)))
        if mode == "epic":  # recompute each chunk's first tokens in place, in order, seeing all before them
            for ids, offset in zip(seg.chunks, offsets):
                head = ids[: self.epic_k]  # exact length: padding would overwrite the chunk's later slots
                cache = KVCache(cache.k, cache.v, jnp.full((1,), offset, jnp.int32))
                _, cache, _ = extend(self.params, cache, jnp.asarray([head], jnp.int32), jnp.int32(len(head)),
                                     cfg=self.cfg, dtype=self.dtype)
            cache = KVCache(cache.k, cache.v, jnp.full((1,), length, jnp.int32))
        hidden, cache, logits = self._prefill_rest(cache, seg.suffix)
        return self._finish(start, cache, logits, hidden, None, hits, len(seg.chunks), True)

    def _naive(self, seg: Segments) -> Answer:
        return self._chunk_reuse(seg, "naive")

    def _rerotate(self, seg: Segments) -> Answer:
        return self._chunk_reuse(seg, "rerotate")

    def _epic(self, seg: Segments) -> Answer:
        return self._chunk_reuse(seg, "epic")

    def _kvpacket(self, seg: Segments) -> Answer:
        """Answer from packets: exact template-prefix KV, then each chunk's cached packet, no rotation; the
        question is prefilled behind the last packet slot."""
        start = time.perf_counter()
        # the template prefix has no trailer: it lives in a backbone-KV pool beside the packets
        pieces = [(self._pool("kvpacket", "backbone"), seg.prefix, False)] if seg.prefix else []
        packets = self._pool("kvpacket", "packet")
        keys, values, lengths, hits = self.cached_context(pieces + [(packets, ids, True) for ids in seg.chunks])
        length = sum(lengths)
        cache = assemble(keys, values, jnp.zeros((keys.shape[1],), jnp.int32), jnp.int32(length), cfg=self.cfg,
                         slots=self._slots(length + len(seg.suffix)))
        hidden, cache, logits = self._prefill_rest(cache, seg.suffix)
        return self._finish(start, cache, logits, hidden, None, hits, len(seg.chunks), True)

    def _comb(self, seg: Segments) -> Answer:
        start = time.perf_counter()
        chunks, hits = seg.comb_chunks or seg.chunks, 0
        picache = None  # no chunks: the plain backbone
        if chunks:
            pool = self._pool("comb", "comb")
            keys, values, lengths, hits = self.cached_context([(pool, ids, True) for ids in chunks])
            mask = jnp.asarray(np.arange(keys.shape[1]) < sum(lengths))[None]
            picache = PICache(keys[:, None], values[:, None], mask)
        prompt = seg.comb_prompt
        hidden, cache, logits = comb_prefill(self.params, picache, _pad(prompt, power_of_two(len(prompt))),
                                             jnp.int32(len(prompt)), cfg=self.cfg, slots=self._slots(len(prompt)),
                                             dtype=self.dtype)
        return self._finish(start, cache, logits, hidden[0, len(prompt) - 1], picache, hits, len(seg.chunks),
                            False)


def packet_kv(runner: PicRunner, ids) -> tuple[np.ndarray, np.ndarray]:
    """One document's packet from `runner`'s KV Packet pool (stored there on a miss): k, v [N, L + P, K, D] = its
    backbone KV alone followed by the trailer's KV."""
    pool = runner._pool("kvpacket", "packet")
    k, v, (n,), _ = runner.cached_context([(pool, tuple(ids), False)])
    return np.asarray(k[:, :n]), np.asarray(v[:, :n])


def context_attention(runner: PicRunner, seg: Segments, answer: Answer) -> np.ndarray:
    """Last-layer attention [question tokens, heads, context slots] of the suffix over the context (template
    prefix + chunks), under the decoder cache `answer` left behind. Decoder-side modes only."""
    if answer.kv_cache is None:
        raise ValueError("context attention needs the answer's decoder cache (decoder-side modes)")
    start, n = len(seg.context), len(seg.suffix)
    probs = last_layer_attention(runner.params, answer.kv_cache, _pad(seg.suffix, power_of_two(n)), jnp.int32(start),
                                 cfg=runner.cfg, dtype=runner.dtype)
    return np.asarray(probs[:n, :, :start], np.float64)


def attention_similarity(attn: np.ndarray, reference: np.ndarray) -> float:
    """Mean over question tokens and heads of the cosine similarity of two `context_attention`s.

    1.0 means the question reads the context exactly as it does with the full prompt (`reference`).
    """
    if attn.shape != reference.shape:
        raise ValueError(f"attention shapes differ: {attn.shape} vs {reference.shape}")
    norms = np.linalg.norm(attn, axis=-1) * np.linalg.norm(reference, axis=-1)
    return float(((attn * reference).sum(-1) / np.maximum(norms, 1e-30)).mean())

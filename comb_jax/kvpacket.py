"""KV Packet (arXiv 2604.13226): reuse each document's own backbone KV, repaired by a small trained adapter.

A document's KV is what the frozen backbone computes on it alone, at positions 0..L-1 (exactly the "naive" mode's
chunk cache: `pic_modes.chunk_kv`), computed once and never changed. The adapter wraps every cached document into a
*packet*:

    packet(doc) = [ doc KV (L slots, the backbone's, untouched) | trailer KV (P slots) ]

The trailer is P trainable soft-token embeddings (`params["kvpacket"]["trailer"]`, [P, embed]) that the frozen
backbone reads after the document, at positions L..L+P-1, attending causally to the document only; their per-layer
K/V are computed once per document at store time and cached with it. A request's decoder cache is then

    [ template prefix KV (exact, position 0) | packet(chunk 1) | packet(chunk 2) | ... ]  + question prefill

with no rotation and no recomputation (like "naive"); the question's tokens take the positions after the last slot.
Serving cost over naive reuse: P extra tokens per document at store time and P extra cache slots per document;
nothing per request.

Why a trailer and no header: soft tokens placed *before* the document would change the document's own KV (its
tokens would attend to them), so it would no longer be the plain backbone cache that any other mode can share.
The trailer sees the document and can learn to steer the question's attention (e.g. soak up the extra attention
sinks that every chunk's first token becomes when computed alone) without touching the document's slots.
With P = 0 a packet is the document alone: KV Packet is then exactly "naive" reuse.

Training (`kvpacket_loss`, `train_kvpacket`): self-supervised distillation against the full prompt. The teacher is
the frozen backbone reading prefix + chunks + question inline; the student reads the same chunks as packets; the loss
is KL(teacher || student) of the next-token distributions over the teacher-forced answer tokens (plus optional
cross-entropy). Only the trailer is trainable; the backbone is a separate, frozen argument. The step reuses the
Comb trainer's optimizer (`training.make_optimizer`), its data sources (`data.load_examples`), its prompt
tokenisation (`eval.build_segments`, so training and eval see identical ids) and its checkpoint format.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from comb_jax.config import ModelConfig
from comb_jax.model import block, cast, forward, init_kv_cache, lm_logits, rms_norm, rope_tables

NUM_TRAILER_TOKENS = 8  # default P


def init_kvpacket(backbone, num_tokens: int, init_ids=(), key=None, noise: float = 0.0) -> dict:
    """The adapter subtree {"trailer": [P, embed] float32}.

    Initialised to the backbone's embeddings of `init_ids` (cycled to P; in the full prompt a chunk is followed by the
    "\\n" separators, so their embeddings are the natural start), plus optional Gaussian `noise` (relative to the
    embedding RMS). Empty `init_ids`: the mean embedding.
    """
    embed = np.asarray(backbone["embed"], np.float32)
    if num_tokens == 0:
        return {"trailer": np.zeros((0, embed.shape[1]), np.float32)}
    if len(init_ids):
        rows = embed[np.resize(np.asarray(init_ids, np.int64), num_tokens)]
    else:
        rows = np.broadcast_to(embed.mean(0), (num_tokens, embed.shape[1])).copy()
    if noise and key is not None:
        rms = float(np.sqrt((embed ** 2).mean()))
        rows = rows + noise * rms * np.asarray(jax.random.normal(key, rows.shape), np.float32)
    return {"trailer": rows.astype(np.float32)}


def num_tokens(adapter) -> int:
    return int(adapter["trailer"].shape[0])


# ----------------------------------------------------------------------------------------------------------
# Pure compute


def extend_embeddings(backbone, x, positions, ctx_k, ctx_v, ctx_mask, cfg: ModelConfig, dtype=jnp.float32,
                      remat: bool = False):
    """Run the frozen decoder on new input embeddings that read a fixed context KV.

    x [B, Q, embed] at RoPE `positions` [B, Q]; ctx_k, ctx_v [N, B, C, K, D] (post-RoPE, as a KVCache holds them);
    ctx_mask [B, C] (which context slots each row sees). The Q new tokens see every visible context slot and each
    other causally. Returns (hidden [B, Q, embed] after the final norm, k, v [N, B, Q, K, D] of the new tokens).
    """
    bb = cast({k: v for k, v in backbone.items() if k not in ("embed", "encoder_embed")}, dtype)
    b, q = x.shape[:2]
    c = ctx_k.shape[2]
    cos, sin = rope_tables(cfg, positions)
    causal = jnp.tril(jnp.ones((q, q), bool))
    mask = jnp.concatenate([jnp.broadcast_to(ctx_mask[:, None, :], (b, q, c)),
                            jnp.broadcast_to(causal, (b, q, q))], axis=-1)  # [B, Q, C + Q]
    slots = jnp.broadcast_to(c + jnp.arange(q), (b, q))
    pad = ((0, 0), (0, q), (0, 0), (0, 0))

    def layer_step(x, xs):
        layer, k, v = xs
        x, (k, v) = block(x, layer, cfg, cos, sin, mask, (jnp.pad(k.astype(dtype), pad), jnp.pad(v.astype(dtype), pad),
                                                          slots))
        return x, (k[:, c:], v[:, c:])

    if remat:
        layer_step = jax.checkpoint(layer_step)
    x, (new_k, new_v) = jax.lax.scan(layer_step, x.astype(dtype), (bb["layers"], ctx_k, ctx_v))
    return rms_norm(x, bb["final_norm"], cfg.rms_eps).astype(dtype), new_k, new_v


def trailer_kv(backbone, adapter, doc_k, doc_v, doc_lengths, cfg: ModelConfig, dtype=jnp.float32,
               remat: bool = False):
    """The trailer's K/V behind each document. doc_k, doc_v [N, B, L, K, D] (backbone KV of each document alone,
    right-padded); doc_lengths [B] -> k, v [N, B, P, K, D], at positions doc_length .. doc_length + P - 1."""
    p = num_tokens(adapter)
    b, length = doc_k.shape[1], doc_k.shape[2]
    x = jnp.broadcast_to(adapter["trailer"].astype(dtype), (b, p, adapter["trailer"].shape[1]))
    positions = doc_lengths[:, None] + jnp.arange(p)[None, :]
    mask = jnp.arange(length)[None, :] < doc_lengths[:, None]
    _, k, v = extend_embeddings(backbone, x, positions, doc_k, doc_v, mask, cfg, dtype, remat)
    return k, v


def backbone_kv(backbone, tokens, cfg: ModelConfig, dtype=jnp.float32):
    """The frozen backbone's own KV of tokens [B, L], each row alone at positions 0..L-1 -> k, v [N, B, L, K, D]."""
    cache = init_kv_cache(cfg, tokens.shape[0], tokens.shape[1], dtype)
    _, cache = forward({"backbone": backbone}, tokens, cfg, None, cache, None, dtype)
    return jax.lax.stop_gradient(cache.k), jax.lax.stop_gradient(cache.v)


@partial(jax.jit, static_argnames=("cfg", "dtype"))
def packet_trailer(params, doc_k, doc_v, doc_length, *, cfg: ModelConfig, dtype=jnp.float32):
    """Serving: the trailer of one stored document. doc_k, doc_v [N, L, K, D] (padded); doc_length [] ->
    k, v [N, P, K, D]."""
    k, v = trailer_kv(params["backbone"], params["kvpacket"], doc_k[:, None], doc_v[:, None],
                      jnp.reshape(doc_length, (1,)), cfg, dtype)
    return k[:, 0], v[:, 0]


def student_hidden(adapter, backbone, batch, cfg: ModelConfig, dtype=jnp.float32, remat: bool = False):
    """The KV Packet student on a training batch -> hidden [B, T, embed] at the query tokens.

    batch: prefix_tokens [B, Lp] / prefix_len [B]; chunk_tokens, chunk_mask [B, n, L]; query_tokens [B, T] (the
    question suffix then the answer, teacher-forced). The decoder cache is assembled as at serving: prefix KV, then
    for each chunk its backbone KV then its trailer, then the query at the positions after the last real slot.
    """
    b, n, length = batch["chunk_tokens"].shape
    p = num_tokens(adapter)
    doc_k, doc_v = backbone_kv(backbone, batch["chunk_tokens"].reshape(b * n, length), cfg, dtype)
    doc_lengths = batch["chunk_mask"].reshape(b * n, length).sum(-1).astype(jnp.int32)
    blocks_k, blocks_v, block_mask = doc_k, doc_v, batch["chunk_mask"].reshape(b * n, length)
    if p:
        tk, tv = trailer_kv(backbone, adapter, doc_k, doc_v, doc_lengths, cfg, dtype, remat)
        blocks_k = jnp.concatenate([doc_k, tk.astype(doc_k.dtype)], axis=2)
        blocks_v = jnp.concatenate([doc_v, tv.astype(doc_v.dtype)], axis=2)
        has_doc = batch["chunk_mask"].reshape(b * n, length).any(-1)  # padding chunks get no trailer either
        block_mask = jnp.concatenate([block_mask, jnp.broadcast_to(has_doc[:, None], (b * n, p))], axis=1)
    nl, _, w, kv, d = blocks_k.shape
    prefix_k, prefix_v = backbone_kv(backbone, batch["prefix_tokens"], cfg, dtype)
    prefix_mask = jnp.arange(batch["prefix_tokens"].shape[1])[None, :] < batch["prefix_len"][:, None]
    ctx_k = jnp.concatenate([prefix_k, blocks_k.reshape(nl, b, n * w, kv, d)], axis=2)
    ctx_v = jnp.concatenate([prefix_v, blocks_v.reshape(nl, b, n * w, kv, d)], axis=2)
    ctx_mask = jnp.concatenate([prefix_mask, block_mask.reshape(b, n * w)], axis=1)
    ctx_len = batch["prefix_len"] + (doc_lengths.reshape(b, n) + p * batch["chunk_mask"].any(-1)).sum(-1)
    positions = ctx_len[:, None] + jnp.arange(batch["query_tokens"].shape[1])[None, :]
    x = backbone["embed"][batch["query_tokens"]]
    hidden, _, _ = extend_embeddings(backbone, x, positions, ctx_k, ctx_v, ctx_mask, cfg, dtype, remat)
    return hidden


def kvpacket_loss(adapter, backbone, batch, cfg, kl_weight: float = 1.0, ce_weight: float = 0.0):
    """kl_weight * KL(full-prompt teacher || packet student) + ce_weight * CE, both per answer token.

    batch: `student_hidden`'s arrays plus targets, loss_mask [B, T] and teacher_tokens [B, S] (prefix + chunks
    inline + suffix + answer) / teacher_index [B, T] (the teacher position predicting the same answer token).
    Returns (loss, {"loss", "ce", "kl", "answer_tokens"}).
    """
    dtype = jnp.dtype(cfg.compute_dtype)
    params = {"backbone": backbone}
    hidden = student_hidden(adapter, backbone, batch, cfg.model, dtype, cfg.train.remat)
    log_probs = jax.nn.log_softmax(lm_logits(params, hidden), axis=-1)
    mask = batch["loss_mask"]
    count = jnp.maximum(mask.sum(), 1.0)
    nll = -jnp.take_along_axis(log_probs, batch["targets"][..., None], axis=-1)[..., 0]
    ce = (nll * mask).sum() / count
    teacher_hidden, _ = forward(params, batch["teacher_tokens"], cfg.model, dtype=dtype)
    teacher_hidden = jnp.take_along_axis(teacher_hidden, batch["teacher_index"][..., None], axis=1)
    teacher = jax.lax.stop_gradient(jax.nn.log_softmax(lm_logits(params, teacher_hidden), -1))
    kl = ((jnp.exp(teacher) * (teacher - log_probs)).sum(-1) * mask).sum() / count
    loss = kl_weight * kl + ce_weight * ce
    return loss, {"loss": loss, "ce": ce, "kl": kl, "answer_tokens": mask.sum()}


# ----------------------------------------------------------------------------------------------------------
# Serving (the "kvpacket" mode of pic_modes.PicRunner)


def packet_kv(runner, ids) -> tuple[np.ndarray, np.ndarray]:
    """One document's packet: k, v [N, L + P, K, D] = its backbone KV alone (`pic_modes.chunk_kv`, as "naive"
    stores it) followed by the trailer's KV."""
    from comb_jax.pic_modes import _pad, bucket, chunk_kv

    tokens, n = _pad(ids, bucket(len(ids))), jnp.int32(len(ids))
    doc_k, doc_v = chunk_kv(runner.params, tokens, n, cfg=runner.cfg, dtype=runner.dtype)
    doc_k, doc_v = np.asarray(doc_k[:, : len(ids)]), np.asarray(doc_v[:, : len(ids)])
    if num_tokens(runner.params["kvpacket"]) == 0:
        return doc_k, doc_v
    tk, tv = packet_trailer(runner.params, jnp.asarray(doc_k), jnp.asarray(doc_v), n, cfg=runner.cfg,
                            dtype=runner.dtype)
    return (np.concatenate([doc_k, np.asarray(tk, doc_k.dtype)], 1),
            np.concatenate([doc_v, np.asarray(tv, doc_v.dtype)], 1))


def answer_kvpacket(runner, seg):
    """Answer `seg` from packets: exact template-prefix KV, then each chunk's cached packet, no rotation; the
    question is prefilled behind the last packet slot. Returns a `pic_modes.Answer`."""
    from comb_jax.pic_modes import assemble, bucket, chunk_kv

    start = time.perf_counter()
    keys, values, hits = [], [], 0
    if seg.prefix:
        k, v, _ = runner._chunk_entry(("kvpacket", "prefix", seg.prefix), seg.prefix, chunk_kv)
        keys, values = [k], [v]
    for ids in seg.chunks:
        key = ("kvpacket", ids)
        if key in runner.chunk_cache:
            k, v = runner.chunk_cache[key]
            hits += 1
        else:
            k, v = runner._store(key, *packet_kv(runner, ids))
        keys.append(k)
        values.append(v)
    length = sum(k.shape[1] for k in keys)
    width = bucket(length)
    pad = ((0, 0), (0, width - length), (0, 0), (0, 0))
    cache = assemble(jnp.asarray(np.pad(np.concatenate(keys, 1), pad)),
                     jnp.asarray(np.pad(np.concatenate(values, 1), pad)), jnp.zeros((width,), jnp.int32),
                     jnp.int32(length), cfg=runner.cfg,
                     slots=runner._slots(length + len(seg.suffix)))
    hidden, cache, logits = runner._prefill_rest(cache, seg.suffix)
    return runner._finish(start, cache, logits, hidden, None, hits, len(seg.chunks), True)


# ----------------------------------------------------------------------------------------------------------
# Data: the eval's prompt pieces (eval.build_segments) as fixed-shape training batches


def tokenize(example, codec, tc) -> dict:
    """Example -> the request's pieces as ids (exactly what the eval's decoder-side modes see) and its answer ids."""
    from comb_jax.eval import build_segments

    seg = build_segments(codec, example.chunks, example.question, tc.max_chunk_tokens)
    answer = codec.answer_ids(example.answer)[: max(1, tc.max_decoder_tokens + 1 - len(seg.suffix))]
    return {"prefix": list(seg.prefix), "chunks": [list(c) for c in seg.chunks], "suffix": list(seg.suffix),
            "answer": answer}


def _bucket(n: int, buckets) -> int:
    from comb_jax.data import _bucket as data_bucket

    return data_bucket(n, buckets, "kvpacket sequence")


def collate(features: list[dict], tc) -> dict[str, np.ndarray]:
    """Pad tokenized requests into bucketed shapes (see `student_hidden` and `kvpacket_loss` for the arrays)."""
    b = len(features)
    n = max(1, max(len(f["chunks"]) for f in features))  # no chunks at all: one empty (masked) chunk
    lp = -(-max(len(f["prefix"]) for f in features) // 16) * 16
    lc = _bucket(max([len(c) for f in features for c in f["chunks"]] or [1]), tc.chunk_buckets)
    td = _bucket(max(len(f["suffix"]) + len(f["answer"]) - 1 for f in features), tc.decoder_buckets)
    full = [f["prefix"] + sum(f["chunks"], []) + f["suffix"] for f in features]
    s = _bucket(max(len(x) + len(f["answer"]) - 1 for x, f in zip(full, features)), tc.teacher_buckets)
    out = {"prefix_tokens": np.zeros((b, lp), np.int32), "prefix_len": np.zeros((b,), np.int32),
           "chunk_tokens": np.zeros((b, n, lc), np.int32), "chunk_mask": np.zeros((b, n, lc), bool),
           "query_tokens": np.zeros((b, td), np.int32), "targets": np.zeros((b, td), np.int32),
           "loss_mask": np.zeros((b, td), np.float32), "teacher_tokens": np.zeros((b, s), np.int32),
           "teacher_index": np.zeros((b, td), np.int32)}
    for i, f in enumerate(features):
        out["prefix_tokens"][i, :len(f["prefix"])] = f["prefix"]
        out["prefix_len"][i] = len(f["prefix"])
        for j, c in enumerate(f["chunks"]):
            out["chunk_tokens"][i, j, :len(c)] = c
            out["chunk_mask"][i, j, :len(c)] = True
        seq = f["suffix"] + f["answer"]
        out["query_tokens"][i, :len(seq) - 1] = seq[:-1]
        out["targets"][i, :len(seq) - 1] = seq[1:]
        answer_at = len(f["suffix"]) - 1 + np.arange(len(f["answer"]))
        out["loss_mask"][i, answer_at] = 1.0
        teacher = full[i] + f["answer"]
        out["teacher_tokens"][i, :len(teacher) - 1] = teacher[:-1]
        out["teacher_index"][i, answer_at] = len(full[i]) - 1 + np.arange(len(f["answer"]))
    return out


def train_iterator(examples, codec, tc, seed: int):
    """Shuffled, repeated, checkpointable batches (grain, as `data.train_dataset`)."""
    import grain

    return iter(grain.MapDataset.source(examples).shuffle(seed=seed).repeat(None)
                .map(partial(tokenize, codec=codec, tc=tc))
                .batch(tc.batch_size, drop_remainder=True, batch_fn=partial(collate, tc=tc)).to_iter_dataset())


# ----------------------------------------------------------------------------------------------------------
# Training


@dataclass(frozen=True)
class KVPacketTraining:
    num_tokens: int = NUM_TRAILER_TOKENS
    kl_weight: float = 1.0
    ce_weight: float = 0.0
    init_text: str = "\n\n"  # the trailer starts as the embeddings of this text's ids (cycled)


def make_step(cfg, optimizer, kt: KVPacketTraining):
    """jit(step)(adapter, opt_state, backbone, batch) -> (adapter, opt_state, metrics); the backbone is frozen."""
    grad_fn = jax.value_and_grad(partial(kvpacket_loss, cfg=cfg, kl_weight=kt.kl_weight, ce_weight=kt.ce_weight),
                                 has_aux=True)

    def step(adapter, opt_state, backbone, batch):
        (_, metrics), grads = grad_fn(adapter, jax.lax.stop_gradient(backbone), batch)
        updates, opt_state = optimizer.update(grads, opt_state, adapter)
        return optax.apply_updates(adapter, updates), opt_state, dict(metrics, grad_norm=optax.tree.norm(grads))

    return jax.jit(step, donate_argnums=(0, 1))


def save_adapter(run_dir: Path, step: int, adapter, opt_state, data_state, cfg, kt: KVPacketTraining):
    """An orbax checkpoint like the Comb trainer's (the adapter in the `comb` slot) plus adapter.safetensors."""
    from comb_jax import checkpoint as ckpt

    manager = ckpt.make_manager(ckpt.checkpoint_root(run_dir), cfg.train.keep_checkpoints)
    ckpt.save(manager, step, adapter, opt_state, data_state, cfg)
    manager.wait_until_finished()
    manager.close()
    write_adapter(run_dir, adapter, step)
    (run_dir / "kvpacket.json").write_text(json.dumps({"step": step, **kt.__dict__}) + "\n")


ADAPTER_FILE = "adapter.safetensors"


def write_adapter(run_dir: Path, adapter, step: int):
    """The trailer as safetensors (atomically: a kill mid-write keeps the previous file), its step as metadata."""
    from safetensors.numpy import save_file

    tmp = run_dir / (ADAPTER_FILE + ".tmp")
    save_file({"trailer": np.asarray(adapter["trailer"], np.float32)}, str(tmp), metadata={"step": str(step)})
    tmp.replace(run_dir / ADAPTER_FILE)


def load_adapter(path: str | Path) -> dict:
    """{"trailer": [P, embed]} from a run dir (its adapter.safetensors) or the file itself."""
    from safetensors.numpy import load_file

    path = Path(path)
    if path.is_dir():
        path = path / ADAPTER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"KV Packet adapter {path} does not exist (a kvpacket run dir or its {ADAPTER_FILE})")
    return {"trailer": np.asarray(load_file(str(path))["trailer"], np.float32)}


def train_kvpacket(cfg, kt: KVPacketTraining, backbone=None, examples=None, progress: bool = True) -> dict:
    """Train the trailer for `cfg.train.steps` steps; metrics.jsonl, checkpoints, adapter.safetensors in run_dir."""
    from tqdm import tqdm

    from comb_jax import data as data_lib
    from comb_jax.training import DEFAULT_DATA_DIR, make_optimizer
    from comb_jax.weights import load_backbone

    tc = cfg.train
    run_dir = Path(tc.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dtype = jnp.dtype(cfg.compute_dtype)
    backbone_host = load_backbone(cfg) if backbone is None else backbone
    backbone = jax.tree.map(lambda a: jnp.asarray(np.asarray(a), dtype), backbone_host)
    codec = data_lib.make_codec(cfg)
    if examples is None:
        data_dir = Path(tc.data_dir) if tc.data_dir else DEFAULT_DATA_DIR
        examples = data_lib.load_examples(tc, data_dir, "train")
    iterator = train_iterator(examples, codec, tc, tc.seed)
    adapter = init_kvpacket(backbone_host, kt.num_tokens, codec.encode(kt.init_text))
    adapter = jax.tree.map(jnp.asarray, adapter)
    optimizer = make_optimizer(tc)
    opt_state = optimizer.init(adapter)
    step_fn = make_step(cfg, optimizer, kt)
    trainable = int(sum(np.size(x) for x in jax.tree.leaves(adapter)))
    losses, wall = [], time.perf_counter()
    with (run_dir / "metrics.jsonl").open("a") as log:
        for step in tqdm(range(1, tc.steps + 1), disable=not progress, desc="kvpacket"):
            data_state = iterator.get_state()
            batch = next(iterator)
            t0 = time.perf_counter()
            adapter, opt_state, metrics = step_fn(adapter, opt_state, backbone, batch)
            metrics = jax.device_get(metrics)
            record = {"step": step, **{k: float(metrics[k]) for k in ("loss", "ce", "kl", "grad_norm")},
                      "seconds": time.perf_counter() - t0, "trainable_params": trainable}
            losses.append(record["loss"])
            log.write(json.dumps(record) + "\n")
            log.flush()
            if step % tc.checkpoint_every == 0 and step < tc.steps:  # cheap: a run cut short keeps its adapter
                write_adapter(run_dir, adapter, step)
    save_adapter(run_dir, tc.steps, adapter, opt_state, data_state, cfg, kt)
    return {"losses": losses, "wall_s": time.perf_counter() - wall, "trainable_params": trainable,
            "adapter": adapter}


@partial(jax.jit, static_argnames=("cfg",))
def _answer_nlls(adapter, backbone, batch, cfg):
    """Per-row means over the answer tokens [B]: (packet student NLL, full-prompt teacher NLL, KL(teacher ||
    student))."""
    dtype = jnp.dtype(cfg.compute_dtype)
    params = {"backbone": backbone}
    mask = batch["loss_mask"]

    def nll(log_probs):
        return -(jnp.take_along_axis(log_probs, batch["targets"][..., None], -1)[..., 0] * mask).sum(-1) / mask.sum(-1)

    student = jax.nn.log_softmax(lm_logits(params, student_hidden(adapter, backbone, batch, cfg.model, dtype)), -1)
    teacher_hidden, _ = forward(params, batch["teacher_tokens"], cfg.model, dtype=dtype)
    teacher_hidden = jnp.take_along_axis(teacher_hidden, batch["teacher_index"][..., None], axis=1)
    teacher = jax.nn.log_softmax(lm_logits(params, teacher_hidden), -1)
    kl = ((jnp.exp(teacher) * (teacher - student)).sum(-1) * mask).sum(-1) / mask.sum(-1)
    return nll(student), nll(teacher), kl


def reading_nlls(cfg, backbone, adapter, examples, batch_size: int = 4) -> dict:
    """Teacher-forced NLL per answer token of each example's first gold answer, mean over examples, with the
    decoder-side prompt (template prefix + chunks + question) built four ways: no chunks ("none"), chunks reused
    naively ("naive", a packet with P = 0), as packets ("kvpacket"), and inline ("full"). gap_closed_X =
    (none - X) / (none - full), as eval.reading_nlls defines it for Comb; kl_X: KL(full prompt || X) per answer token,
    the training objective, held out."""
    from comb_jax import data as data_lib

    tc = cfg.train
    codec = data_lib.make_codec(cfg)
    gold = [dataclasses_replace(e, answer=e.golds[0], chunks=e.chunks) for e in examples]
    no_chunks = [dataclasses_replace(e, chunks=()) for e in gold]
    zero = {"trailer": jnp.zeros((0, adapter["trailer"].shape[1]), jnp.float32)}
    sums = {"none": [], "naive": [], "kvpacket": [], "full": [], "kl_naive": [], "kl_kvpacket": []}
    for start in range(0, len(gold), batch_size):
        part = gold[start:start + batch_size]
        part = part + part[-1:] * (batch_size - len(part))
        real = min(batch_size, len(gold) - start)
        batch = jax.tree.map(jnp.asarray, collate([tokenize(e, codec, tc) for e in part], tc))
        naive, full, kl_naive = _answer_nlls(zero, backbone, batch, cfg)
        packet, _, kl_packet = _answer_nlls(jax.tree.map(jnp.asarray, adapter), backbone, batch, cfg)
        empty = no_chunks[start:start + batch_size]
        empty = empty + empty[-1:] * (batch_size - len(empty))
        none, _, _ = _answer_nlls(zero, backbone, jax.tree.map(jnp.asarray, collate([tokenize(e, codec, tc)
                                                                                 for e in empty], tc)), cfg)
        for key, value in (("none", none), ("naive", naive), ("kvpacket", packet), ("full", full),
                           ("kl_naive", kl_naive), ("kl_kvpacket", kl_packet)):
            sums[key] += np.asarray(value, np.float64)[:real].tolist()
    out = {k if k.startswith("kl_") else f"nll_{k}": float(np.mean(v)) for k, v in sums.items()}
    gap = out["nll_none"] - out["nll_full"]
    for k in ("naive", "kvpacket"):
        out[f"gap_closed_{k}"] = (out["nll_none"] - out[f"nll_{k}"]) / gap if gap > 0 else None
    return dict(out, requests=len(gold))


def dataclasses_replace(example, **changes):
    import dataclasses

    return dataclasses.replace(example, **changes)


def main(argv=None):
    import argparse

    from comb_jax.config import load_config

    ap = argparse.ArgumentParser(prog="python -m comb_jax.kvpacket", description="Train a KV Packet trailer adapter")
    ap.add_argument("--config", required=True)
    ap.add_argument("--tokens", type=int, default=NUM_TRAILER_TOKENS, help="trailer soft tokens per document (P)")
    ap.add_argument("--kl-weight", type=float, default=1.0)
    ap.add_argument("--ce-weight", type=float, default=0.0)
    ap.add_argument("overrides", nargs="*", help="config key=value overrides (train.steps=..., train.run_dir=...)")
    ap.add_argument("--reading", default=None, help="instead of training: the teacher-forced reading NLLs of "
                    "--adapter on this eval dataset (squad_multidoc | jsonl:PATH), the eval's requests")
    ap.add_argument("--adapter", default=None, help="--reading: a kvpacket run dir or adapter.safetensors")
    ap.add_argument("--limit", type=int, default=24, help="--reading: requests (the eval's seeded sample)")
    ap.add_argument("--out", default=None, help="--reading: write the result JSON here")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.reading:
        from comb_jax.eval import DEFAULT_DATA_DIR as EVAL_DATA_DIR
        from comb_jax.eval import load_examples
        from comb_jax.weights import load_backbone

        examples, _ = load_examples(args.reading, EVAL_DATA_DIR, limit=args.limit, seed=0, num_distractors=2,
                                    max_chunk_chars=cfg.serve.max_chunk_tokens * 4, include_unanswerable=False)
        dtype = jnp.dtype(cfg.compute_dtype)
        backbone = jax.tree.map(lambda a: jnp.asarray(np.asarray(a), dtype), load_backbone(cfg))
        result = {"dataset": args.reading, "adapter": args.adapter,
                  **reading_nlls(cfg, backbone, load_adapter(args.adapter), examples)}
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result))
        return
    kt = KVPacketTraining(num_tokens=args.tokens, kl_weight=args.kl_weight, ce_weight=args.ce_weight)
    out = train_kvpacket(cfg, kt)
    summary = {"steps": len(out["losses"]), "wall_s": round(out["wall_s"], 1),
               "trainable_params": out["trainable_params"], "loss_first": out["losses"][0],
               "loss_last": out["losses"][-1]}
    (Path(cfg.train.run_dir) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()


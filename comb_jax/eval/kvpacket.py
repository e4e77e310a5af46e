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

Training (`kvpacket_loss`): self-supervised distillation against the full prompt. The teacher is the frozen backbone
reading prefix + chunks + question inline; the student reads the same chunks as packets; the loss is KL(teacher ||
student) of the next-token distributions over the teacher-forced answer tokens (plus `train.kvpacket_ce_weight` x
cross-entropy). Only the trailer is trainable; the backbone is a separate, frozen argument. It is trained by the
Comb trainer itself (`training.train` with `train.objective=kvpacket`: `python train.py --config smollm2_kvpacket`):
same optimizer, data sources, grain pipeline, sharded jit step, orbax checkpoints with exact resume, metrics.jsonl
and eval; the batches are this module's `collate` of the eval's own prompt pieces (`eval.build_segments`, so
training and eval see identical ids), and each checkpoint also writes `adapter.safetensors` for the eval and serving.
"""

from __future__ import annotations

import dataclasses
import json
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from comb_jax.config import ModelConfig
from comb_jax.model.transformer import block, cast, forward, init_kv_cache, lm_logits, rms_norm, rope_tables
from comb_jax.serving.pool import backbone_chunks

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


def packet_chunks(params, tokens, mask, *, cfg: ModelConfig, dtype=jnp.float32):
    """Chunk processor of the KV Packet pool (`pool.PagePool`, extra_tokens = P): packets of documents tokens, mask
    [B, L] -> k, v [N, B, L + P, K, D], row b = its backbone KV alone (`pool.backbone_chunks`, as "naive" stores it)
    for its L_b real tokens, then the trailer's KV (at positions L_b..L_b+P-1), then padding."""
    doc_k, doc_v = backbone_chunks(params, tokens, mask, cfg=cfg, dtype=dtype)
    p = num_tokens(params["kvpacket"])
    if p == 0:
        return doc_k, doc_v
    lengths = mask.sum(-1).astype(jnp.int32)
    tk, tv = trailer_kv(params["backbone"], params["kvpacket"], doc_k, doc_v, lengths, cfg, dtype)
    # slot s of row b reads the document below L_b, else the trailer token s - L_b (clipped: padding past the packet)
    length = tokens.shape[1]
    slot = jnp.arange(length + p)[None, :]
    index = jnp.minimum(jnp.where(slot < lengths[:, None], slot, length + slot - lengths[:, None]), length + p - 1)

    def place(doc, trailer):
        both = jnp.concatenate([doc, trailer.astype(doc.dtype)], axis=2)  # [N, B, L + P, K, D]
        return jnp.take_along_axis(both, index[None, :, :, None, None], axis=2)

    return place(doc_k, tk), place(doc_v, tv)


def packet_kv(runner, ids) -> tuple[np.ndarray, np.ndarray]:
    """One document's packet from `runner`'s KV Packet pool (stored there on a miss): k, v [N, L + P, K, D] = its
    backbone KV alone followed by the trailer's KV."""
    pool = runner._pool("kvpacket", "packet")
    k, v, (n,), _ = runner.cached_context([(pool, tuple(ids), False)])
    return np.asarray(k[:, :n]), np.asarray(v[:, :n])


def answer_kvpacket(runner, seg):
    """Answer `seg` from packets: exact template-prefix KV, then each chunk's cached packet, no rotation; the
    question is prefilled behind the last packet slot. Returns a `pic_modes.Answer`."""
    from comb_jax.eval.pic_modes import assemble

    start = time.perf_counter()
    # the template prefix has no trailer: it lives in a backbone-KV pool beside the packets
    pieces = [(runner._pool("kvpacket", "backbone"), seg.prefix, False)] if seg.prefix else []
    packets = runner._pool("kvpacket", "packet")
    keys, values, lengths, hits = runner.cached_context(pieces + [(packets, ids, True) for ids in seg.chunks])
    length = sum(lengths)
    cache = assemble(keys, values, jnp.zeros((keys.shape[1],), jnp.int32), jnp.int32(length), cfg=runner.cfg,
                     slots=runner._slots(length + len(seg.suffix)))
    hidden, cache, logits = runner._prefill_rest(cache, seg.suffix)
    return runner._finish(start, cache, logits, hidden, None, hits, len(seg.chunks), True)


# ----------------------------------------------------------------------------------------------------------
# Data: the eval's prompt pieces (eval.build_segments) as fixed-shape training batches


def tokenize(example, codec, tc) -> dict:
    """Example -> the request's pieces as ids (exactly what the eval's decoder-side modes see) and its answer ids."""
    from comb_jax.eval.harness import build_segments

    seg = build_segments(codec, example.chunks, example.question, tc.max_chunk_tokens)
    answer = codec.answer_ids(example.answer)[: max(1, tc.max_decoder_tokens + 1 - len(seg.suffix))]
    return {"prefix": list(seg.prefix), "chunks": [list(c) for c in seg.chunks], "suffix": list(seg.suffix),
            "answer": answer}


def _bucket(n: int, buckets) -> int:
    from comb_jax.training.data import _bucket as data_bucket

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
# Training: `python train.py --config smollm2_kvpacket` (training.train with train.objective=kvpacket)

TRAILER_INIT_TEXT = "\n\n"  # the trailer starts as the embeddings of this text's ids (cycled to P)
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


def evaluate(adapter, backbone, examples, cfg) -> dict:
    """Held-out metrics of a trailer during training (the trainer's `eval_every`), from `reading_nlls`:
    eval_loss = KL(full prompt || packets) per answer token (the objective), eval_kl_naive the same for naive reuse,
    eval_gap_closed / eval_gap_closed_naive and the NLLs behind them."""
    r = reading_nlls(cfg, backbone, jax.device_get(adapter), examples)
    return {"eval_loss": r["kl_kvpacket"], "eval_kl_naive": r["kl_naive"], "eval_gap_closed": r["gap_closed_kvpacket"],
            "eval_gap_closed_naive": r["gap_closed_naive"],
            **{f"eval_{k}": r[k] for k in ("nll_none", "nll_naive", "nll_kvpacket", "nll_full")}}


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
    from comb_jax.training import data as data_lib

    tc = cfg.train
    codec = data_lib.make_codec(cfg)
    gold = [dataclasses.replace(e, answer=e.golds[0], chunks=e.chunks) for e in examples]
    no_chunks = [dataclasses.replace(e, chunks=()) for e in gold]
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




def main(argv=None):
    """`python -m comb_jax.eval.kvpacket --config C --reading DATASET --adapter RUN`: the teacher-forced reading NLLs
    of a trained trailer (training is `python train.py --config smollm2_kvpacket`)."""
    import argparse

    from comb_jax.config import load_config
    from comb_jax.eval.harness import DEFAULT_DATA_DIR as EVAL_DATA_DIR
    from comb_jax.eval.harness import load_examples
    from comb_jax.model.weights import load_backbone

    ap = argparse.ArgumentParser(prog="python -m comb_jax.eval.kvpacket",
                                 description="Reading NLLs of a KV Packet adapter (train one with train.py)")
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*", help="config key=value overrides")
    ap.add_argument("--reading", required=True, help="eval dataset (squad_multidoc | jsonl:PATH), the eval's requests")
    ap.add_argument("--adapter", required=True, help="a kvpacket run dir or its adapter.safetensors")
    ap.add_argument("--limit", type=int, default=24, help="requests (the eval's seeded sample)")
    ap.add_argument("--out", default=None, help="write the result JSON here")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    examples, _ = load_examples(args.reading, EVAL_DATA_DIR, limit=args.limit, seed=0, num_distractors=2,
                                max_chunk_chars=cfg.serve.max_chunk_tokens * 4, include_unanswerable=False)
    dtype = jnp.dtype(cfg.compute_dtype)
    backbone = jax.tree.map(lambda a: jnp.asarray(np.asarray(a), dtype), load_backbone(cfg))
    result = {"dataset": args.reading, "adapter": args.adapter,
              **reading_nlls(cfg, backbone, load_adapter(args.adapter), examples)}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

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
Comb trainer itself (`train.objective=kvpacket`: `python train.py --config smollm2_kvpacket`): same optimizer, data
sources, grain pipeline, sharded jit step, orbax checkpoints with exact resume, metrics.jsonl and eval; its batches
are `training.kvpacket_data.collate` of the prompt pieces the eval reads too (`text.prompt.prompt_segments`, so
training and eval see identical ids), and each checkpoint also writes `adapter.safetensors` (`weights.adapter`) for
the eval and serving. The held-out reading NLLs are `eval.kvpacket`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from comb_jax.config import ModelConfig
from comb_jax.methods.naive import backbone_chunks
from comb_jax.model.transformer import block, cast, forward, lm_logits, rms_norm, rope_tables

NUM_TRAILER_TOKENS = 8  # default P
TRAILER_INIT_TEXT = "\n\n"  # the trailer starts as the embeddings of this text's ids (cycled to P)


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
    """The frozen backbone's own KV of tokens [B, L], each row alone at positions 0..L-1 -> k, v [N, B, L, K, D]
    (`naive.backbone_chunks` with every token real, outside the gradient)."""
    k, v = backbone_chunks({"backbone": backbone}, tokens, jnp.ones(tokens.shape, bool), cfg=cfg, dtype=dtype)
    return jax.lax.stop_gradient(k), jax.lax.stop_gradient(v)


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
# The chunk processor of a KV Packet pool (the "kvpacket" mode of eval.pic_modes.PicRunner)


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

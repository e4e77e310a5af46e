"""What a training run optimises, as values the trainer takes: `Objective` = the trainable subtree (its params key
and layout), how it starts, its batches, its loss, and what else a checkpoint writes.

- "answer" (`loss_fn`): Comb's encoder and cross blocks on answer cross-entropy, plus KL and hidden-state
  distillation from the full-prompt backbone;
- "kv" (`kv_distill_loss`): the encoder alone, its K/V regressed onto the backbone's own K/V of each chunk;
- "kvpacket": the KV Packet trailer (`methods.kvpacket`), distilled from the full prompt.
`objective_for(cfg)` picks the one `train.objective` names. Every loss returns (loss, {"loss", "ce", "kl", "hidden",
"answer_tokens"}).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from comb_jax.methods import kvpacket
from comb_jax.methods.comb import batch_picache
from comb_jax.model.layout import Param, model_layout
from comb_jax.model.transformer import encode, forward_with_taps, lm_logits, rms_norm
from comb_jax.training import data as data_lib
from comb_jax.training import kvpacket_data
from comb_jax.training.warm_start import init_comb
from comb_jax.weights.adapter import write_adapter

LOSS_TERMS = ("loss", "ce", "kl", "hidden")


def backbone_chunk_kv(backbone, tokens, mask, cfg):
    """The frozen backbone's own pre-RoPE K and V of each chunk at the cross layers: the `objective=kv` targets.

    tokens, mask [C, L] (one chunk per row) -> (k, v [E, C, L, K, D] float32, weight [1, C, L, 1, 1]). Layer c_k's
    k/v projections of its attention-normed input, with the backbone run on the chunk alone (causal, positions
    0..L-1). `weight` is 1 on real tokens but each chunk's first: in the causal backbone that token is an
    attention sink with outsized activations, which the bidirectional encoder has no reason to copy.
    """
    m = cfg.model
    _, taps = jax.lax.stop_gradient(forward_with_taps({"backbone": backbone}, tokens, m,
                                                      dtype=jnp.dtype(cfg.compute_dtype)))
    source = jax.tree.map(lambda a: a[np.asarray(m.cross_layers)].astype(jnp.float32), backbone["layers"])
    normed = rms_norm(taps.astype(jnp.float32), source["attn_norm"][:, None, None, :], m.rms_eps)
    k = jnp.einsum("xble,xekd->xblkd", normed, source["wk"])
    v = jnp.einsum("xble,xekd->xblkd", normed, source["wv"])
    weight = (mask & (jnp.arange(tokens.shape[1]) > 0)[None, :]).astype(jnp.float32)[None, :, :, None, None]
    return k, v, weight


def _chunks_of(batch):
    b, n, length = batch["chunk_tokens"].shape
    return batch["chunk_tokens"].reshape(b * n, length), batch["chunk_mask"].reshape(b * n, length)


def kv_distill_loss(comb, backbone, batch, cfg):
    """`objective=kv`: the encoder's PICache regressed onto `backbone_chunk_kv` of the same chunks.

    The error is a relative squared error per layer (summed over the chunks' tokens, divided by the target's sum
    of squares), averaged over layers and K/V. Returns the same (loss, metrics) as `loss_fn` (answer_tokens = tokens
    counted).
    """
    tokens, mask = _chunks_of(batch)
    cache = encode({"backbone": backbone, "comb": comb}, tokens, mask, cfg.model, jnp.dtype(cfg.compute_dtype),
                   cfg.train.remat)
    target_k, target_v, weight = backbone_chunk_kv(backbone, tokens, mask, cfg)
    sq = lambda x: (weight * x ** 2).sum(axis=(1, 2, 3, 4))  # noqa: E731
    errors = [sq(ours.astype(jnp.float32) - target) / jnp.maximum(sq(target), 1e-6)
              for ours, target in ((cache.k, target_k), (cache.v, target_v))]
    loss = jnp.mean(jnp.stack(errors))
    zero = jnp.zeros((), jnp.float32)
    return loss, {"loss": loss, "ce": zero, "kl": zero, "hidden": zero, "answer_tokens": weight.sum()}


def calibrate_kv_scale(comb, backbone, batch, cfg) -> dict:
    """Rescale each layer's encoder k_proj / v_proj by the least-squares scalar that best maps its output onto
    `backbone_chunk_kv` on `batch`. The spec's k/v projections read the encoder's un-normed residual stream while
    the decoder's read an attention-normed one, so warm-copied projections come out tens of times too large; AdamW,
    moving each weight by about lr per step, would need hundreds of steps to shrink them."""
    tokens, mask = _chunks_of(batch)
    cache = encode({"backbone": backbone, "comb": comb}, tokens, mask, cfg.model)
    target_k, target_v, weight = backbone_chunk_kv(backbone, tokens, mask, cfg)
    scale = lambda ours, target: ((weight * ours * target).sum(axis=(1, 2, 3, 4))  # noqa: E731
                                  / jnp.maximum((weight * ours * ours).sum(axis=(1, 2, 3, 4)), 1e-12))
    enc = comb["encoder"]
    k_scale, v_scale = scale(cache.k, target_k), scale(cache.v, target_v)
    encoder = dict(enc, k_proj=enc["k_proj"] * k_scale[:, None, None, None],
                   v_proj=enc["v_proj"] * v_scale[:, None, None, None])
    return dict(comb, encoder=encoder)


def answer_rows(batch):
    """(positions [B, A], weight [B, A]): the decoder positions the loss reads and 1 on real answer targets.

    With `answer_positions` (what `data.collate` adds) only those positions, so the LM head runs on A positions
    instead of the whole row; without it every position, weighted by `loss_mask`.
    """
    mask = batch["loss_mask"]
    if "answer_positions" not in batch:
        b, t = mask.shape
        return jnp.broadcast_to(jnp.arange(t), (b, t)), mask
    positions = batch["answer_positions"]
    counts = (mask > 0).sum(1)
    real = jnp.arange(positions.shape[1])[None, :] < counts[:, None]  # the rest point at 0: padding
    return positions, real.astype(jnp.float32) * jnp.take_along_axis(mask, positions, axis=1)


def top_k_kl(teacher_log_probs, teacher_ids, log_probs):
    """KL(teacher || student) from the teacher's top k tokens and one bucket for the rest of the vocabulary.

    teacher_log_probs, teacher_ids [..., k]; log_probs [..., vocab] (the student's) -> [...]. Exact when the top k
    hold all of the teacher's mass (k = vocab)."""
    student = jnp.take_along_axis(log_probs, teacher_ids, axis=-1)
    p = jnp.exp(teacher_log_probs)
    top = (p * (teacher_log_probs - student)).sum(-1)
    rest_teacher = jnp.clip(1.0 - p.sum(-1), 0.0, 1.0)
    rest_student = jnp.clip(1.0 - jnp.exp(student).sum(-1), 1e-12, 1.0)
    rest = jnp.where(rest_teacher > 1e-12,
                     rest_teacher * (jnp.log(jnp.maximum(rest_teacher, 1e-12)) - jnp.log(rest_student)), 0.0)
    return top + rest


def loss_fn(comb, backbone, batch, cfg):
    """Mean cross-entropy over answer tokens, plus distillation from the full-prompt backbone on the same tokens.

    - kl_weight * KL(teacher || student) of the next-token distributions;
    - hidden_weight * the hidden-state distillation term: for each cross block k, the squared distance between
      the student's residual stream after the block and the teacher's at the same depth (the input of decoder
      layer c_k), both seen through layer c_k's attention norm (what that layer reads), averaged over blocks.
    batch: chunk_tokens/chunk_mask [B, n, L], tokens/targets/loss_mask [B, T], optionally answer_positions [B, A]
    (`answer_rows`) and, with either term, teacher_tokens [B, S] (context inlined) and teacher_index [B, T] (the
    teacher position predicting the same answer token). What `training.frozen_cache` adds is used instead of
    recomputing it: decoder_states [B, T, embed], chunk_states [B, n, L, embed], teacher_top_ids /
    teacher_top_logprobs [B, A, k] (the KL then runs over the teacher's top k, `top_k_kl`).
    Returns (loss, {"loss", "ce", "kl", "hidden", "answer_tokens"}).
    """
    tc = cfg.train
    dtype = jnp.dtype(cfg.compute_dtype)
    params = {"backbone": backbone, "comb": comb}
    picache = batch_picache(params, batch["chunk_tokens"], batch["chunk_mask"], cfg, dtype, tc.remat,
                            context_states=batch.get("chunk_states"))
    hidden, taps = forward_with_taps(params, batch["tokens"], cfg.model, picache, dtype=dtype, remat=tc.remat,
                                     first_states=batch.get("decoder_states"))
    positions, weight = answer_rows(batch)
    hidden = jnp.take_along_axis(hidden, positions[..., None], axis=1)  # [B, A, embed]
    log_probs = jax.nn.log_softmax(lm_logits(params, hidden), axis=-1)
    count = jnp.maximum(weight.sum(), 1.0)
    targets = jnp.take_along_axis(batch["targets"], positions, axis=1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    ce = (nll * weight).sum() / count
    kl = hidden_term = jnp.zeros((), jnp.float32)
    if "teacher_top_logprobs" in batch and tc.kl_weight > 0:
        per_token = top_k_kl(batch["teacher_top_logprobs"], batch["teacher_top_ids"], log_probs)
        kl = (per_token * weight).sum() / count
    elif tc.kl_weight > 0 or tc.hidden_weight > 0:
        teacher_hidden, teacher_taps = jax.lax.stop_gradient(
            forward_with_taps({"backbone": backbone}, batch["teacher_tokens"], cfg.model, dtype=dtype))
        index = jnp.take_along_axis(batch["teacher_index"], positions, axis=1)  # [B, A]
        if tc.kl_weight > 0:
            teacher_hidden = jnp.take_along_axis(teacher_hidden, index[..., None], axis=1)
            teacher_log_probs = jax.lax.stop_gradient(jax.nn.log_softmax(lm_logits(params, teacher_hidden), -1))
            per_token = (jnp.exp(teacher_log_probs) * (teacher_log_probs - log_probs)).sum(-1)
            kl = (per_token * weight).sum() / count
        if tc.hidden_weight > 0:
            teacher_taps = jnp.take_along_axis(teacher_taps, index[None, ..., None], axis=2)  # [E, B, A, embed]
            taps = jnp.take_along_axis(taps, positions[None, ..., None], axis=2)
            norms = backbone["layers"]["attn_norm"][np.asarray(cfg.model.cross_layers)][:, None, None, :]
            seen = lambda x: rms_norm(x.astype(jnp.float32), norms.astype(jnp.float32), cfg.model.rms_eps)
            per_token = jnp.mean((seen(taps) - seen(teacher_taps)) ** 2, axis=(0, 3))  # [B, A]
            hidden_term = (per_token * weight).sum() / count
    loss = ce + tc.kl_weight * kl + tc.hidden_weight * hidden_term
    return loss, {"loss": loss, "ce": ce, "kl": kl, "hidden": hidden_term, "answer_tokens": weight.sum()}


def kvpacket_objective_loss(adapter, backbone, batch, cfg):
    """`objective=kvpacket`: KL to the full prompt per answer token, plus `kvpacket_ce_weight` x cross-entropy."""
    loss, metrics = kvpacket.kvpacket_loss(adapter, backbone, batch, cfg, kl_weight=1.0,
                                           ce_weight=cfg.train.kvpacket_ce_weight)
    return loss, dict(metrics, hidden=jnp.zeros((), jnp.float32))


@dataclass(frozen=True)
class Objective:
    """One kind of training run. `name`: the params key of the trainable subtree ("comb" or "kvpacket");
    `layout(cfg)`: its parameter layout; `init(cfg, backbone, codec, key)`: its first value (host or device arrays);
    `batches(examples, codec, tc, seed[, rows])`: a checkpointable iterator of its batches (`rows`: a process's rows of
    each global batch, see `data.train_dataset`); `loss(trainable, backbone, batch,
    cfg)`; `after_save(run_dir, trainable, step)`: files written beside each checkpoint (or None)."""

    name: str
    layout: Callable
    init: Callable
    batches: Callable
    loss: Callable
    after_save: Callable | None = None


def _comb_layout(cfg) -> dict:
    return model_layout(cfg.model)["comb"]


def _comb_init(cfg, backbone, codec, key):
    return init_comb(cfg, backbone, key)


def _kvpacket_layout(cfg) -> dict:
    return {"trailer": Param((cfg.train.kvpacket_tokens, cfg.model.hidden), (None, "embed"))}


def _kvpacket_init(cfg, backbone, codec, key):
    return kvpacket.init_kvpacket(backbone, cfg.train.kvpacket_tokens, codec.encode(kvpacket.TRAILER_INIT_TEXT))


def _comb_batches(examples, codec, tc, seed, rows=None):
    return data_lib.train_iterator(examples, codec, tc, seed, rows)


ANSWER = Objective("comb", _comb_layout, _comb_init, _comb_batches, loss_fn)
KV = Objective("comb", _comb_layout, _comb_init, _comb_batches, kv_distill_loss)
KVPACKET = Objective("kvpacket", _kvpacket_layout, _kvpacket_init, kvpacket_data.train_iterator,
                     kvpacket_objective_loss, write_adapter)
OBJECTIVES = {"answer": ANSWER, "kv": KV, "kvpacket": KVPACKET}


def objective_for(cfg) -> Objective:
    """The Objective that `cfg.train.objective` names."""
    return OBJECTIVES[cfg.train.objective]


def objective_loss(trainable, backbone, batch, cfg):
    """The loss of `cfg.train.objective` (see `objective_for`)."""
    return objective_for(cfg).loss(trainable, backbone, batch, cfg)

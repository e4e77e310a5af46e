"""KV Packet's held-out reading: teacher-forced NLLs of a trained trailer beside naive reuse and the full prompt.

    python -m comb_jax.eval.kvpacket --config smollm2_comb --reading DATASET --adapter RUN_DIR

The method itself is `methods.kvpacket`; its training batches `training.kvpacket_data`; its files `weights.adapter`.
`evaluate` is the trainer's eval hook for `train.objective=kvpacket` (wired by `eval.in_training`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from comb_jax.config import load_config
from comb_jax.eval.harness import load_examples
from comb_jax.methods.kvpacket import student_hidden
from comb_jax.model.transformer import forward, lm_logits
from comb_jax.paths import DEFAULT_DATA_DIR
from comb_jax.text.codec import make_codec
from comb_jax.training.kvpacket_data import collate, tokenize
from comb_jax.weights.adapter import load_adapter
from comb_jax.weights.resolve import load_backbone


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
    tc = cfg.train
    codec = make_codec(cfg)
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
    examples, _ = load_examples(args.reading, DEFAULT_DATA_DIR, limit=args.limit, seed=0, num_distractors=2,
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

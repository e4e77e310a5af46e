"""KV Packet's held-out reading: teacher-forced NLLs of a trained trailer beside naive reuse and the full prompt
(`kvpacket_reading`, scored by `eval.reading.reading_nlls` as Comb's reading is).

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
from comb_jax.eval.reading import ReadingMethod, reading_nlls
from comb_jax.methods.kvpacket import student_hidden
from comb_jax.model.transformer import forward, lm_logits
from comb_jax.paths import DEFAULT_DATA_DIR
from comb_jax.text.codec import make_codec
from comb_jax.training.data import load_examples
from comb_jax.training.kvpacket_data import collate, tokenize
from comb_jax.weights.adapter import load_adapter
from comb_jax.weights.resolve import load_backbone


def evaluate(adapter, backbone, examples, cfg, reference: dict | None = None) -> dict:
    """Held-out metrics of a trailer during training (the trainer's `eval_every`), from `kvpacket_reading`:
    eval_loss = KL(full prompt || packets) per answer token (the objective), eval_kl_naive the same for naive reuse,
    eval_gap_closed / eval_gap_closed_naive and the NLLs behind them. `reference` (a dict the caller keeps) caches
    the readings that do not depend on the trailer."""
    r = reading_nlls(examples, kvpacket_reading(cfg, backbone, jax.device_get(adapter)), reference)
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


def kvpacket_reading(cfg, backbone, adapter, batch_size: int = 4) -> ReadingMethod:
    """KV Packet's readings for `reading.reading_nlls`: the NLL per answer token with the decoder-side prompt
    (template prefix + chunks + question, `training.kvpacket_data.tokenize`) built four ways: no chunks ("none"),
    chunks reused naively ("naive", a packet with P = 0), as packets ("kvpacket"), and inline ("full"); kl_naive /
    kl_kvpacket: KL(full prompt || X) per answer token, the training objective, held out. Only "kvpacket" and
    "kl_kvpacket" depend on the adapter."""
    tc = cfg.train
    codec = make_codec(cfg)
    zero = {"trailer": jnp.zeros((0, adapter["trailer"].shape[1]), jnp.float32)}
    trained = jax.tree.map(jnp.asarray, adapter)

    def per_example(trailer, examples) -> list[np.ndarray]:
        """(student NLL, full-prompt NLL, KL) float64 [requests], in batches of `batch_size` (the last repeats)."""
        values = [[], [], []]
        for start in range(0, len(examples), batch_size):
            part = examples[start:start + batch_size]
            real = len(part)
            part = part + part[-1:] * (batch_size - real)
            batch = jax.tree.map(jnp.asarray, collate([tokenize(e, codec, tc) for e in part], tc))
            for out, value in zip(values, _answer_nlls(trailer, backbone, batch, cfg)):
                out += np.asarray(value, np.float64)[:real].tolist()
        return [np.asarray(v, np.float64) for v in values]

    def reference(examples):
        naive, full, kl_naive = per_example(zero, examples)
        none, _, _ = per_example(zero, [dataclasses.replace(e, chunks=()) for e in examples])
        return {"none": none, "naive": naive, "full": full, "kl_naive": kl_naive}

    def method(examples):
        packet, _, kl_packet = per_example(trained, examples)
        return {"kvpacket": packet, "kl_kvpacket": kl_packet}

    return ReadingMethod("kvpacket", reference, method)


def main(argv=None):
    """`python -m comb_jax.eval.kvpacket --config C --reading DATASET --adapter RUN`: the teacher-forced reading NLLs
    of a trained trailer (training is `python train.py --config smollm2_kvpacket`)."""
    ap = argparse.ArgumentParser(prog="python -m comb_jax.eval.kvpacket",
                                 description="Reading NLLs of a KV Packet adapter (train one with train.py)")
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*", help="config key=value overrides")
    ap.add_argument("--reading", required=True, help="eval dataset (squad | jsonl:PATH | a reading "
                    "set), the eval's requests")
    ap.add_argument("--adapter", required=True, help="a kvpacket run dir or its adapter.safetensors")
    ap.add_argument("--limit", type=int, default=24, help="requests (the eval's seeded sample)")
    ap.add_argument("--out", default=None, help="write the result JSON here")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    examples = load_examples(args.reading, DEFAULT_DATA_DIR, "eval", seed=0, limit=args.limit, num_distractors=2,
                             max_chunk_chars=cfg.serve.max_chunk_tokens * 4, include_unanswerable=False)
    dtype = jnp.dtype(cfg.compute_dtype)
    backbone = jax.tree.map(lambda a: jnp.asarray(np.asarray(a), dtype), load_backbone(cfg))
    result = {"dataset": args.reading, "adapter": args.adapter,
              **reading_nlls(examples, kvpacket_reading(cfg, backbone, load_adapter(args.adapter)))}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

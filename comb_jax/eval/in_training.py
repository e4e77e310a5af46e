"""The trainer's eval hook: held-out metrics of the trainable subtree while it trains (`train.eval_every`).

`make_evaluator(cfg)` is what `cli.train` hands to `training.trainer.train`: Comb's `evaluate` (answer loss, F1 and
containment of greedy answers, the reading NLLs and the context gap closed) or, for `train.objective=kvpacket`,
`eval.kvpacket.evaluate`. Training itself never imports eval.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from comb_jax.eval import kvpacket as kvpacket_eval
from comb_jax.eval.harness import comb_reading
from comb_jax.eval.metrics import contains_answer, qa_f1
from comb_jax.eval.reading import reading_nlls
from comb_jax.methods.comb import batch_picache
from comb_jax.model.decode import generate
from comb_jax.training import data as data_lib
from comb_jax.training.objectives import loss_fn


def make_evaluator(cfg):
    """evaluate(trainable, backbone, examples, codec) -> metrics for `cfg`'s objective (see the module docstring)."""
    if cfg.train.objective == "kvpacket":
        readings = {}  # the readings that do not depend on the trailer, computed once
        return lambda adapter, backbone, examples, codec: kvpacket_eval.evaluate(adapter, backbone, examples, cfg,
                                                                                 readings)
    tc = cfg.train
    loss_step = jax.jit(lambda comb, bb, batch: loss_fn(comb, bb, batch, cfg))
    reference = {}  # no-context and full-prompt NLLs of the eval set, computed once

    def run(comb, backbone, examples, codec) -> dict:
        return evaluate(comb, backbone, examples, codec, cfg, loss_step,
                        min(tc.teacher_max_tokens, tc.max_decoder_tokens), reference)

    return run


def evaluate(comb, backbone, examples, codec, cfg, loss_step, max_new_tokens: int,
             reference: dict | None = None) -> dict:
    """Held-out metrics of the current Comb on `examples`.

    eval_loss: answer-token CE on the training targets; eval_f1 / eval_contain: QA F1 and answer containment of the
    greedy answers (decoded with the PICache) against the gold answers; eval_gap_closed: the context gap closed on
    the gold answers (`eval.reading.reading_nlls`: (nll_none - nll_comb) / (nll_none - nll_full));
    eval_reading_gap_closed: the part of it that needs the right chunks ((nll_comb_other - nll_comb) /
    (nll_none - nll_full), with each question reading the next example's chunks): a Comb that learnt the answer
    style but does not read closes the first and not the second. `reference` (a dict kept by the caller) caches
    the no-context and full-prompt NLLs, which do not change during training.
    """
    dtype = jnp.dtype(cfg.compute_dtype)
    params = {"backbone": backbone, "comb": comb}
    encode_fn = jax.jit(lambda p, t, m: batch_picache(p, t, m, cfg, dtype))
    total_loss = total_tokens = 0.0
    f1_gold, f1_target, contain, samples = [], [], [], []
    contain_by_tag: dict[str, list[float]] = {}  # per set, for a mixed eval file (JSONL rows' "set")
    for batch, real, part in data_lib.eval_batches(examples, codec, cfg.train):
        _, metrics = loss_step(comb, backbone, batch)
        total_loss += float(metrics["ce"]) * float(metrics["answer_tokens"])
        total_tokens += float(metrics["answer_tokens"])
        prompts = [codec.prompt_ids(e.question) for e in part]
        width = -(-max(len(p) for p in prompts) // 16) * 16
        tokens = np.zeros((len(part), width), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)] = p
        picache = encode_fn(params, batch["chunk_tokens"], batch["chunk_mask"])
        out, _ = generate(params, jnp.asarray(tokens), jnp.asarray([len(p) for p in prompts], jnp.int32), picache,
                          cfg.model, max_new_tokens=max_new_tokens, stop_ids=codec.stop_ids, dtype=dtype)
        out = np.asarray(out)
        for i, e in enumerate(part[:real]):
            answer = codec.decode(out[i]).strip()
            f1_gold.append(qa_f1(answer, list(e.golds)))
            f1_target.append(qa_f1(answer, e.answer))
            contain.append(contains_answer(answer, list(e.golds)))
            if e.tag:
                contain_by_tag.setdefault(e.tag, []).append(contain[-1])
            if len(samples) < 3:
                samples.append({"question": e.question, "answer": answer, "target": e.answer})
    reading = reading_nlls(examples, comb_reading(params, cfg.model, codec, cfg.train.max_chunk_tokens, dtype),
                           reference)
    return {"eval_loss": total_loss / max(total_tokens, 1.0), "eval_f1": float(np.mean(f1_gold)),
            "eval_f1_target": float(np.mean(f1_target)), "eval_contain": float(np.mean(contain)),
            **{f"eval_contain_{tag}": float(np.mean(v)) for tag, v in sorted(contain_by_tag.items())},
            **{f"eval_{k}": reading[k] for k in ("nll_none", "nll_comb", "nll_full", "nll_comb_other", "gap_closed",
                                                 "reading_gap_closed")},
            "eval_samples": samples}

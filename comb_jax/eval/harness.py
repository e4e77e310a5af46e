"""PIC modes side by side on real requests: answer quality, time to first token, cache memory, hit rate.

    python -m comb_jax.eval --config smollm2_comb [--checkpoint RUN_DIR] --dataset squad \\
        --modes full,prefix,naive,rerotate,epic,comb --limit 16 --out runs/eval

Every request runs twice per mode: pass "original" over all requests in their chunk order, then pass "shuffled"
over all requests with their chunks in another order, so chunk caches warmed by the first pass are tested for
order-independent reuse. Each mode starts from empty caches and is warmed up (compiled) on the first request
first; a request during which XLA compiled anything is left out of the timing statistics.

Measured per mode (written to OUT/results.json, OUT/results.md, OUT/results.png; per request to
OUT/requests.jsonl):
- score: QA F1 (LongBench normalisation, max over golds) or Rouge-L (xsum), per pass;
- contain: `metrics.contains_answer`, the normalised gold occurs in the normalised answer as whole tokens (max over
  golds), per pass: a 135M model answers in sentences, containment sees whether the fact is there;
- same_answer_across_orders: fraction of requests whose answer tokens are identical in both passes;
- ttft_hit_ms / ttft_miss_ms: median time to first token of requests whose chunks all came from the mode's
  cache / that had to compute at least one chunk (for "full" every request is a miss);
- hit_rate_shuffled: chunks served from cache / chunks, in the shuffled pass;
- cache_bytes_per_token: bytes the mode's reusable cache holds per cached context token (measured);
  decoder_kv_bytes_per_context_token: bytes of decoder KV each context token occupies while answering;
- attn_sim (decoder-side modes): `pic_modes.attention_similarity` of the question tokens' last-layer attention
  over the context slots against the full prompt's, mean over question tokens, heads and requests;
- hidden_cos: cosine similarity, against the full prompt, of the final hidden state that predicts the first
  answer token; same_answer: fraction of answers identical to the full prompt's.

Once per run (it does not depend on the mode; `--no-reading` skips it), `reading.reading_nlls` with `comb_reading`
measures how much Comb reads: the teacher-forced NLL per answer token of each request's reference answer
(`Codec.answer_ids(golds[0])`) with no context (the question alone, the plain backbone), with Comb (the same prompt
reading the chunks' PICaches) and with the full prompt (context inlined, as mode "full" builds it), each averaged
over requests, and gap_closed = (nll_none - nll_comb) / (nll_none - nll_full) from those means: 1 = Comb reads as
well as the full prompt, 0 = as if there were no context. In results.json under "reading" (per request under
"per_example") and as a second table in results.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from comb_jax import distributed
from comb_jax.config import load_config
from comb_jax.eval import join
from comb_jax.eval.metrics import contains_answer, qa_f1, rouge_l
from comb_jax.eval.pic_modes import DECODER_MODES, MODES, PicRunner, attention_similarity, context_attention
from comb_jax.eval.reading import ReadingMethod, reading_nlls
from comb_jax.methods.kvpacket import init_kvpacket
from comb_jax.model.buckets import round_up
from comb_jax.model.compiles import compile_count
from comb_jax.model.transformer import PICache, encode, forward, lm_logits
from comb_jax.paths import DEFAULT_DATA_DIR
from comb_jax.serving import quant
from comb_jax.text.codec import Codec, make_codec
from comb_jax.text.prompt import prompt_segments
from comb_jax.training import data
from comb_jax.weights.adapter import load_adapter
from comb_jax.weights.resolve import load_model

log = logging.getLogger("comb_jax.eval.harness")
PASSES = ("original", "shuffled")

# ----------------------------------------------------------------------------------------------------------
# Requests


def metric_for(dataset: str) -> str:
    """How an answer is scored on `dataset`: "rouge_l" for xsum's summaries, else QA "f1"."""
    return "rouge_l" if dataset == "xsum" else "f1"


def shuffled_order(n: int, rng: np.random.Generator) -> list[int]:
    """A permutation of range(n) other than the identity (when n > 1)."""
    if n < 2:
        return list(range(n))
    while True:
        order = [int(i) for i in rng.permutation(n)]
        if order != list(range(n)):
            return order


# ----------------------------------------------------------------------------------------------------------
# Reading: teacher-forced NLL of the reference answer with no context, with Comb and with the full prompt

NLL_BUCKET = 64  # decoder and chunk lengths are padded to multiples of this, so few shapes compile
ANSWER_BUCKET = 16  # answer positions (where the LM head runs) are padded to multiples of this


@partial(jax.jit, static_argnames=("cfg", "dtype", "pic_dtype"))
def _answer_nll_sums(params, tokens, positions, targets, target_mask, chunk_tokens, chunk_mask, *, cfg, dtype,
                     pic_dtype="auto"):
    """Summed NLL [B] of `targets` predicted at `positions`.

    tokens [B, T]; positions, targets, target_mask [B, A]; chunk_tokens, chunk_mask [B, n, L] (each chunk encoded on
    its own, joined along the context axis as training's `batch_picache` does) or None (no PICache: the backbone).
    The LM head runs at the answer positions only. The PICache is read back as a pool storing `pic_dtype` gives it.
    """
    picache = None
    if chunk_tokens is not None:
        b, n, length = chunk_tokens.shape
        c = encode(params, chunk_tokens.reshape(b * n, length), chunk_mask.reshape(b * n, length), cfg, dtype)
        e, _, _, kv, d = c.k.shape
        picache = PICache(quant.round_trip(c.k.reshape(e, b, n * length, kv, d), pic_dtype),
                          quant.round_trip(c.v.reshape(e, b, n * length, kv, d), pic_dtype),
                          chunk_mask.reshape(b, n * length))
    hidden, _ = forward(params, tokens, cfg, picache, dtype=dtype)
    hidden = jnp.take_along_axis(hidden, positions[..., None], axis=1)
    log_probs = jax.nn.log_softmax(lm_logits(params, hidden), axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return (nll * target_mask).sum(-1)


def answer_nlls(params, model_cfg, prompts, answers, chunks=None, dtype=jnp.float32, batch_size: int = 8,
                pic_dtype: str = "auto") -> np.ndarray:
    """Teacher-forced NLL per answer token (mean over the answer's tokens) of each request: float64 [requests].

    prompts[i], answers[i]: token ids (the decoder sees prompt + answer[:-1] and is scored on every answer token);
    chunks: None (no PICache: the plain backbone, whatever params["comb"] holds) or, per request, a list of chunk
    ids, each encoded on its own into a PICache that the cross blocks read (an empty list reads nothing).
    Requests are batched by length into `batch_size` rows (the last batch repeats a row); lengths are padded to
    multiples of NLL_BUCKET and the number of chunks to the largest, so repeated calls compile a few shapes only.
    """
    if len(answers) != len(prompts) or (chunks is not None and len(chunks) != len(prompts)):
        raise ValueError("prompts, answers (and chunks) must have one entry per request")
    if not len(prompts):
        return np.zeros((0,), np.float64)
    if any(not p for p in prompts) or any(not a for a in answers):
        raise ValueError("every request needs a non-empty prompt and a non-empty answer")
    dtype = jnp.dtype(dtype)
    num_chunks = max(1, max(len(c) for c in chunks)) if chunks is not None else 0
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(answers[i]))
    out = np.zeros((len(prompts),), np.float64)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        rows = rows + rows[-1:] * (batch_size - len(rows))
        width = round_up(max(len(prompts[i]) + len(answers[i]) - 1 for i in rows), NLL_BUCKET)
        answer_width = round_up(max(len(answers[i]) for i in rows), ANSWER_BUCKET)
        tokens = np.zeros((batch_size, width), np.int32)
        positions = np.zeros((batch_size, answer_width), np.int32)
        targets = np.zeros((batch_size, answer_width), np.int32)
        target_mask = np.zeros((batch_size, answer_width), np.float32)
        for r, i in enumerate(rows):
            seq = list(prompts[i]) + list(answers[i])
            tokens[r, :len(seq) - 1] = seq[:-1]
            k = len(answers[i])
            positions[r, :k] = np.arange(len(prompts[i]) - 1, len(seq) - 1)
            targets[r, :k] = answers[i]
            target_mask[r, :k] = 1.0
        chunk_tokens = chunk_mask = None
        if chunks is not None:
            length = round_up(max([len(c) for i in rows for c in chunks[i]] or [1]), NLL_BUCKET)
            chunk_tokens = np.zeros((batch_size, num_chunks, length), np.int32)
            chunk_mask = np.zeros((batch_size, num_chunks, length), bool)
            for r, i in enumerate(rows):
                for j, c in enumerate(chunks[i]):
                    chunk_tokens[r, j, :len(c)] = c
                    chunk_mask[r, j, :len(c)] = True
        sums = _answer_nll_sums(params, tokens, positions, targets, target_mask, chunk_tokens, chunk_mask,
                                cfg=model_cfg, dtype=dtype, pic_dtype=pic_dtype)
        sums = np.asarray(jax.device_get(sums), np.float64)
        for r, i in enumerate(rows):  # a repeated row writes the same value again
            out[i] = sums[r] / len(answers[i])
    return out


def comb_reading(params, model_cfg, codec: Codec, max_chunk_tokens: int, dtype=jnp.float32, batch_size: int = 8,
                 pic_dtype: str = "auto") -> ReadingMethod:
    """Comb's readings for `reading.reading_nlls`: the NLL per token of `Codec.answer_ids(answer)` after (none) the
    question alone with no PICache (`codec.prompt_ids(question)`: the plain backbone), (comb) the same prompt
    reading the Comb PICaches of the chunks (each `codec.encode(chunk)`, truncated to `max_chunk_tokens`, as
    training and `prompt_segments` tokenize them), (full) the full prompt with the context inlined
    (`prompt_segments(...).full`, what mode "full" prefills), and (comb_other, with more than one example) Comb
    reading the next request's chunks: a trained Comb's answer style lowers comb whether or not it reads,
    comb_other only by style. none and full do not depend on the Comb parameters."""
    run = partial(answer_nlls, params, model_cfg, dtype=dtype, batch_size=batch_size, pic_dtype=pic_dtype)

    def segments(examples):
        return ([prompt_segments(codec, e.chunks, e.question, max_chunk_tokens) for e in examples],
                [codec.answer_ids(e.answer) for e in examples])

    def reference(examples):
        segs, answers = segments(examples)
        return {"none": run([list(s.comb_prompt) for s in segs], answers),
                "full": run([list(s.full) for s in segs], answers)}

    def method(examples):
        segs, answers = segments(examples)
        prompts, chunks = [list(s.comb_prompt) for s in segs], [list(s.comb_chunks) for s in segs]
        nlls = {"comb": run(prompts, answers, chunks)}
        if len(examples) > 1:  # each question reading the next request's chunks: what style alone is worth
            nlls["comb_other"] = run(prompts, answers, chunks[1:] + chunks[:1])
        return nlls

    return ReadingMethod("comb", reference, method)


# ----------------------------------------------------------------------------------------------------------
# Running


def _median_ms(values):
    return round(1000 * statistics.median(values), 2) if values else None


def _mean(values):
    return round(float(np.mean(values)), 4) if values else None


def run_eval(runner: PicRunner, codec: Codec, examples: list[data.Example], modes: list[str], *, metric: str,
             max_chunk_tokens: int, seed: int, records_path: Path | None = None, progress: bool = True,
             reading: bool = True) -> dict:
    """Run every mode over both passes; returns {"modes": {mode: summary}, "reading": `reading_nlls` (unless
    `reading` is False), ...} (see the module docstring)."""
    def score(pred: str, golds) -> float:
        return qa_f1(pred, list(golds)) if metric == "f1" else rouge_l(pred, golds[0])

    rng = np.random.default_rng(seed)
    requests = []
    for e in examples:
        seg = prompt_segments(codec, e.chunks, e.question, max_chunk_tokens)
        requests.append((e, {"original": seg, "shuffled": seg.reordered(shuffled_order(len(seg.chunks), rng))}))
    # pools big enough for every chunk of the run: a pass's hits are not lost to eviction
    runner.reserve([s for _, segs in requests for s in segs.values()])
    modes = sorted(modes, key=lambda m: m != "full")  # the full prompt first: it is every other mode's reference
    reference: dict = {}  # (example id, pass) -> (tokens, last hidden, context attention)
    itemsize = jnp.dtype(runner.dtype).itemsize
    m = runner.cfg
    records_file = records_path.open("w") if records_path else None
    summary = {}
    answered: dict = {}  # (mode, example id) -> answer tokens of the original pass
    try:
        for mode in modes:
            runner.reset()
            warm = requests[0][1]
            for p in PASSES:  # compile this mode's shapes outside the measurements
                runner.answer(mode, warm[p])
            runner.reset()
            rows = []
            bar = tqdm(total=2 * len(requests), desc=f"eval {mode}", disable=not progress)
            for p in PASSES:
                for e, segs in requests:
                    seg = segs[p]
                    before = compile_count()
                    answer = runner.answer(mode, seg)
                    text = codec.decode(answer.tokens).strip()
                    row = {"mode": mode, "id": e.id, "pass": p, "answer": text, "score": score(text, e.golds),
                           "contain": contains_answer(text, list(e.golds)),
                           "ttft_s": answer.ttft_s, "total_s": answer.total_s, "new_tokens": len(answer.tokens),
                           "chunk_hits": answer.chunk_hits, "num_chunks": answer.num_chunks,
                           "context_tokens": len(seg.context), "compiled": compile_count() != before}
                    attn = context_attention(runner, seg, answer) if mode in DECODER_MODES and "full" in modes else None
                    answer.kv_cache = None
                    if p == PASSES[0]:
                        answered[mode, e.id] = answer.tokens
                    elif (mode, e.id) in answered:
                        row["same_answer_across_orders"] = answer.tokens == answered[mode, e.id]
                    if mode == "full":
                        reference[e.id, p] = (answer.tokens, text, answer.last_hidden, attn)
                    if (e.id, p) in reference:
                        ref_tokens, ref_text, ref_hidden, ref_attn = reference[e.id, p]
                        # the metric with the full prompt's answer as the gold: agreement with the teacher
                        row["score_vs_full"] = score(text, [ref_text])
                        h = answer.last_hidden
                        norms = np.linalg.norm(h) * np.linalg.norm(ref_hidden)
                        row["hidden_cos"] = float(h @ ref_hidden / max(norms, 1e-30))
                        row["same_answer"] = answer.tokens == ref_tokens
                        if attn is not None:
                            row["attn_sim"] = attention_similarity(attn, ref_attn)
                    rows.append(row)
                    if records_file:
                        records_file.write(json.dumps(row) + "\n")
                        records_file.flush()
                    bar.update(1)
            bar.close()
            timed = [r for r in rows if not r["compiled"]]
            hit = [r["ttft_s"] for r in timed if mode != "full" and r["chunk_hits"] == r["num_chunks"]]
            miss = [r["ttft_s"] for r in timed if mode == "full" or r["chunk_hits"] < r["num_chunks"]]
            per_pass = {p: [r for r in rows if r["pass"] == p] for p in PASSES}
            summary[mode] = {
                "score_original": _mean([r["score"] for r in per_pass["original"]]),
                "score_shuffled": _mean([r["score"] for r in per_pass["shuffled"]]),
                "score_vs_full": _mean([r["score_vs_full"] for r in rows if "score_vs_full" in r]),
                "contain_original": _mean([r["contain"] for r in per_pass["original"]]),
                "contain_shuffled": _mean([r["contain"] for r in per_pass["shuffled"]]),
                "same_answer_across_orders": _mean([float(r["same_answer_across_orders"]) for r in rows
                                                    if "same_answer_across_orders" in r]),
                "ttft_hit_ms": _median_ms(hit), "ttft_miss_ms": _median_ms(miss),
                "timed_hits": len(hit), "timed_misses": len(miss), "untimed_compiling": len(rows) - len(timed),
                "hit_rate_original": round(sum(r["chunk_hits"] for r in per_pass["original"])
                                           / max(1, sum(r["num_chunks"] for r in per_pass["original"])), 4),
                "hit_rate_shuffled": round(sum(r["chunk_hits"] for r in per_pass["shuffled"])
                                           / max(1, sum(r["num_chunks"] for r in per_pass["shuffled"])), 4),
                "cache_bytes_per_token": round(runner.cache_bytes_per_token(mode), 1),
                "decoder_kv_bytes_per_context_token": (2 * m.num_layers * m.num_kv_heads * m.head_dim * itemsize
                                                       if mode in DECODER_MODES + ("kvpacket",) else 0),
                "page_compression": (None if runner.page_compression(mode) is None
                                     else round(runner.page_compression(mode), 4)),
                "attn_sim": _mean([r["attn_sim"] for r in rows if "attn_sim" in r]),
                "hidden_cos": _mean([r["hidden_cos"] for r in rows if "hidden_cos" in r]),
                "same_answer": _mean([float(r["same_answer"]) for r in rows if "same_answer" in r]),
                "mean_context_tokens": _mean([r["context_tokens"] for r in rows]),
            }
            log.info(json.dumps({"mode": mode, **summary[mode]}))
            runner.reset()
    finally:
        if records_file:
            records_file.close()
    results = {"metric": metric, "requests": len(requests), "modes": summary}
    if reading:
        results["reading"] = reading_nlls(examples, comb_reading(runner.params, runner.cfg, codec, max_chunk_tokens,
                                                                 runner.dtype, pic_dtype=runner.pic_dtype))
        log.info(json.dumps({k: v for k, v in results["reading"].items() if k != "per_example"}))
    return results


# ----------------------------------------------------------------------------------------------------------
# Reports

COLUMNS = [  # (key, header)
    ("score_original", "{metric} (original order)"), ("score_shuffled", "{metric} (shuffled)"),
    ("score_vs_full", "{metric} vs full's answer"),
    ("contain_original", "contain (original order)"), ("contain_shuffled", "contain (shuffled)"),
    ("ttft_hit_ms", "TTFT hit ms"), ("ttft_miss_ms", "TTFT miss ms"), ("hit_rate_shuffled", "hit rate shuffled"),
    ("cache_bytes_per_token", "cache B/token"), ("decoder_kv_bytes_per_context_token", "decoder KV B/ctx token"),
    ("page_compression", "joint page compression"),
    ("attn_sim", "attn sim"), ("hidden_cos", "hidden cos"), ("same_answer", "same answer as full"),
    ("same_answer_across_orders", "same answer across orders"),
]
READING_COLUMNS = [("nll_none", "NLL no context"), ("nll_comb", "NLL Comb"), ("nll_full", "NLL full prompt"),
                   ("nll_comb_other", "NLL Comb, other request's chunks"), ("gap_closed", "gap closed"),
                   ("reading_gap_closed", "gap closed by the right chunks")]


def _cell(value) -> str:
    return "" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def markdown_table(results: dict) -> str:
    metric = results["metric"]
    head = ["mode"] + [h.format(metric=metric) for _, h in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for mode, s in results["modes"].items():
        lines.append("| " + " | ".join([mode] + [_cell(s.get(k)) for k, _ in COLUMNS]) + " |")
    r = results.get("reading")
    if r:
        lines += ["", f"Reading: teacher-forced NLL per answer token of the reference answer, mean over "
                      f"{r['requests']} requests; gap closed = (none - Comb) / (none - full).", "",
                  "| " + " | ".join(h for _, h in READING_COLUMNS) + " |", "|" + "---|" * len(READING_COLUMNS),
                  "| " + " | ".join(_cell(None if r[k] is None else round(r[k], 4)) for k, _ in READING_COLUMNS)
                  + " |"]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(results["modes"])
    s = results["modes"]
    x = np.arange(len(modes))
    fig, axes = plt.subplots(2, 3, figsize=(16, 7))
    value = lambda k: [s[m].get(k) or 0 for m in modes]  # noqa: E731
    ax = axes[0, 0]
    ax.bar(x - 0.2, value("score_original"), 0.4, label="original order")
    ax.bar(x + 0.2, value("score_shuffled"), 0.4, label="shuffled")
    ax.set_title(results["metric"]), ax.legend()
    ax = axes[0, 2]
    ax.bar(x - 0.2, value("contain_original"), 0.4, label="original order")
    ax.bar(x + 0.2, value("contain_shuffled"), 0.4, label="shuffled")
    ax.set_title("gold answer contained"), ax.legend()
    axes[1, 2].bar(x, value("same_answer_across_orders"))
    axes[1, 2].set_title("same answer in both chunk orders")
    ax = axes[0, 1]
    ax.bar(x - 0.2, value("ttft_hit_ms"), 0.4, label="hit")
    ax.bar(x + 0.2, value("ttft_miss_ms"), 0.4, label="miss")
    ax.set_title("time to first token (ms, median)"), ax.legend()
    ax = axes[1, 0]
    ax.bar(x - 0.2, [v / 1024 for v in value("cache_bytes_per_token")], 0.4, label="reusable cache")
    ax.bar(x + 0.2, [v / 1024 for v in value("decoder_kv_bytes_per_context_token")], 0.4, label="decoder KV")
    ax.set_title("KiB per context token"), ax.legend()
    axes[1, 1].bar(x, value("hit_rate_shuffled"))
    axes[1, 1].set_title("chunk hit rate, shuffled order")
    for ax in axes.flat:
        ax.set_xticks(x, modes)
    title = f"{results.get('config', '')} {results.get('dataset', '')}: {results['requests']} requests"
    r = results.get("reading")
    if r:
        nlls = ", ".join(f"{h} {_cell(None if r[k] is None else round(r[k], 3))}" for k, h in READING_COLUMNS)
        title += f"\n{nlls}"
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_reports(results: dict, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown_table(results))
    plot(results, out / "results.png")


# ----------------------------------------------------------------------------------------------------------


def _thresholds(text: str):
    """'0.4' -> 0.4; 'comb=0.4,naive=1.1' -> {"comb": 0.4, "naive": 1.1}."""
    if "=" not in text:
        return float(text)
    return {m.strip(): float(t) for m, t in (part.split("=", 1) for part in text.split(",") if part.strip())}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m comb_jax.eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="configs/NAME.py")
    ap.add_argument("--checkpoint", default=None, help="training run dir (default: fresh Comb params, gates 0)")
    ap.add_argument("--dataset", default="squad",
                    help="squad (old name: squad_multidoc) | xsum | jsonl:PATH | the held-out reading sets wording | "
                         "distractors | style (never trained on); several, comma-separated, run one after another "
                         "into OUT/NAME/ with one summary table in OUT/summary.md")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {','.join(MODES)}")
    ap.add_argument("--limit", type=int, default=16, help="number of requests (0: all)")
    ap.add_argument("--out", default="runs/eval", help="output directory")
    ap.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    ap.add_argument("--epic-k", type=int, default=16, help="tokens recomputed at the start of each chunk (epic)")
    ap.add_argument("--max-new-tokens", type=int, default=0, help="0: serve.max_new_tokens")
    ap.add_argument("--num-distractors", type=int, default=2, help="squad: distractor paragraphs")
    ap.add_argument("--include-unanswerable", action="store_true", help="squad: keep SQuAD 2.0 "
                    "unanswerable questions (gold: data.NO_ANSWER)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-reading", action="store_true", help="skip the teacher-forced NLLs and gap closed")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--kvpacket", default=None, help="mode kvpacket: a `train.py --config smollm2_kvpacket` run dir "
                    "(or its adapter.safetensors); 'zero' or none: no trailer tokens (exactly naive reuse)")
    ap.add_argument("--joint-threshold", type=_thresholds, default=-1.0, help="store chunk caches as joint-encoded "
                    "pages: a page within this relative distance of a stored page shares it (< 0: off; 0: exact "
                    "duplicates); one number for every mode or MODE=T,MODE=T")
    ap.add_argument("--joint-page-tokens", type=int, default=16, help="page size of the chunk-cache pools")
    ap.add_argument("overrides", nargs="*", help="config key=value overrides")
    distributed.add_arguments(ap)
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    """The harness; in a multi-process run (every host runs the same command) the primary evaluates on its own
    devices and writes the reports, and the others wait for it."""
    args = parse_args(argv)
    distributed.initialize_from(args, "python -m comb_jax.eval")  # first: before anything touches a device
    if not distributed.is_primary():
        distributed.barrier("comb_jax.eval.done")
        return {}
    try:
        return _main(args, argv)
    finally:
        distributed.barrier("comb_jax.eval.done")


def _main(args, argv) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise SystemExit(f"--modes: unknown mode(s) {unknown}; valid modes: {', '.join(MODES)}")
    if args.limit < 0:
        raise SystemExit(f"--limit must be >= 0, got {args.limit}")
    cfg = load_config(args.config, args.overrides)
    codec = make_codec(cfg)
    datasets = [d.strip() for d in args.dataset.split(",") if d.strip()]
    loaded = {d: (data.load_examples(d, Path(args.data_dir), "eval", seed=args.seed, limit=args.limit,
                                     num_distractors=args.num_distractors,
                                     max_chunk_chars=cfg.serve.max_chunk_tokens * 4,
                                     include_unanswerable=args.include_unanswerable), metric_for(d))
              for d in datasets}
    cfg, params = load_model(cfg, args.checkpoint)
    if "kvpacket" in modes:
        if not args.kvpacket:  # like Comb without a checkpoint: runs, but untrained (P = 0: exactly naive reuse)
            log.warning("mode kvpacket without --kvpacket: no trailer tokens, the mode equals naive reuse")
        params["kvpacket"] = (load_adapter(args.kvpacket) if args.kvpacket not in (None, "zero")
                              else init_kvpacket(params["backbone"], 0))
    runner = PicRunner(params, cfg.model, stop_ids=codec.stop_ids,
                       max_new_tokens=args.max_new_tokens or cfg.serve.max_new_tokens, epic_k=args.epic_k,
                       dtype=jnp.dtype(cfg.compute_dtype), pic_dtype=cfg.serve.pic_dtype,
                       joint_threshold=args.joint_threshold, joint_page_tokens=args.joint_page_tokens)
    out = Path(args.out)
    every = {}
    for dataset, (examples, metric) in loaded.items():
        where = out / dataset.replace(":", "_").replace("/", "_") if len(loaded) > 1 else out
        where.mkdir(parents=True, exist_ok=True)
        results = run_eval(runner, codec, examples, modes, metric=metric, max_chunk_tokens=cfg.serve.max_chunk_tokens,
                           seed=args.seed, records_path=where / "requests.jsonl", progress=not args.no_progress,
                           reading=not args.no_reading)
        results.update(kvpacket=args.kvpacket, joint_threshold=args.joint_threshold,
                       joint_page_tokens=args.joint_page_tokens)
        results.update(config=cfg.name, checkpoint=args.checkpoint, dataset=dataset, epic_k=args.epic_k,
                       max_new_tokens=runner.max_new_tokens, compute_dtype=cfg.compute_dtype,
                       pic_dtype=cfg.serve.pic_dtype,
                       command="python -m comb_jax.eval " + " ".join(sys.argv[1:] if argv is None else argv))
        write_reports(results, where)
        print(markdown_table(results))
        every[dataset] = results
    if len(every) > 1:  # the reading suite's one table, as `python -m comb_jax.eval.join OUT` makes it
        table = join.markdown(join.join_runs([out]))
        (out / "summary.md").write_text(table)
        print(table)
    return results if len(every) == 1 else every


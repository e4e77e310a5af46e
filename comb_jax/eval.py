"""PIC modes side by side on real requests: answer quality, time to first token, cache memory, hit rate.

    python -m comb_jax.eval --config smollm2_comb [--checkpoint RUN_DIR] --dataset squad_multidoc \\
        --modes full,prefix,naive,rerotate,epic,comb --limit 16 --out runs/eval

Every request runs twice per mode: pass "original" over all requests in their chunk order, then pass "shuffled"
over all requests with their chunks in another order, so chunk caches warmed by the first pass are tested for
order-independent reuse. Each mode starts from empty caches and is warmed up (compiled) on the first request
first; a request during which XLA compiled anything is left out of the timing statistics.

Measured per mode (written to OUT/results.json, OUT/results.md, OUT/results.png; per request to
OUT/requests.jsonl):
- score: QA F1 (LongBench normalisation, max over golds) or Rouge-L (xsum), per pass;
- ttft_hit_ms / ttft_miss_ms: median time to first token of requests whose chunks all came from the mode's
  cache / that had to compute at least one chunk (for "full" every request is a miss);
- hit_rate_shuffled: chunks served from cache / chunks, in the shuffled pass;
- cache_bytes_per_token: bytes the mode's reusable cache holds per cached context token (measured);
  decoder_kv_bytes_per_context_token: bytes of decoder KV each context token occupies while answering;
- attn_sim (decoder-side modes): `pic_modes.attention_similarity` of the question tokens' last-layer attention
  over the context slots against the full prompt's, mean over question tokens, heads and requests;
- hidden_cos: cosine similarity, against the full prompt, of the final hidden state that predicts the first
  answer token; same_answer: fraction of answers identical to the full prompt's.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from comb_jax import data
from comb_jax.checkpoint import load_params
from comb_jax.config import load_config
from comb_jax.metrics import qa_f1, rouge_l
from comb_jax.pic_modes import DECODER_MODES, MODES, PicRunner, Segments, attention_similarity, context_attention

log = logging.getLogger("comb_jax.eval")
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
CONTEXT_MARK = "<<CONTEXT>>"
PASSES = ("original", "shuffled")

# XLA compilations seen so far (jax reports one backend-compile event per compilation; cache hits report none)
_compiles = [0]


def _count_compiles(event: str, duration: float, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
        _compiles[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compiles)


# ----------------------------------------------------------------------------------------------------------
# Requests


def build_segments(codec: data.Codec, chunks, question: str, max_chunk_tokens: int) -> Segments:
    """Token ids of one request. The decoder-side prompt is the training teacher's (`Codec.teacher_prompt_ids`
    text: template + 'Context:\\n' + chunks joined by blank lines + '\\n\\nQuestion: ' + question), tokenized
    piece by piece so that each chunk's ids are the same wherever it appears (for SmolLM2 the pieces join into
    exactly the ids of the whole prompt, see tests/test_eval.py); Comb's prompt is
    `Codec.prompt_ids(question)` and its chunks are each chunk's own ids, as in training.
    """
    ids = codec.prompt_ids(CONTEXT_MARK)
    template = bytes(ids).decode("utf-8") if codec.tok is None else codec.tok.decode(ids)
    if template.count(CONTEXT_MARK) != 1:
        raise ValueError(f"cannot find the user turn in the prompt template {template!r}")
    before, after = template.split(CONTEXT_MARK)
    # the blank lines are split "\n" | "\n" between pieces: that is how the whole prompt tokenizes too
    chunk_ids = tuple(tuple(codec.encode("\n" + c + "\n")[:max_chunk_tokens]) for c in chunks)
    return Segments(prefix=tuple(codec.encode(before + "Context:")), chunks=chunk_ids,
                    suffix=tuple(codec.encode("\nQuestion: " + question + after)),
                    comb_prompt=tuple(codec.prompt_ids(question)),
                    comb_chunks=tuple(tuple(codec.encode(c)[:max_chunk_tokens]) for c in chunks))


def load_examples(dataset: str, data_dir: Path, *, limit: int, seed: int, num_distractors: int,
                  max_chunk_chars: int, include_unanswerable: bool) -> tuple[list[data.Example], str]:
    """Held-out examples (training's "eval" split) and the metric name ("f1" or "rouge_l")."""
    if dataset == "squad_multidoc":
        examples = data.squad_examples(data_dir, "eval", num_distractors, seed)
        if not include_unanswerable:
            examples = [e for e in examples if e.golds != (data.NO_ANSWER,)]
        metric = "f1"
    elif dataset == "xsum":
        examples, metric = data.xsum_examples(data_dir, "eval", max_chunk_chars), "rouge_l"
    elif dataset.startswith("jsonl:"):
        examples, metric = data.jsonl_examples(dataset[len("jsonl:"):]), "f1"
    else:
        raise ValueError(f"unknown dataset {dataset!r}; valid: squad_multidoc, xsum, jsonl:PATH")
    if limit and limit < len(examples):  # a seeded sample, so that a small limit still spans articles
        keep = np.sort(np.random.default_rng(seed).permutation(len(examples))[:limit])
        examples = [examples[i] for i in keep]
    return examples, metric


def shuffled_order(n: int, rng: np.random.Generator) -> list[int]:
    """A permutation of range(n) other than the identity (when n > 1)."""
    if n < 2:
        return list(range(n))
    while True:
        order = [int(i) for i in rng.permutation(n)]
        if order != list(range(n)):
            return order


# ----------------------------------------------------------------------------------------------------------
# Running


def _median_ms(values):
    return round(1000 * statistics.median(values), 2) if values else None


def _mean(values):
    return round(float(np.mean(values)), 4) if values else None


def run_eval(runner: PicRunner, codec: data.Codec, examples: list[data.Example], modes: list[str], *, metric: str,
             max_chunk_tokens: int, seed: int, records_path: Path | None = None, progress: bool = True) -> dict:
    """Run every mode over both passes; returns {"modes": {mode: summary}, ...} (see the module docstring)."""
    from tqdm import tqdm

    def score(pred: str, golds) -> float:
        return qa_f1(pred, list(golds)) if metric == "f1" else rouge_l(pred, golds[0])

    rng = np.random.default_rng(seed)
    requests = []
    for e in examples:
        seg = build_segments(codec, e.chunks, e.question, max_chunk_tokens)
        requests.append((e, {"original": seg, "shuffled": seg.reordered(shuffled_order(len(seg.chunks), rng))}))
    modes = sorted(modes, key=lambda m: m != "full")  # the full prompt first: it is every other mode's reference
    reference: dict = {}  # (example id, pass) -> (tokens, last hidden, context attention)
    itemsize = jnp.dtype(runner.dtype).itemsize
    m = runner.cfg
    records_file = records_path.open("w") if records_path else None
    summary = {}
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
                    before = _compiles[0]
                    answer = runner.answer(mode, seg)
                    text = codec.decode(answer.tokens).strip()
                    row = {"mode": mode, "id": e.id, "pass": p, "answer": text, "score": score(text, e.golds),
                           "ttft_s": answer.ttft_s, "total_s": answer.total_s, "new_tokens": len(answer.tokens),
                           "chunk_hits": answer.chunk_hits, "num_chunks": answer.num_chunks,
                           "context_tokens": len(seg.context), "compiled": _compiles[0] != before}
                    attn = context_attention(runner, seg, answer) if mode in DECODER_MODES and "full" in modes else None
                    answer.kv_cache = None
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
                "ttft_hit_ms": _median_ms(hit), "ttft_miss_ms": _median_ms(miss),
                "timed_hits": len(hit), "timed_misses": len(miss), "untimed_compiling": len(rows) - len(timed),
                "hit_rate_original": round(sum(r["chunk_hits"] for r in per_pass["original"])
                                           / max(1, sum(r["num_chunks"] for r in per_pass["original"])), 4),
                "hit_rate_shuffled": round(sum(r["chunk_hits"] for r in per_pass["shuffled"])
                                           / max(1, sum(r["num_chunks"] for r in per_pass["shuffled"])), 4),
                "cache_bytes_per_token": round(runner.cache_bytes_per_token(mode), 1),
                "decoder_kv_bytes_per_context_token": (2 * m.num_layers * m.num_kv_heads * m.head_dim * itemsize
                                                       if mode in DECODER_MODES else 0),
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
    return {"metric": metric, "requests": len(requests), "modes": summary}


# ----------------------------------------------------------------------------------------------------------
# Reports

COLUMNS = [  # (key, header)
    ("score_original", "{metric} (original order)"), ("score_shuffled", "{metric} (shuffled)"),
    ("score_vs_full", "{metric} vs full's answer"),
    ("ttft_hit_ms", "TTFT hit ms"), ("ttft_miss_ms", "TTFT miss ms"), ("hit_rate_shuffled", "hit rate shuffled"),
    ("cache_bytes_per_token", "cache B/token"), ("decoder_kv_bytes_per_context_token", "decoder KV B/ctx token"),
    ("attn_sim", "attn sim"), ("hidden_cos", "hidden cos"), ("same_answer", "same answer as full"),
]


def markdown_table(results: dict) -> str:
    metric = results["metric"]
    head = ["mode"] + [h.format(metric=metric) for _, h in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for mode, s in results["modes"].items():
        cells = ["" if s[k] is None else f"{s[k]:g}" if isinstance(s[k], float) else str(s[k]) for k, _ in COLUMNS]
        lines.append("| " + " | ".join([mode] + cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(results["modes"])
    s = results["modes"]
    x = np.arange(len(modes))
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    value = lambda k: [s[m][k] or 0 for m in modes]  # noqa: E731
    ax = axes[0, 0]
    ax.bar(x - 0.2, value("score_original"), 0.4, label="original order")
    ax.bar(x + 0.2, value("score_shuffled"), 0.4, label="shuffled")
    ax.set_title(results["metric"]), ax.legend()
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
    fig.suptitle(f"{results.get('config', '')} {results.get('dataset', '')}: {results['requests']} requests")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_reports(results: dict, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown_table(results))
    plot(results, out / "results.png")


# ----------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m comb_jax.eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="configs/NAME.py")
    ap.add_argument("--checkpoint", default=None, help="training run dir (default: fresh Comb params, gates 0)")
    ap.add_argument("--dataset", default="squad_multidoc", help="squad_multidoc | xsum | jsonl:PATH")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {','.join(MODES)}")
    ap.add_argument("--limit", type=int, default=16, help="number of requests (0: all)")
    ap.add_argument("--out", default="runs/eval", help="output directory")
    ap.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    ap.add_argument("--epic-k", type=int, default=16, help="tokens recomputed at the start of each chunk (epic)")
    ap.add_argument("--max-new-tokens", type=int, default=0, help="0: serve.max_new_tokens")
    ap.add_argument("--num-distractors", type=int, default=2, help="squad_multidoc: distractor paragraphs")
    ap.add_argument("--include-unanswerable", action="store_true", help="squad_multidoc: keep SQuAD 2.0 "
                    "unanswerable questions (gold: data.NO_ANSWER)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("overrides", nargs="*", help="config key=value overrides")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise SystemExit(f"--modes: unknown mode(s) {unknown}; valid modes: {', '.join(MODES)}")
    if args.limit < 0:
        raise SystemExit(f"--limit must be >= 0, got {args.limit}")
    cfg = load_config(args.config, args.overrides)
    codec = data.make_codec(cfg)
    examples, metric = load_examples(args.dataset, Path(args.data_dir), limit=args.limit, seed=args.seed,
                                     num_distractors=args.num_distractors,
                                     max_chunk_chars=cfg.serve.max_chunk_tokens * 4,
                                     include_unanswerable=args.include_unanswerable)
    params = load_params(cfg, args.checkpoint)
    runner = PicRunner(params, cfg.model, stop_ids=codec.stop_ids,
                       max_new_tokens=args.max_new_tokens or cfg.serve.max_new_tokens, epic_k=args.epic_k,
                       dtype=jnp.dtype(cfg.compute_dtype))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = run_eval(runner, codec, examples, modes, metric=metric, max_chunk_tokens=cfg.serve.max_chunk_tokens,
                       seed=args.seed, records_path=out / "requests.jsonl", progress=not args.no_progress)
    results.update(config=cfg.name, checkpoint=args.checkpoint, dataset=args.dataset, epic_k=args.epic_k,
                   max_new_tokens=runner.max_new_tokens, compute_dtype=cfg.compute_dtype,
                   command="python -m comb_jax.eval " + " ".join(sys.argv[1:] if argv is None else argv))
    write_reports(results, out)
    print(markdown_table(results))
    return results


if __name__ == "__main__":
    main()

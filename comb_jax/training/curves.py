"""Training curves of one or more runs from their `metrics.jsonl`, side by side in one PNG.

    python -m comb_jax.training.curves runs/smollm2_warm runs/smollm2_random --out docs/training_curves.png \\
        [--smooth 10]

Panels: training loss (moving average over `--smooth` steps) against step; the periodic eval loss and F1 (against
the gold answers and against the training targets); reading (answer containment and context gap closed, when the
run logged them); the cross blocks' gates over time (mean |tanh(gate)| of the attention and MLP gates).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl; a resumed run's repeated steps keep their latest record."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (is {run_dir} a train.py run dir?)")
    by_step = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def moving_average(values, window: int) -> np.ndarray:
    """Mean of the last `window` values at each position (fewer at the start)."""
    values = np.asarray(values, np.float64)
    cumsum = np.concatenate([[0.0], np.cumsum(values)])
    starts = np.maximum(np.arange(1, len(values) + 1) - window, 0)
    return (cumsum[1:] - cumsum[starts]) / (np.arange(1, len(values) + 1) - starts)


def plot_runs(run_dirs: list[str], out: str | Path, smooth: int = 10) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    (ax_loss, ax_eval), (ax_read, ax_gate) = axes
    for run in run_dirs:
        records = read_metrics(run)
        name = Path(run).name
        trained = [r for r in records if "loss" in r]  # an eval-only record (step 0) has no training loss
        ax_loss.plot([r["step"] for r in trained], moving_average([r["loss"] for r in trained], smooth), label=name)
        evals = [r for r in records if "eval_loss" in r]
        if evals:
            x = [r["step"] for r in evals]
            ax_eval.plot(x, [r["eval_loss"] for r in evals], "o-", label=f"{name}: eval loss")
            ax_eval.plot(x, [r["eval_f1_target"] for r in evals], "s--", label=f"{name}: F1 vs targets")
            ax_eval.plot(x, [r["eval_f1"] for r in evals], "^:", label=f"{name}: F1 vs gold")
            for key, style, label in (("eval_contain", "o-", "containment"), ("eval_gap_closed", "s--", "gap closed"),
                                      ("eval_reading_gap_closed", "^:", "gap closed by the right chunks")):
                points = [(r["step"], r[key]) for r in evals if r.get(key) is not None]
                if points:
                    ax_read.plot(*zip(*points), style, label=f"{name}: {label}")
        for key, style in (("gate_attn", "-"), ("gate_mlp", ":")):
            points = [(r["step"], float(np.mean(np.abs(r[key])))) for r in trained if key in r]
            if points:
                ax_gate.plot(*zip(*points), style, label=f"{name}: {key}")
    ax_loss.set(xlabel="step", ylabel=f"train loss (moving average, {smooth} steps)", title="training loss")
    ax_eval.set(xlabel="step", title="held-out eval")
    ax_read.set(xlabel="step", title="reading: containment, context gap closed")
    ax_gate.set(xlabel="step", ylabel="mean |tanh(gate)|", title="cross-block gates")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(prog="python -m comb_jax.training.curves", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="train.py run dirs")
    ap.add_argument("--out", default="training_curves.png")
    ap.add_argument("--smooth", type=int, default=10, help="moving-average window of the training loss")
    args = ap.parse_args(argv)
    out = plot_runs(args.runs, args.out, args.smooth)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()

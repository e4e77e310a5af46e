"""One reading table from several eval runs over the same requests (a baseline run of the backbone's modes, made
once, and a run per Comb checkpoint):

    python -m comb_jax.eval.join runs/eval_base runs/eval_comb [--out runs/table.md]

Each argument is an eval `--out` directory (one dataset, or several as OUT/NAME/). Rows are matched by (dataset,
request id, pass); every mode's answer is scored against the full prompt's answer to the same request (F1 vs full),
so that a checkpoint's run need not recompute the backbone's modes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from comb_jax.eval.metrics import qa_f1

COLUMNS = ["contain original", "contain shuffled", "F1 vs gold", "F1 vs full's answer", "same answer both orders"]


def _datasets(run: Path) -> dict[str, Path]:
    """dataset name -> its directory (the run itself when it holds one dataset)."""
    if (run / "requests.jsonl").is_file():
        return {json.loads((run / "results.json").read_text())["dataset"]: run}
    return {d.name: d for d in sorted(run.iterdir()) if (d / "requests.jsonl").is_file()}


def _mean(values) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def join_runs(runs: list[Path]) -> dict:
    """{dataset: {"requests": n, "modes": {label: {column: value}}}} over the requests every mode answered."""
    rows: dict[str, list[tuple[str, dict]]] = {}
    for run in runs:
        for dataset, where in _datasets(Path(run)).items():
            for line in (where / "requests.jsonl").read_text().splitlines():
                r = json.loads(line)
                label = r["mode"] if r["mode"] != "comb" else f"comb ({Path(run).name})"
                rows.setdefault(dataset, []).append((label, r))
    table = {}
    for dataset, labelled in rows.items():
        by_mode: dict[str, dict] = {}
        for label, r in labelled:
            by_mode.setdefault(label, {})[r["id"], r["pass"]] = r
        common = set.intersection(*(set(v) for v in by_mode.values()))
        full = by_mode.get("full", {})
        modes = {}
        for label, answers in by_mode.items():
            mine = [answers[k] for k in sorted(common)]
            first = {r["id"]: r["answer"] for r in mine if r["pass"] == "original"}
            modes[label] = {
                "contain original": _mean([r["contain"] for r in mine if r["pass"] == "original"]),
                "contain shuffled": _mean([r["contain"] for r in mine if r["pass"] == "shuffled"]),
                "F1 vs gold": _mean([r["score"] for r in mine]),
                "F1 vs full's answer": _mean([qa_f1(r["answer"], [full[r["id"], r["pass"]]["answer"]]) for r in mine])
                if full else None,
                "same answer both orders": _mean([float(r["answer"] == first[r["id"]]) for r in mine
                                                  if r["pass"] == "shuffled" and r["id"] in first]),
            }
        table[dataset] = {"requests": len({k[0] for k in common}), "modes": modes}
    return table


def markdown(table: dict) -> str:
    lines = ["| set | requests | mode | " + " | ".join(COLUMNS) + " |", "|" + "---|" * (3 + len(COLUMNS))]
    for dataset, t in table.items():
        for label, s in t["modes"].items():
            cells = ["" if s[c] is None else f"{s[c]:g}" for c in COLUMNS]
            lines.append(f"| {dataset} | {t['requests']} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m comb_jax.eval.join", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="eval --out directories over the same requests")
    ap.add_argument("--out", default="", help="also write the Markdown table here")
    args = ap.parse_args(argv)
    text = markdown(join_runs([Path(r) for r in args.runs]))
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()

"""The GPU section of bench/RESULTS.md from bench/results/gpu-*.json (what bench/gpu.sh wrote).

    python bench/gpu_report.py [--results-dir bench/results] [--results-md bench/RESULTS.md] [--failed STEP ...]

Replaces the section under SECTION (or appends it). Missing results are listed as not run; the server-load JSON is
taken from its log (bench/server_load.py --no-write prints it) and saved as gpu-server_load.json.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

SECTION = "## GPU benchmarks (`bench/gpu.sh`)"
GB, MIB = 1e9, 2 ** 20


def load(results: Path, name: str):
    path = results / f"gpu-{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def server_load_json(results: Path):
    """The last top-level JSON object printed in gpu-logs/server_load.log, saved as gpu-server_load.json."""
    log = results / "gpu-logs" / "server_load.log"
    if not log.is_file():
        return load(results, "server_load")
    text = log.read_text()
    starts = [m.start() for m in re.finditer(r"^\{", text, re.M)]
    for start in reversed(starts):
        try:
            value, _ = json.JSONDecoder().raw_decode(text[start:])
        except ValueError:
            continue
        (results / "gpu-server_load.json").write_text(json.dumps(value, indent=2) + "\n")
        return value
    return None


def section(results: Path, failed: list[str]) -> str:
    out = [SECTION, "", "Command: `make bench-gpu` (`bash bench/gpu.sh`); random weights, llama8b_comb shapes, one "
           "GPU. Ratios are measured side by side in one run on the same device.", ""]
    if failed:
        out += [f"Failed steps (see bench/results/gpu-logs/): {', '.join(failed)}", ""]
    plan = load(results, "memory_plan")
    if plan:
        out += [f"### Memory plan (`serve.py --dry-run --config {plan['config']}`, "
                f"{plan['device_bytes'] / GB:.0f} GB)", "", "| part | GB | what |", "|---|---:|---|"]
        out += [f"| {x['name']} | {x['bytes'] / GB:.2f} | {x['detail']} |" for x in plan["lines"]]
        out += [f"| total | {plan['total_bytes'] / GB:.2f} | {'fits' if plan['fits'] else 'does not fit'} |", ""]
    ttft = load(results, "ttft")
    if ttft:
        out += [f"### Time to first token ({ttft['device']})", "", "| context | TTFT hit (ms) | TTFT full (ms) | "
                "hit / full |", "|---:|---:|---:|---:|"]
        out += [f"| {r['context_tokens']} | {r['ttft_hit_s'] * 1e3:.1f} | {r['ttft_full_s'] * 1e3:.1f} | "
                f"{r['hit_to_full']:.3f} |" for r in ttft["ttft"]]
        out.append("")
    decode = load(results, "decode")
    if decode:
        out += [f"### Decode throughput, Comb against the full prompt ({decode['device']}, {decode['compute_dtype']}, "
                f"{decode['steps']} steps)", "", "| context | batch | Comb tokens/s | full tokens/s | Comb / full | "
                "MiB read per token Comb / full | full / Comb bytes |", "|---:|---:|---:|---:|---:|---|---:|"]
        out += [f"| {r['context_tokens']} | {r['batch']} | {r['comb']['tokens_per_s']:.1f} | "
                f"{r['full']['tokens_per_s']:.1f} | {r['speedup']:.2f}x | "
                f"{r['comb']['bytes_per_token']['total'] / MIB:.1f} / {r['full']['bytes_per_token']['total'] / MIB:.1f}"
                f" | {r['bytes_ratio']:.2f}x |" for r in decode["rows"]]
        out.append("")
    attention = load(results, "attention")
    if attention:
        out += [f"### Full prefill of {attention['tokens']} tokens by attention implementation ({attention['device']})",
                "", "| attention | prefill (s) | tokens/s | XLA scratch (MiB) |", "|---|---:|---:|---:|"]
        out += [f"| {r['impl']} | {r['prefill_s']:.3f} | {r['tokens_per_s']:.0f} | {r['temp_bytes'] / MIB:.0f} |"
                for r in attention["rows"]]
        out.append("")
    train = load(results, "train_throughput")
    if train:
        out += ["### Train step throughput", "", "| config | device | step (s) | tokens/s | TFLOP/s | MFU |",
                "|---|---|---:|---:|---:|---:|"]
        for r in train:
            tf = f"{r['tflops_per_s']:.1f}" if r.get("tflops_per_s") else "-"
            mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "-"
            out.append(f"| {r['config']} | {r['device']} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {tf} | "
                       f"{mfu} |")
        out.append("")
    load_test = server_load_json(results)
    if load_test is not None:
        out += ["### HTTP server under load (`bench/server_load.py`)", "", "```json",
                json.dumps(load_test, indent=1)[:4000], "```", ""]
    missing = [n for n, v in (("memory_plan", plan), ("ttft", ttft), ("decode", decode), ("attention", attention),
                              ("train_throughput", train), ("server_load", load_test)) if v is None]
    if missing:
        out += [f"Not run or no result: {', '.join(missing)}.", ""]
    return "\n".join(out)


def write_section(md: Path, text: str):
    """Replace the section (up to the next `## ` heading) or append it."""
    old = md.read_text() if md.is_file() else ""
    start = old.find(SECTION)
    if start < 0:
        md.write_text(old.rstrip() + "\n\n" + text.rstrip() + "\n")
        return
    nxt = old.find("\n## ", start + len(SECTION))
    rest = "" if nxt < 0 else "\n" + old[nxt + 1:]
    md.write_text(old[:start] + text.rstrip() + "\n" + rest)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results-dir", default="bench/results")
    ap.add_argument("--results-md", default="bench/RESULTS.md")
    ap.add_argument("--failed", nargs="*", default=[])
    args = ap.parse_args(argv)
    text = section(Path(args.results_dir), args.failed)
    write_section(Path(args.results_md), text)
    print(text)


if __name__ == "__main__":
    main()

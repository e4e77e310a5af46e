"""`python -m comb_jax.shipped`: ship a trained Comb checkpoint inside the package (`weights.shipped`).

    python -m comb_jax.shipped --config smollm2_comb --checkpoint runs/mine --command "python train.py ..." \
        [--metrics runs/eval/results.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from comb_jax.config import load_config
from comb_jax.weights.fingerprint import tree_fingerprint
from comb_jax.weights.resolve import load_backbone
from comb_jax.weights.run_dir import restore_comb_params
from comb_jax.weights.shipped import SHIPPED_ROOT, WEIGHTS_FILE, save_shipped


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m comb_jax.shipped", description="Ship a trained Comb checkpoint.")
    ap.add_argument("--config", required=True)
    ap.add_argument("--checkpoint", required=True, help="run dir, checkpoints dir or step dir")
    ap.add_argument("--command", required=True, help="the exact command that trained it")
    ap.add_argument("--metrics", default="", help="a JSON file of measured metrics to put in the card")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    comb = restore_comb_params(args.checkpoint, cfg)
    metrics = json.loads(Path(args.metrics).read_text()) if args.metrics else {}
    out = save_shipped(comb, cfg, SHIPPED_ROOT / cfg.name, command=args.command, metrics=metrics,
                       backbone_fingerprint=tree_fingerprint(load_backbone(cfg)), source=args.checkpoint)
    print(f"shipped {out} ({(out / WEIGHTS_FILE).stat().st_size / 2**20:.1f} MiB)")

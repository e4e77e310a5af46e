"""Train Comb: `python train.py --config NAME [key=value ...] [--resume] [--dry-run]`.

--dry-run lowers and compiles the train step with abstract arrays on a simulated 8-device CPU mesh (no
weights are loaded) and prints parameter counts and XLA's per-device memory; with the multi-host flags, each of
the processes simulates --devices devices and they compile the step for the mesh over all of them. The logic lives in
comb_jax.training.trainer. A usage error (unknown config or key, bad value, missing path, corrupt checkpoints) prints
one line and exits with status 2; a diverged run exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import sys

from comb_jax import distributed
from comb_jax.config import load_config
from comb_jax.errors import Parser
from comb_jax.eval.in_training import make_evaluator
from comb_jax.training import trainer


def parse_args(argv=None):
    parser = Parser(prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="comb_jax/configs/NAME.py, e.g. tiny_comb, smollm2_comb")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides (e.g. steps=20 batch_size=4)")
    parser.add_argument("--resume", action="store_true", help="continue from the run dir's latest checkpoint")
    parser.add_argument("--dry-run", action="store_true", help="compile the train step abstractly and exit")
    parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices for --dry-run")
    distributed.add_arguments(parser)
    return parser.parse_args(argv)


def train(cfg, **kwargs) -> dict:
    """`training.trainer.train` with its eval hook wired: the held-out metrics of `cfg`'s objective."""
    return trainer.train(cfg, evaluate=make_evaluator(cfg), **kwargs)


def main(argv=None) -> int:
    args = parse_args(argv)  # --dry-run's simulated devices were set by train.py (cli.devices) before jax loaded
    if not args.dry_run or args.coordinator:  # first: before anything touches a device
        distributed.initialize_from(args, "train.py")  # a --dry-run joins only the processes it is told to
    cfg = load_config(args.config, args.overrides)  # a ConfigError becomes one line and status 2 (see errors.run)
    if args.dry_run:
        report = trainer.dry_run(cfg)
        if distributed.is_primary():
            print(json.dumps(report, indent=2))
        return 0
    try:
        summary = train(cfg, resume=args.resume)
    except trainer.TrainingDiverged as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 1
    if not distributed.is_primary():
        return 0
    ev = summary["last_eval"] or {}
    print(json.dumps({"steps": [summary["start_step"], summary["end_step"]], "run_dir": summary["run_dir"],
                      "final_loss": summary.get("losses", [None])[-1], "eval_loss": ev.get("eval_loss"),
                      "eval_f1": ev.get("eval_f1"), "eval_f1_vs_targets": ev.get("eval_f1_target")}))
    return 0

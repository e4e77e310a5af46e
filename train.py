"""Train Comb: `python train.py --config NAME [key=value ...] [--resume] [--dry-run]`.

--dry-run lowers and compiles the train step with abstract arrays on a simulated 8-device CPU mesh (no
weights are loaded) and prints parameter counts and XLA's per-device memory. The logic lives in
comb_jax.training.trainer. A usage error (unknown config or key, bad value, missing path, corrupt checkpoints) prints
one line and exits with status 2; a diverged run exits with status 1.
"""

import argparse
import json
import os
import sys

from comb_jax.cli import Parser, run  # argparse only: jax is imported after --dry-run has set XLA_FLAGS


def main(argv=None) -> int:
    parser = Parser(prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="configs/NAME.py, e.g. tiny_comb, smollm2_comb")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides (e.g. steps=20 batch_size=4)")
    parser.add_argument("--resume", action="store_true", help="continue from the run dir's latest checkpoint")
    parser.add_argument("--dry-run", action="store_true", help="compile the train step abstractly and exit")
    parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices for --dry-run")
    args = parser.parse_args(argv)
    if args.dry_run:  # must happen before jax is imported
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={args.devices}").strip()
        os.environ["JAX_PLATFORMS"] = "cpu"

    from comb_jax.config import load_config
    from comb_jax.training.trainer import TrainingDiverged, dry_run, train

    cfg = load_config(args.config, args.overrides)  # a ConfigError becomes one line and status 2 (see cli.run)
    if args.dry_run:
        print(json.dumps(dry_run(cfg), indent=2))
        return 0
    try:
        summary = train(cfg, resume=args.resume)
    except TrainingDiverged as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 1
    ev = summary["last_eval"] or {}
    print(json.dumps({"steps": [summary["start_step"], summary["end_step"]], "run_dir": summary["run_dir"],
                      "final_loss": summary.get("losses", [None])[-1], "eval_loss": ev.get("eval_loss"),
                      "eval_f1": ev.get("eval_f1"), "eval_f1_vs_targets": ev.get("eval_f1_target")}))
    return 0


if __name__ == "__main__":
    sys.exit(run(main, "train.py"))

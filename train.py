"""Train Comb: `python train.py --config NAME [key=value ...] [--resume] [--dry-run]` (see comb_jax/cli/train.py)."""

import sys

from comb_jax.cli.devices import simulate_devices

if __name__ == "__main__":
    simulate_devices(sys.argv[1:])  # before jax is imported: --dry-run's simulated CPU mesh

from comb_jax.cli.train import main  # noqa: E402
from comb_jax.errors import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run(main, "train.py"))

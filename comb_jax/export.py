"""`python -m comb_jax.export`: the export command line (comb_jax/cli/export.py); the format is
`comb_jax.weights.release`."""

import sys

from comb_jax.cli.export import main
from comb_jax.errors import run

if __name__ == "__main__":
    sys.exit(0 if run(main, "python -m comb_jax.export") else 1)

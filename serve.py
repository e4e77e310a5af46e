"""Serve Comb: a JSONL batch, the built-in demo, or the OpenAI-compatible HTTP server (see comb_jax/cli/serve.py).

    python serve.py [--config smollm2_pointer] [--checkpoint RUN_DIR] --input requests.jsonl --output results.jsonl
    python serve.py --http --config smollm2_comb --port 8000
"""

import sys

from comb_jax.cli.serve import main
from comb_jax.errors import run

if __name__ == "__main__":
    sys.exit(run(main, "serve.py"))

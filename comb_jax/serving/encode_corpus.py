"""Encode a corpus into the persistent PICache store ahead of serving.

    python -m comb_jax.serving.encode_corpus --config smollm2_comb --input docs.jsonl \\
        [--checkpoint DIR] [--store-dir DIR]

docs.jsonl: one document per line, a JSON string or {"id", "text"}. A server started afterwards with the same
model, tokenizer and --store-dir (`serve.py --http`) serves these documents from disk without encoding them.
Prints a JSON summary (documents, newly encoded, already stored, document ids).
"""

from __future__ import annotations

import argparse
import json
import sys

from comb_jax.config import load_config
from comb_jax.errors import Parser, run
from comb_jax.serving.app import DEFAULT_STORE_DIR, build_server
from comb_jax.serving.corpus import encode_corpus, read_corpus
from comb_jax.serving.store import check_store_dir
from comb_jax.text.codec import make_codec
from comb_jax.weights.resolve import load_model


def main(argv=None) -> int:
    ap = Parser(prog="python -m comb_jax.serving.encode_corpus", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="smollm2_pointer")
    ap.add_argument("--input", required=True, help="documents JSONL")
    ap.add_argument("--checkpoint", default=None, help="as for serve.py")
    ap.add_argument("--store-dir", default=str(DEFAULT_STORE_DIR), help="the PICache store directory")
    ap.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    documents = read_corpus(args.input)  # before the model loads: a bad file fails at once
    check_store_dir(args.store_dir)
    cfg, params = load_model(cfg, args.checkpoint)
    _, scheduler = build_server(cfg, params, make_codec(cfg), store_dir=args.store_dir)
    try:
        summary = encode_corpus(scheduler, documents)
    finally:
        scheduler.store.close()
    print(json.dumps({**summary, "store_dir": args.store_dir, "config": cfg.name}))
    return 0


if __name__ == "__main__":
    sys.exit(run(main, "python -m comb_jax.serving.encode_corpus"))

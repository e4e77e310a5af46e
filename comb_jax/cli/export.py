"""`python -m comb_jax.export`: write a Comb (or plain Llama) directory in the release's Hugging Face layout.

    python -m comb_jax.export --config smollm2_comb --checkpoint runs/mine --out export/comb   # [--dtype bfloat16]
    python -m comb_jax.export --config smollm2_comb --decoder-only --out export/smollm2

The format is `weights.release`; this module parses, loads through `weights.resolve.load_model` and writes.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from comb_jax import distributed
from comb_jax.config import load_config
from comb_jax.errors import Parser
from comb_jax.text.tokenizer import load_tokenizer
from comb_jax.weights import release
from comb_jax.weights.release import (
    DTYPES,
    check_output_dir,
    check_release_compatible,
    export_comb,
    export_llama,
    parse_size,
)
from comb_jax.weights.resolve import load_backbone, load_model

log = logging.getLogger("comb_jax.export")


def main(argv=None) -> dict:
    parser = Parser(prog="python -m comb_jax.export", description=release.__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="config name in comb_jax/configs/")
    parser.add_argument("--checkpoint", help="Orbax checkpoint directory of train.py (default: fresh comb params)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--decoder-only", action="store_true", help="write a plain LlamaForCausalLM directory")
    parser.add_argument("--max-shard-size", default="2GB", help="shard above this size (e.g. 2GB, 500MB)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out directory")
    parser.add_argument("overrides", nargs="*", help="config key=value overrides")
    distributed.add_arguments(parser)
    args = parser.parse_args(argv)
    distributed.initialize_from(args, parser.prog)  # first: before anything touches a device
    if not distributed.is_primary():  # a host program: the primary writes the export, the others wait for it
        distributed.barrier("comb_jax.export.done")
        return {}
    try:
        return _export(args)
    finally:
        distributed.barrier("comb_jax.export.done")


def _export(args) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parse_size(args.max_shard_size)  # fail before loading weights
    check_output_dir(Path(args.out).absolute(), args.overwrite)

    start = time.time()
    cfg = load_config(args.config, args.overrides)
    if not args.decoder_only:
        check_release_compatible(cfg.model)
    if args.decoder_only:
        if args.checkpoint:
            log.warning("--decoder-only exports the frozen backbone from cfg.weights; the checkpoint is not read")
        params = {"backbone": load_backbone(cfg)}
    else:
        cfg, params = load_model(cfg, args.checkpoint)
    tokenizer = load_tokenizer(cfg) if cfg.weights.source != "random" else None
    if args.decoder_only:
        files = export_llama(cfg.model, params, args.out, args.dtype, args.max_shard_size, tokenizer,
                             overwrite=args.overwrite)
    else:
        files = export_comb(cfg.model, params, args.out, args.dtype, args.max_shard_size, tokenizer, cfg.name,
                            overwrite=args.overwrite)
    summary = {
        "out": str(args.out), "kind": "llama" if args.decoder_only else "combllama", "dtype": args.dtype,
        "files": files, "bytes": sum((Path(args.out) / f).stat().st_size for f in files),
        "tokenizer": tokenizer is not None, "seconds": round(time.time() - start, 2),
    }
    print(json.dumps(summary))
    return summary

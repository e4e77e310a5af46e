"""One process of a simulated multi-host training run (tests/test_multihost.py starts several).

`python tests/multihost_worker.py '{"process_id": I, "num_processes": N, "port": P, "run_dir": ..., "out": ...,
"overrides": [...], "resume": false, "stop_after": null}'`: trains tiny_comb on the toy examples and, on the
primary, writes the losses and the trainable parameters (gathered from every process) to `out`. Every process
writes `out.process{I}.json`: the step it started from and the example indices its rows of the first epoch hold.
"""

import json
import sys

import jax
import numpy as np
from train_helpers import checkpointed_run_cfg, toy_examples

from comb_jax import distributed
from comb_jax.config import apply_overrides, load_config
from comb_jax.model.sharding import make_mesh
from comb_jax.training import trainer
from comb_jax.training.data import Example, batch_indices

NUM_EXAMPLES = 16


def examples(n: int) -> list[Example]:
    """Toy examples, every third with a long first chunk: the processes' rows pick different length buckets."""
    out = toy_examples(n)
    for i in range(0, n, 3):
        e = out[i]
        out[i] = Example(e.id, (e.chunks[0] + " It is known far and wide, every day.", e.chunks[1]), e.question,
                         e.answer, e.golds)
    return out


def main(args: dict) -> None:
    if args["num_processes"] > 1:
        distributed.initialize(f"127.0.0.1:{args['port']}", args["num_processes"], args["process_id"], timeout_s=60)
    cfg = checkpointed_run_cfg(load_config("tiny_comb"), args["run_dir"], args.get("steps", 4), 5)
    cfg = apply_overrides(cfg, ["mesh.data=-1", "train.max_chunk_tokens=64", "train.chunk_buckets=(32,64)",
                                *args.get("overrides", [])])
    summary = trainer.train(cfg, resume=args.get("resume", False), progress=False, stop_after=args.get("stop_after"),
                            examples=(examples(NUM_EXAMPLES), examples(4)))
    tc = cfg.train
    rows = trainer.process_rows(make_mesh(cfg.mesh), tc.batch_size)
    epoch = batch_indices(NUM_EXAMPLES, tc, tc.seed, rows)
    with open(f"{args['out']}.process{jax.process_index()}.json", "w") as f:
        json.dump({"start_step": summary["start_step"], "rows": [rows.start, rows.stop],
                   "epoch_indices": [epoch[i].tolist() for i in range(NUM_EXAMPLES // tc.batch_size)]}, f)
    comb = distributed.host_copy(summary["state"].comb)
    if distributed.is_primary():
        flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
                for path, v in jax.tree_util.tree_flatten_with_path(comb)[0]}
        np.savez(args["out"] + ".npz", **flat)
        with open(args["out"] + ".json", "w") as f:
            json.dump({"losses": summary.get("losses", []), "start_step": summary["start_step"],
                       "end_step": summary["end_step"], "devices": jax.device_count(),
                       "processes": jax.process_count()}, f)
    distributed.barrier("worker.done")


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))

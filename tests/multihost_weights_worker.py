"""One process of a simulated multi-host weight load (tests/test_multihost.py starts several).

`python tests/multihost_weights_worker.py '{"process_id": I, "num_processes": N, "port": P, "weights": DIR,
"out": ...}'`: reads the tiny Llama in DIR onto a (fsdp 2, tensor 2) mesh as a multi-process run does, counting the
elements it reads; checks its shards against the whole file; computes the backbone's fingerprint; asks the sharded
backbone and the host copy for teacher answers. Writes `out.process{I}.json`.
"""

import json
import sys

import jax
import numpy as np
from train_helpers import toy_examples

from comb_jax import distributed
from comb_jax.config import apply_overrides, load_config
from comb_jax.model.sharding import make_mesh
from comb_jax.text.codec import Codec
from comb_jax.training import trainer
from comb_jax.training.data import teacher_targets
from comb_jax.weights import hf
from comb_jax.weights.fingerprint import tree_fingerprint
from comb_jax.weights.resolve import load_backbone


def main(args: dict) -> None:
    if args["num_processes"] > 1:
        distributed.initialize(f"127.0.0.1:{args['port']}", args["num_processes"], args["process_id"], timeout_s=60)
    cfg = apply_overrides(load_config("tiny_comb"), ["weights.source=hf", f"weights.path={args['weights']}",
                                                     "mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2",
                                                     "batch_size=4", "teacher_max_tokens=4"])
    read = [0]
    original = hf.SafetensorsDir.read_slice

    def counting(self, name, index):
        block = original(self, name, index)
        read[0] += block.size
        return block

    hf.SafetensorsDir.read_slice = counting
    mesh = make_mesh(cfg.mesh)
    backbone, host = trainer.load_placed_backbone(cfg, mesh)
    hf.SafetensorsDir.read_slice = original
    whole = load_backbone(cfg)  # the reference: every tensor read whole
    mismatched = []
    for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(backbone)[0], jax.tree.leaves(whole)):
        for shard in got.addressable_shards:
            if not np.array_equal(np.asarray(shard.data), np.asarray(want, np.float32)[shard.index]):
                mismatched.append(jax.tree_util.keystr(path))
    examples = toy_examples(6)
    codec = Codec(None)
    run = args["out"] + ".teacher"
    from_shards = teacher_targets(examples, {"backbone": backbone}, cfg, codec, f"{run}_sharded.jsonl", progress=False)
    from_host = teacher_targets(examples, {"backbone": whole}, cfg, codec, f"{run}_host.jsonl", progress=False)
    with open(f"{args['out']}.process{jax.process_index()}.json", "w") as f:
        json.dump({"host_copy": host is not None, "read": read[0], "mismatched": mismatched,
                   "total": sum(int(np.size(a)) for a in jax.tree.leaves(whole)),
                   "fingerprint_sharded": tree_fingerprint(backbone),
                   "fingerprint_whole": tree_fingerprint(jax.tree.map(lambda a: np.asarray(a, np.float32), whole)),
                   "answers_sharded": [e.answer for e in from_shards], "answers_host": [e.answer for e in from_host]},
                  f)
    distributed.barrier("weights_worker.done")


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))

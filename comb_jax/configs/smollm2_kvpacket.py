"""KV Packet (issue 15) on SmolLM2-135M-Instruct: no Comb blocks are trained or used; the trainer distils an 8-token
trailer adapter (`params["kvpacket"]`, comb_jax/eval/kvpacket.py) from the full prompt. Serve it with the eval's
`--modes kvpacket --kvpacket RUN_DIR`."""

import dataclasses

from comb_jax.config import load_config


def config():
    base = load_config("smollm2_comb")
    return dataclasses.replace(
        base, name="smollm2_kvpacket",
        train=dataclasses.replace(base.train, objective="kvpacket", kvpacket_tokens=8, targets="gold",
                                  learning_rate=5e-3, warmup_steps=3, batch_size=4, steps=100, eval_every=25,
                                  eval_examples=16, checkpoint_every=5, max_chunk_tokens=192,
                                  chunk_buckets=(64, 128, 192), decoder_buckets=(48, 96),
                                  run_dir="runs/smollm2_kvpacket"),
    )

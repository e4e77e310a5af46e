"""SmolLM2-135M-Instruct with one pointer-initialised cross block (before layer 29): the first Comb that reads its
chunks (issue 11; docs/RESULTS.md). Its trained weights ship in comb_jax/shipped_models/smollm2_pointer/."""

import dataclasses

from comb_jax.config import load_config


def config():
    base = load_config("smollm2_comb")
    return dataclasses.replace(
        base, name="smollm2_pointer",
        model=dataclasses.replace(base.model, num_cross_layers=1),
        train=dataclasses.replace(base.train, init="pointer", learning_rate=1e-3, warmup_steps=10,
                                  gate_mlp_lr_multiplier=0.0, run_dir="runs/smollm2_pointer"),
    )

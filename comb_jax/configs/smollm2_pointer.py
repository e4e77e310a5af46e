"""SmolLM2-135M-Instruct with one pointer-initialised cross block (before layer 29): the first Comb that reads its
chunks (issue 11), with a context path from the backbone's layer-12 states of each chunk token into its PICache
keys and values (issue 20: it picks the asked entity's fact among same-kind facts; docs/RESULTS.md). Its trained
weights ship in comb_jax/shipped_models/smollm2_pointer/."""

import dataclasses

from comb_jax.config import load_config


def config():
    base = load_config("smollm2_comb")
    return dataclasses.replace(
        base, name="smollm2_pointer",
        model=dataclasses.replace(base.model, num_cross_layers=1, context_layer=12),
        train=dataclasses.replace(base.train, init="pointer", learning_rate=1e-3, warmup_steps=10,
                                  gate_mlp_lr_multiplier=0.0, run_dir="runs/smollm2_pointer"),
    )

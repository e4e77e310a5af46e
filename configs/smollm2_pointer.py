"""SmolLM2-135M-Instruct with one pointer-initialised cross block (before layer 29): the first Comb that reads its
chunks (issue 11; docs/RESULTS.md). Its trained weights ship in comb_jax/shipped_models/smollm2_pointer/."""

import dataclasses
import importlib.util
from pathlib import Path


def _smollm2_comb():
    path = Path(__file__).with_name("smollm2_comb.py")  # configs/ is not a package: load the sibling by path
    spec = importlib.util.spec_from_file_location("comb_configs.smollm2_comb", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.config()


def config():
    base = _smollm2_comb()
    return dataclasses.replace(
        base, name="smollm2_pointer",
        model=dataclasses.replace(base.model, num_cross_layers=1),
        train=dataclasses.replace(base.train, init="pointer", learning_rate=1e-3, warmup_steps=10,
                                  gate_mlp_lr_multiplier=0.0, run_dir="runs/smollm2_pointer"),
    )

"""Training the trainable subtree (Comb's encoder and cross blocks, or the KV Packet adapter) on a frozen backbone.

- `trainer`: the optimizer, the sharded train step and the training loop; its eval is a hook its caller wires
  (`cli.train`: `eval.in_training`).
- `objectives`: what a run optimises, as `Objective` values (answer loss, K/V distillation, KV Packet).
- `data`: examples, teacher targets, the grain pipeline; `kvpacket_data`: KV Packet's batches.
- `needles`: reading data sets built from the shared data (`python -m comb_jax.training.needles`).
- `warm_start`: initialisers of the trainable subtree from the backbone.
- `checkpoint`: saving and resuming a run's Orbax checkpoints (reading them back is `weights.run_dir`).
- `curves`: plots of runs' `metrics.jsonl` (`python -m comb_jax.training.curves`).

Builds on `methods`, `text`, `weights` and `model`; never on `serving` or `eval`.
"""

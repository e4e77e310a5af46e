"""Training the trainable subtree (Comb's encoder and cross blocks, or the KV Packet adapter) on a frozen backbone.

- `trainer`: losses, the sharded train step and the training loop (`train.py` is its thin command line).
- `data`: examples, the `Codec` (text <-> ids, also used by serving and eval), teacher targets, the grain pipeline.
- `needles`: reading data sets built from the shared data (`python -m comb_jax.training.needles`).
- `warm_start`: initialisers of the trainable subtree from the backbone.
- `checkpoint`: Orbax checkpoints of a run, and `load_model` / `load_params`, which serving and eval load from.
- `curves`: plots of runs' `metrics.jsonl` (`python -m comb_jax.training.curves`).

Builds on `model`; the trainer's periodic eval and the KV Packet objective come from `eval`.
"""

"""Evaluation: ways of answering a request with reused caches, side by side, and the metrics that score them.

- `harness`: the side-by-side eval (`python -m comb_jax.eval`): answer quality, TTFT, cache memory, hit rate.
- `pic_modes`: the baseline PIC modes (prefix, naive, rerotate, EPIC, KV Packet) next to Comb, on the serving pool.
- `kvpacket`: the KV Packet reuse method (trained by `training.trainer`, served by `pic_modes`).
- `metrics`: QA F1, answer containment and Rouge-L (the server's Prometheus metrics are `serving.metrics`).

Builds on `model`, on `serving`'s page pool (every mode's chunk caches live in it) and on `training`'s data
(`Codec`, examples) and checkpoints; the trainer in turn calls back into `harness` and `kvpacket`.
"""

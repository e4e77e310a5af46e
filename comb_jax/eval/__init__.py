"""Evaluation: ways of answering a request with reused caches, side by side, and the metrics that score them.

- `harness`: the side-by-side eval (`python -m comb_jax.eval`): answer quality, TTFT, cache memory, hit rate.
- `pic_modes`: the baseline PIC modes (prefix, naive, rerotate, EPIC, KV Packet) next to Comb, on the serving pool.
- `kvpacket`: KV Packet's held-out reading NLLs (the method is `methods.kvpacket`).
- `in_training`: the trainer's eval hook (`cli.train` wires it).
- `metrics`: QA F1, answer containment and Rouge-L (the server's Prometheus metrics are `serving.metrics`).

Builds on everything below it: `serving`'s page pool (every mode's chunk caches live in it), `training`'s data and
objectives, `methods`, `text`, `weights`, `model`. Nothing but `cli` imports it.
"""

"""PIC methods: how a chunk's reusable cache is computed and read, as pure functions over the model.

- `comb`: Comb's PICache processor (the encoder on each chunk alone) and a batch of chunks as one PICache.
- `naive`: the backbone's own KV of a chunk computed alone at position 0 (naive / rerotate / EPIC reuse).
- `kvpacket`: KV Packet (arXiv 2604.13226): each document's backbone KV followed by a trained soft-token trailer;
  its math and its distillation loss.

A processor has the signature `processor(params, tokens, mask, *, cfg, dtype) -> k, v [layers, B, L + extra, K, D]`
that `serving.pool.PagePool` stores. Builds on `model` and `config`; training, serving and eval build on it.
A new method goes here (docs/ARCHITECTURE.md says what else it needs).
"""

"""The model: Comb as pure JAX functions over one declared parameter tree, and what loads or runs it.

- `layout`: every parameter declared once (shape, logical axes, initialiser); `backbone` and `comb` subtrees.
- `transformer`: `encode` (chunk -> PICache), `forward` (decoder + gated cross blocks), `lm_logits`.
- `decode`: prefill and the jit-compiled decode loop, shared by training (teacher answers), eval and serving.
- `sharding`: logical axis -> mesh axis rules; `buckets`: static shapes for jit; `compiles`: the XLA compile counter.

Builds on `config` only; every layer above builds on it (docs/ARCHITECTURE.md). Weights I/O is `weights`, the
tokenizer `text`.
"""

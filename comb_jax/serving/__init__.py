"""Serving: the chunk-cache pool and engine, and the OpenAI-compatible server with a persistent, tiered PICache store.

- `pool`: the device page pool of chunk caches and the chunk processor; `quant`: how it stores K/V (int8 pages);
  `joint_pages`: pages close enough share one physical page.
- `engine`: batched serving (pool lookup, chunk encoding, bucketed prefill, decode loop); `memory_plan`: what a
  config takes on one device (`serve.py --dry-run`).
- `slots`: the per-slot decode state (static shapes), `prefill_rows` + `insert_rows` of a batch of admitted
  requests (`insert` of one), and one `decode_step`; `precompiled`: their executables compiled ahead of time per
  bucket, so a warm-up compiles without running prefills on zeros.
- `store`: PICache tiers below the device pool: host memory and disk (tensorstore), keyed by fingerprint + ids.
- `scheduler`: the thread that owns the device: admits every waiting request that fits, in one prefill call,
  into free slots between decode steps.
- `protocol`: request validation for HTTP and the batch mode alike (errors name the field).
- `batch`: the batch JSONL mode of serve.py; `demo`: its built-in demo batch.
- `app`: the FastAPI app (`/v1/chat/completions`, `/v1/completions`, `/v1/documents`, `/metrics`, ...).
- `metrics`: the server's Prometheus metrics (answer-quality metrics are `eval.metrics`).
- `corpus`, `encode_corpus`: offline encoding of a JSONL corpus into the store
  (`python -m comb_jax.serving.encode_corpus`).

Builds on `methods` (the chunk processors), `text` (`Codec`), `weights` (`load_model`) and `model`; never on
`training`. `serve.py` (`cli.serve`) is its thin command line.
"""

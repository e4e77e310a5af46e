"""OpenAI-compatible serving with continuous batching and a persistent, tiered PICache store.

- `slots`: the per-slot decode state (static shapes), `insert` of a prefilled request and one `decode_step`.
- `store`: PICache tiers below the device pool: host memory and disk (tensorstore), keyed by fingerprint + ids.
- `scheduler`: the thread that owns the device: admits requests into free slots between decode steps.
- `protocol`: OpenAI request parsing and validation (errors name the field).
- `app`: the FastAPI app (`/v1/chat/completions`, `/v1/completions`, `/v1/documents`, `/metrics`, ...).
- `corpus`: offline encoding of a JSONL corpus into the store (`python -m comb_jax.encode_corpus`).
"""

"""Weights: every way parameters come from or go to disk, behind one resolver.

- `resolve`: `load_model(cfg, source)` (fresh / shipped / run dir / Comb directory in the Hugging Face layout) with
  the backbone from `cfg.weights` (random / GGUF / Hugging Face directory): what serving, eval and export call.
- `hf`: Hugging Face names <-> our parameter tree, safetensors directories; `gguf`: llama.cpp files.
- `release`: Comb and Llama directories in the release's layout, written (export) and read back (import).
- `run_dir`: the comb params of a train.py run (Orbax), and the checkpoint manager training writes with.
- `shipped`: the registry of trained weights shipped in the package; `adapter`: KV Packet adapter files.

Builds on `model` (the parameter layout), `config`, `errors` and `paths`.
"""

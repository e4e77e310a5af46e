"""The one resolver: `load_model(cfg, source)` -> (cfg, {"backbone", "comb"}), whatever the weights are.

The backbone always comes from `cfg.weights` (random | gguf: a llama.cpp file, by default the embedded SmolLM2 |
hf: a Hugging Face Llama directory). The trained part comes from `source`:
- None or "": the Comb the package ships for this config (`shipped`), else fresh;
- "none": fresh comb params (gates 0: the model answers exactly like its backbone and ignores the chunks);
- a Comb directory in the Hugging Face layout (an export, or the release's own): its own model config, weights
  and, when it holds one, its tokenizer (`release.import_comb`);
- a train.py run dir, its checkpoints dir or one step dir (`run_dir.restore_comb_params`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from comb_jax.config import WeightsConfig, validate
from comb_jax.errors import CheckpointError
from comb_jax.model.layout import init_params, model_layout
from comb_jax.weights import shipped
from comb_jax.weights.gguf import load_gguf_backbone
from comb_jax.weights.hf import load_hf_backbone
from comb_jax.weights.release import import_comb
from comb_jax.weights.run_dir import restore_comb_params

log = logging.getLogger("comb_jax.weights.resolve")


def load_backbone(cfg, dtype=np.float32):
    """Backbone params for a Config: from `weights.source` (random | gguf | hf)."""
    w = cfg.weights
    if w.source == "gguf":
        return load_gguf_backbone(w.path, cfg.model, dtype)
    if w.source == "hf":
        if not w.path:
            raise FileNotFoundError(
                f"config {cfg.name} needs a Hugging Face Llama directory: pass weights.path=/path/to/model "
                "(with config.json and *.safetensors)")
        return load_hf_backbone(w.path, cfg.model, dtype)
    if w.source == "random":
        layout = {"backbone": model_layout(cfg.model)["backbone"]}
        return init_params(layout, jax.random.key(w.seed), dtype)["backbone"]
    raise ValueError(f"unknown weights.source {w.source!r}; valid: random, gguf, hf")


def random_comb(cfg, key) -> dict:
    """Fresh comb params: the release's N(0, 0.02) linear weights, norms 1, gates 0."""
    return init_params(model_layout(cfg.model)["comb"], key, jnp.dtype(cfg.param_dtype))


def is_comb_directory(path) -> bool:
    """A Comb model in the Hugging Face layout (config.json with model_type combllama), not an Orbax checkpoint."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == "combllama"
    except (ValueError, AttributeError):
        return False


def load_model(cfg, source: str | None):
    """(cfg, params) for `source` (see the module docstring). For a Comb directory the returned cfg carries its
    model config (shapes, context encoding, encoder embedding) and, with a tokenizer there, `weights` pointing at it,
    so the model is served the way it was trained."""
    if source and is_comb_directory(source):
        return _load_comb_directory(cfg, source)
    return cfg, {"backbone": load_backbone(cfg), "comb": _comb_params(cfg, source)}


def _comb_params(cfg, source: str | None) -> dict:
    fresh = source is not None and source.strip().lower() == "none"
    if source and not fresh:
        return restore_comb_params(source, cfg)
    path = None if fresh else shipped.shipped_dir(cfg.name)
    if path is not None:
        comb = shipped.load_shipped(cfg, path)
        log.warning("no --checkpoint: loaded the shipped Comb %s (fingerprint %s...)", path,
                    shipped.read_card(path)["fingerprint"][:16])
        return comb
    log.warning("no checkpoint: the comb parameters are freshly initialised (gates 0), so %s answers exactly "
                "like its backbone and ignores the chunks", cfg.name)
    return jax.tree.map(np.asarray, random_comb(cfg, jax.random.key(cfg.train.seed)))


def _load_comb_directory(cfg, path: str):
    model, params = import_comb(path)
    if any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        cfg = dataclasses.replace(cfg, weights=WeightsConfig(source="hf", path=str(path)))
    elif model.vocab_size != cfg.model.vocab_size:
        raise CheckpointError(f"{path} has no tokenizer and its vocabulary ({model.vocab_size}) is not the "
                              f"config's ({cfg.model.vocab_size}); add the tokenizer files")
    log.info("serving %s as its config.json says: %s context, BOS %s", path, model.context_encoding,
             "on" if model.context_bos else "off")
    return validate(dataclasses.replace(cfg, model=model)), params

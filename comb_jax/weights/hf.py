"""Hugging Face names <-> our parameter tree, and safetensors directories.

One table (`hf_names`) maps every parameter to its Hugging Face name and says how many leading axes of our
array are the PyTorch linear's input axes (PyTorch stores linear weights [out, in]; we store [in..., out...]).
Loading (HF directory or GGUF) and export (`release`) all go through it.
"""

from __future__ import annotations

import glob
import json
import math
import os
from pathlib import Path

import jax
import numpy as np
from safetensors import safe_open

from comb_jax.config import ModelConfig, RopeScaling
from comb_jax.model.layout import is_param, model_layout

# (our key inside a block, HF suffix, number of input axes or None for vectors)
LLAMA_BLOCK = (
    ("attn_norm", "input_layernorm.weight", None),
    ("wq", "self_attn.q_proj.weight", 1),
    ("wk", "self_attn.k_proj.weight", 1),
    ("wv", "self_attn.v_proj.weight", 1),
    ("wo", "self_attn.o_proj.weight", 2),
    ("mlp_norm", "post_attention_layernorm.weight", None),
    ("w_gate", "mlp.gate_proj.weight", 1),
    ("w_up", "mlp.up_proj.weight", 1),
    ("w_down", "mlp.down_proj.weight", 1),
)
CROSS_BLOCK = (
    ("attn_norm", "input_layernorm.weight", None),
    ("wq", "cross_attn.q_proj.weight", 1),
    ("wo", "cross_attn.o_proj.weight", 2),
    ("q_norm", "cross_attn.q_norm.weight", None),
    ("k_norm", "cross_attn.k_norm.weight", None),
    ("gate_attn", "cross_attn_attn_gate", None),
    ("mlp_norm", "post_attention_layernorm.weight", None),
    ("w_gate", "mlp.gate_proj.weight", 1),
    ("w_up", "mlp.up_proj.weight", 1),
    ("w_down", "mlp.down_proj.weight", 1),
    ("gate_mlp", "cross_attn_mlp_gate", None),
)


def hf_names(cfg: ModelConfig, decoder_prefix: str = "language_model.", comb: bool = True):
    """[(path tuple into our tree, HF name, input axes, stacked layer index or None)] for every tensor.

    With `decoder_prefix=""` and `comb=False` these are plain `LlamaForCausalLM` names.
    """
    names = [(("backbone", "embed"), f"{decoder_prefix}model.embed_tokens.weight", None, None)]
    for i in range(cfg.num_layers):
        for key, suffix, n_in in LLAMA_BLOCK:
            names.append((("backbone", "layers", key), f"{decoder_prefix}model.layers.{i}.{suffix}", n_in, i))
    names.append((("backbone", "final_norm"), f"{decoder_prefix}model.norm.weight", None, None))
    if not cfg.tie_embeddings:
        names.append((("backbone", "lm_head"), f"{decoder_prefix}lm_head.weight", 1, None))
    if comb and cfg.separate_encoder_embed:
        names.append((("backbone", "encoder_embed"), "chunk_model.embed_tokens.weight", None, None))
    if comb:
        for k in range(cfg.num_cross_layers):
            for key, suffix, n_in in LLAMA_BLOCK:
                names.append((("comb", "encoder", "layers", key), f"chunk_model.layers.{k}.{suffix}", n_in, k))
            names.append((("comb", "encoder", "k_proj"), f"chunk_model.k_proj.{k}.weight", 1, k))
            names.append((("comb", "encoder", "v_proj"), f"chunk_model.v_proj.{k}.weight", 1, k))
            for key, suffix, n_in in CROSS_BLOCK:
                names.append((("comb", "cross", key), f"{decoder_prefix}model.cross_layers.{k}.{suffix}", n_in, k))
    return names


def to_torch_layout(x: np.ndarray, n_in: int | None, hf_shape_1d_gate: bool = False) -> np.ndarray:
    """Our array for one layer -> the PyTorch tensor ([out, in] for linears; gates become shape [1])."""
    if n_in is None:
        return x.reshape(1) if x.ndim == 0 else x
    return x.reshape(math.prod(x.shape[:n_in]), -1).T


def from_torch_layout(t: np.ndarray, n_in: int | None, shape: tuple[int, ...], name: str) -> np.ndarray:
    """A PyTorch tensor -> our array of `shape` (one layer's slice); raises naming the tensor on mismatch."""
    if n_in is None:
        want = math.prod(shape)
        if t.size != want or (t.ndim > 1 and t.shape != shape):
            raise ValueError(f"tensor {name} has shape {tuple(t.shape)}, expected {shape}")
        return t.reshape(shape)
    expected = (math.prod(shape[n_in:]), math.prod(shape[:n_in]))
    if tuple(t.shape) != expected:
        raise ValueError(f"tensor {name} has shape {tuple(t.shape)}, expected {expected}")
    return t.T.reshape(shape)


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def tree_from_tensors(cfg: ModelConfig, get_tensor, dtype=np.float32, comb: bool = True, decoder_prefix: str = ""):
    """Build our parameter tree by reading each HF-named tensor through `get_tensor(name) -> np.ndarray`.

    Returns {"backbone": ...} (and "comb" when `comb`). Missing tensors raise KeyError naming them.
    """
    layout = model_layout(cfg)
    if not comb:
        layout = {"backbone": layout["backbone"]}
    out = jax.tree.map(lambda p: np.empty(p.shape, dtype), layout, is_leaf=is_param)
    for path, name, n_in, index in hf_names(cfg, decoder_prefix, comb):
        target = _get(out, path)
        shape = target.shape if index is None else target.shape[1:]
        value = from_torch_layout(np.asarray(get_tensor(name)), n_in, shape, name).astype(dtype)
        if index is None:
            target[...] = value
        else:
            target[index] = value
    if "encoder_embed" in out["backbone"] and not comb:  # a plain Llama has one embedding: the encoder starts there
        out["backbone"]["encoder_embed"][...] = out["backbone"]["embed"]
    return out


def tensors_from_tree(cfg: ModelConfig, params, comb: bool = True, decoder_prefix: str = "language_model."):
    """Our tree -> {HF name: np.ndarray} in PyTorch layout (the inverse of `tree_from_tensors`)."""
    tensors = {}
    for path, name, n_in, index in hf_names(cfg, decoder_prefix, comb):
        x = np.asarray(_get(params, path))
        tensors[name] = np.ascontiguousarray(to_torch_layout(x if index is None else x[index], n_in))
    return tensors


# ----------------------------------------------------------------------------------------------------------
# Hugging Face directories


def model_config_from_hf(hf: dict, num_cross_layers: int) -> ModelConfig:
    """A Hugging Face LlamaConfig dict -> ModelConfig (with the given number of cross blocks)."""
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    scaling = None
    if rope.get("rope_type", rope.get("type")) == "llama3":
        scaling = RopeScaling(
            factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_position=int(rope["original_max_position_embeddings"]),
        )
    elif rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ValueError(f"unsupported rope scaling {rope}")
    heads = hf["num_attention_heads"]
    return ModelConfig(
        vocab_size=hf["vocab_size"], hidden=hf["hidden_size"], mlp_hidden=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"], num_heads=heads, num_kv_heads=hf.get("num_key_value_heads", heads),
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, rms_eps=hf.get("rms_norm_eps", 1e-5),
        rope_theta=float(hf.get("rope_theta", rope.get("rope_theta", 10000.0))), rope_scaling=scaling,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position=hf.get("max_position_embeddings", 8192), num_cross_layers=num_cross_layers,
    )


class SafetensorsDir:
    """Lazy reader for one or sharded safetensors files in a directory (with model.safetensors.index.json)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"weights directory {self.path} does not exist")
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(glob.glob(str(self.path / "*.safetensors")))
            if not files:
                raise FileNotFoundError(f"no *.safetensors files in {self.path}")
            weight_map = {}
            for f in files:
                with safe_open(f, "numpy") as h:
                    weight_map.update({k: os.path.basename(f) for k in h.keys()})
        self.weight_map = weight_map
        self._handles = {}
        self._open = safe_open

    def __contains__(self, name):
        return name in self.weight_map

    def _handle(self, name: str):
        if name not in self.weight_map:
            raise KeyError(f"tensor {name} is missing from {self.path}")
        file = self.weight_map[name]
        if file not in self._handles:
            full = self.path / file
            if not full.is_file():
                raise FileNotFoundError(f"shard {full} (holding {name}) is missing")
            self._handles[file] = self._open(str(full), "numpy")
        return self._handles[file]

    def __call__(self, name: str) -> np.ndarray:
        return self._handle(name).get_tensor(name)

    def read_slice(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """Only the block `index` (one slice per axis) of a tensor is read from disk."""
        return self._handle(name).get_slice(name)[index]


def _leading(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(start, stop, elements per step) of the flat range that the leading slice of `index` covers in `shape`."""
    start, stop, _ = index[0].indices(shape[0]) if index else (0, 1, 1)
    return start, stop, math.prod(shape[1:])


def read_torch_block(reader, name: str, n_in: int | None, shape: tuple[int, ...], index: tuple) -> np.ndarray:
    """Our array of `shape` (one layer) restricted to `index`, reading only the rows and columns of the PyTorch
    tensor that the leading slices of its input and output axes cover (what `from_torch_layout` would return, then
    `[index]`). `reader.read_slice(name, slices)` reads a block of the stored tensor."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    if n_in is None or not shape:
        if len(shape) == 0:  # a scalar (a gate) stored with shape [1]
            return np.asarray(reader(name)).reshape(())
        return np.asarray(reader.read_slice(name, index))
    c0, c1, c_step = _leading(index[:n_in], shape[:n_in])
    r0, r1, r_step = _leading(index[n_in:], shape[n_in:])
    t = np.asarray(reader.read_slice(name, (slice(r0 * r_step, r1 * r_step), slice(c0 * c_step, c1 * c_step))))
    block = t.T.reshape(c1 - c0, *shape[1:n_in], r1 - r0, *shape[n_in + 1:])
    rest = (slice(None),) + index[1:n_in] + (slice(None),) + index[n_in + 1:]
    return block[rest]


def load_hf_backbone_sharded(path: str, cfg: ModelConfig, shardings, dtype=np.float32):
    """Backbone params from a Hugging Face Llama directory straight onto the mesh: each process reads only the
    blocks its own devices hold (safetensors slices into `jax.make_array_from_callback`), so a large backbone is
    never read whole by every host. `shardings`: the backbone's NamedSharding tree. Shapes are checked as in
    `load_hf_backbone`."""
    _check_hf_config(path, cfg)
    reader = SafetensorsDir(path)
    layout = model_layout(cfg)["backbone"]
    by_path = {}
    for tree_path, name, n_in, layer in hf_names(cfg, "", comb=False):
        by_path.setdefault(tree_path[1:], []).append((name, n_in, layer))

    def leaf(key_path, param, sharding):
        key = tuple(k.key for k in key_path)
        names = by_path[("embed",) if key == ("encoder_embed",) else key]  # a plain Llama's encoder starts there

        def block(index):
            if names[0][2] is None:  # one tensor
                name, n_in, _ = names[0]
                return read_torch_block(reader, name, n_in, param.shape, index).astype(dtype)
            index = tuple(index) + (slice(None),) * (len(param.shape) - len(index))
            layers = range(*index[0].indices(param.shape[0]))
            return np.stack([read_torch_block(reader, names[i][0], names[i][1], param.shape[1:], index[1:])
                             for i in layers]).astype(dtype)

        return jax.make_array_from_callback(param.shape, sharding, block)

    return jax.tree.map_with_path(leaf, layout, shardings, is_leaf=is_param)


def _check_hf_config(path: str, cfg: ModelConfig) -> None:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} is missing (expected a Hugging Face Llama directory)")
    found = model_config_from_hf(json.loads(config_file.read_text()), cfg.num_cross_layers)
    for field in ("vocab_size", "hidden", "mlp_hidden", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
        have, want = getattr(found, field), getattr(cfg, field)
        if have != want:
            raise ValueError(f"{config_file}: {field}={have} but the config says {want}")


def load_hf_backbone(path: str, cfg: ModelConfig, dtype=np.float32):
    """Backbone params from a Hugging Face Llama directory; its config.json must match `cfg`'s shapes."""
    _check_hf_config(path, cfg)
    return tree_from_tensors(cfg, SafetensorsDir(path), dtype, comb=False)["backbone"]

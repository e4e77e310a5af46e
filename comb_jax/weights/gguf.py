"""llama.cpp GGUF files (the embedded SmolLM2): dequantized tensors under Hugging Face Llama names."""

from __future__ import annotations

import os

import numpy as np

from comb_jax.config import ModelConfig
from comb_jax.paths import embedded_gguf_path
from comb_jax.weights.hf import tree_from_tensors

GGUF_BLOCK = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> HF's half-split layout)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(path: str, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Dequantized GGUF tensors under plain HF Llama names ([out, in] float32)."""
    import gguf  # optional heavy reader, only for GGUF sources

    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    reader = gguf.GGUFReader(path)
    out = {}
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape(tuple(int(d) for d in reversed(t.shape)))  # GGUF lists dims innermost first
        name = t.name
        if name == "token_embd.weight":
            out["model.embed_tokens.weight"] = w
        elif name == "output_norm.weight":
            out["model.norm.weight"] = w
        elif name == "output.weight":
            out["lm_head.weight"] = w
        elif name.startswith("blk."):
            _, i, kind, _ = name.split(".", 3)
            if kind == "attn_q":
                w = unpermute_qk(w, cfg.num_heads)
            elif kind == "attn_k":
                w = unpermute_qk(w, cfg.num_kv_heads)
            out[f"model.layers.{i}.{GGUF_BLOCK[kind]}.weight"] = w
    return out


def load_gguf_backbone(path: str, cfg: ModelConfig, dtype=np.float32):
    path = path or embedded_gguf_path()
    tensors = gguf_tensors(path, cfg)

    def get(name):
        if name not in tensors:
            raise KeyError(f"tensor {name} is missing from GGUF file {path}")
        return tensors[name]

    return tree_from_tensors(cfg, get, dtype, comb=False)["backbone"]

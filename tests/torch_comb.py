"""A PyTorch Comb forward written from the spec (shared/design/comb.md sections 2 and 5), torch only.

The independent reference for the export: it knows nothing of comb_jax and reads an exported directory by the
spec's tensor names. One sequence at a time, float32 by default, no caches: clarity over speed.

- Decoder: Llama (RMSNorm, causal GQA self-attention with RoPE, SwiGLU), final norm, LM head (tied: embedding).
- Encoder: the same blocks on one chunk, bidirectional, RoPE positions 0..L-1; after block k, k_proj[k] and
  v_proj[k] read the block output and give K_k, V_k [L, kv_heads, head_dim] (no RoPE, no final norm).
- Cross block k before decoder layer c_k: q_norm on the queries, k_norm on the stored keys at use time, no RoPE,
  no causal mask, GQA, tanh gates on the attention and MLP branches. Skipped when there is no chunk.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a directory: model.safetensors, or the shards listed in model.safetensors.index.json."""
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [
        "model.safetensors"]
    state = {}
    for f in files:
        state.update(load_file(str(path / f)))
    return state


class TorchComb:
    def __init__(self, path, dtype=torch.float32):
        path = Path(path)
        config = json.loads((path / "config.json").read_text())
        text = config["text_config"]
        self.cross_layers = list(config["cross_attention_layers"])
        self.num_layers = text["num_hidden_layers"] - len(self.cross_layers)  # the release's N + E convention
        self.heads = text["num_attention_heads"]
        self.kv_heads = text["num_key_value_heads"]
        self.head_dim = text.get("head_dim") or text["hidden_size"] // self.heads
        self.eps = text["rms_norm_eps"]
        self.w = {k: v.to(dtype) for k, v in load_state_dict(path).items()}
        self.dtype = dtype
        self.head = self.w.get("language_model.lm_head.weight", self.w["language_model.model.embed_tokens.weight"])
        self.inv_freq = self._inv_freq(text["rope_theta"], text.get("rope_scaling"))

    # -- pieces --------------------------------------------------------------------------------------------

    def _inv_freq(self, theta, scaling):
        d = self.head_dim
        inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        if not scaling:
            return inv.float()
        # Llama 3: long wavelengths slowed by `factor`, short ones kept, a smooth ramp in between
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        original = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        ramp = ((original / wavelen - low) / (high - low)).clamp(0, 1)
        scaled = (1 - ramp) * inv / factor + ramp * inv
        return scaled.float()

    def rms_norm(self, x, name):
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.w[name] * y.to(x.dtype)

    def linear(self, x, name):
        return x @ self.w[name].T

    def rope(self, x, positions):
        """x [T, heads, D]; rotate pairs (i, i + D/2) by position * inv_freq[i]."""
        angles = positions.float()[:, None] * self.inv_freq[None, :]
        cos = torch.cat([angles.cos(), angles.cos()], -1)[:, None, :]
        sin = torch.cat([angles.sin(), angles.sin()], -1)[:, None, :]
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
        return (x.float() * cos + rotated.float() * sin).to(x.dtype)

    def attend(self, q, k, v, allowed):
        """q [T, H, D], k/v [S, K, D], allowed [T, S] bool -> [T, H * D]; query head h reads KV head h // group."""
        group = self.heads // self.kv_heads
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(self.head_dim)
        scores = scores.masked_fill(~allowed[None], float("-inf"))
        out = torch.einsum("hts,shd->thd", scores.softmax(-1), v)
        return out.reshape(q.shape[0], -1)

    def mlp(self, x, prefix):
        gate = torch.nn.functional.silu(self.linear(x, prefix + "mlp.gate_proj.weight"))
        return self.linear(gate * self.linear(x, prefix + "mlp.up_proj.weight"), prefix + "mlp.down_proj.weight")

    def llama_block(self, x, prefix, positions, allowed):
        t = x.shape[0]
        h = self.rms_norm(x, prefix + "input_layernorm.weight")
        q = self.linear(h, prefix + "self_attn.q_proj.weight").view(t, self.heads, self.head_dim)
        k = self.linear(h, prefix + "self_attn.k_proj.weight").view(t, self.kv_heads, self.head_dim)
        v = self.linear(h, prefix + "self_attn.v_proj.weight").view(t, self.kv_heads, self.head_dim)
        attn = self.attend(self.rope(q, positions), self.rope(k, positions), v, allowed)
        x = x + self.linear(attn, prefix + "self_attn.o_proj.weight")
        return x + self.mlp(self.rms_norm(x, prefix + "post_attention_layernorm.weight"), prefix)

    def cross_block(self, x, k, ctx_k, ctx_v):
        prefix = f"language_model.model.cross_layers.{k}."
        t = x.shape[0]
        h = self.rms_norm(x, prefix + "input_layernorm.weight")
        q = self.linear(h, prefix + "cross_attn.q_proj.weight").view(t, self.heads, self.head_dim)
        q = self.rms_norm(q, prefix + "cross_attn.q_norm.weight")
        keys = self.rms_norm(ctx_k, prefix + "cross_attn.k_norm.weight")
        allowed = torch.ones(t, ctx_k.shape[0], dtype=torch.bool)
        attn = self.attend(q, keys, ctx_v, allowed)
        x = x + self.w[prefix + "cross_attn_attn_gate"].tanh() * self.linear(attn, prefix + "cross_attn.o_proj.weight")
        mlp = self.mlp(self.rms_norm(x, prefix + "post_attention_layernorm.weight"), prefix)
        return x + self.w[prefix + "cross_attn_mlp_gate"].tanh() * mlp

    # -- model ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, chunk):
        """chunk [L] token ids -> [(K_k, V_k)] for k < E, each [L, kv_heads, head_dim] (keys before k_norm)."""
        chunk = torch.as_tensor(chunk, dtype=torch.long)
        length = chunk.shape[0]
        x = self.w["chunk_model.embed_tokens.weight"][chunk]
        positions = torch.arange(length)
        allowed = torch.ones(length, length, dtype=torch.bool)  # bidirectional within the chunk
        out = []
        for k in range(len(self.cross_layers)):
            x = self.llama_block(x, f"chunk_model.layers.{k}.", positions, allowed)
            kk = self.linear(x, f"chunk_model.k_proj.{k}.weight").view(length, self.kv_heads, self.head_dim)
            vv = self.linear(x, f"chunk_model.v_proj.{k}.weight").view(length, self.kv_heads, self.head_dim)
            out.append((kk, vv))
        return out

    @torch.no_grad()
    def logits(self, tokens, chunks=()):
        """tokens [T], chunks: token-id sequences encoded one by one and concatenated -> float32 logits [T, vocab]."""
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        caches = [self.encode(c) for c in chunks]
        t = tokens.shape[0]
        x = self.w["language_model.model.embed_tokens.weight"][tokens]
        positions = torch.arange(t)
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        for i in range(self.num_layers):
            if caches and i in self.cross_layers:
                k = self.cross_layers.index(i)
                ctx_k = torch.cat([c[k][0] for c in caches])
                ctx_v = torch.cat([c[k][1] for c in caches])
                x = self.cross_block(x, k, ctx_k, ctx_v)
            x = self.llama_block(x, f"language_model.model.layers.{i}.", positions, causal)
        x = self.rms_norm(x, "language_model.model.norm.weight")
        return (x @ self.head.T).float()

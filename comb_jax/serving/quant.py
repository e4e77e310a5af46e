"""How the PICache pool stores K/V: the compute dtype, float32, bfloat16, or int8 with a per-token, per-head scale.

int8: each [head_dim] vector (one token, one KV head, one cross layer) is stored as int8 values q and one float16
scale s = max|x| / 127 (rounded up, so |x / s| <= 127 and nothing clips); x is read back as q * s, with an error of
at most s / 2 per element. Bytes per token and head: head_dim + 2, against 2 * head_dim for bfloat16, so the same
memory holds 2 * head_dim / (head_dim + 2) times the chunks (1.94x at head_dim 64, 1.97x at 128).

Chunks are quantised when `pool.write_chunks` writes them into the pool and dequantised when `pool.gather_context`
gathers a batch's context; `round_trip` applies the same storage to a PICache, for evaluating what it costs.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from comb_jax.config import ModelConfig

PIC_DTYPES = ("auto", "float32", "bfloat16", "int8")
SCALE_DTYPE = jnp.float16
INT8_MAX = 127


class Int8Pages(NamedTuple):
    """int8 storage of K or V: values [..., D] int8 and scale [...] float16 (one per token and head)."""

    values: jax.Array
    scale: jax.Array

    @property
    def shape(self):
        return self.values.shape


def storage_dtype(pic_dtype: str, compute_dtype) -> np.dtype:
    """The dtype of the stored values: `compute_dtype` for "auto", else the named one (int8 for "int8")."""
    if pic_dtype not in PIC_DTYPES:
        raise ValueError(f"pic_dtype={pic_dtype!r}; valid: {', '.join(PIC_DTYPES)}")
    return np.dtype(jnp.dtype(compute_dtype) if pic_dtype == "auto" else jnp.dtype(pic_dtype))


def bytes_per_token(cfg: ModelConfig, pic_dtype: str, compute_dtype) -> int:
    """Pool bytes one context token takes: K and V of every cross layer and KV head (+ the int8 scales)."""
    per_head = cfg.head_dim * storage_dtype(pic_dtype, compute_dtype).itemsize
    if pic_dtype == "int8":
        per_head += np.dtype(SCALE_DTYPE).itemsize
    return 2 * cfg.num_cross_layers * cfg.num_kv_heads * per_head


def quantize(x) -> Int8Pages:
    """x [..., D] float -> Int8Pages(values [..., D] int8, scale [...] float16)."""
    x32 = x.astype(jnp.float32)
    absmax = jnp.max(jnp.abs(x32), axis=-1)
    # round the scale up past float16's rounding, so that |x / scale| <= 127 and no value clips
    scale = (absmax / INT8_MAX * (1 + 2.0 ** -10)).astype(SCALE_DTYPE)
    safe = jnp.where(scale > 0, scale.astype(jnp.float32), 1.0)[..., None]
    values = jnp.clip(jnp.round(x32 / safe), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return Int8Pages(values, scale)


def dequantize(pages: Int8Pages, dtype=jnp.float32):
    """Int8Pages -> values * scale [..., D] in `dtype`."""
    return (pages.values.astype(jnp.float32) * pages.scale.astype(jnp.float32)[..., None]).astype(dtype)


def zeros(shape, pic_dtype: str, compute_dtype):
    """Empty storage for K or V of `shape` [..., D]: an array, or Int8Pages for int8."""
    if pic_dtype == "int8":
        return Int8Pages(jnp.zeros(shape, jnp.int8), jnp.zeros(shape[:-1], SCALE_DTYPE))
    return jnp.zeros(shape, storage_dtype(pic_dtype, compute_dtype))


def store(x, like):
    """x [..., D] float -> the storage of `like` (an array's dtype, or Int8Pages)."""
    return quantize(x) if isinstance(like, Int8Pages) else x.astype(like.dtype)


def load(stored, dtype):
    """Stored K or V -> `dtype`."""
    return dequantize(stored, dtype) if isinstance(stored, Int8Pages) else stored.astype(dtype)


def round_trip(x, pic_dtype: str):
    """x read back as the pool would store it (same dtype as x): what the pool's storage costs in accuracy."""
    if pic_dtype == "auto":
        return x
    if pic_dtype == "int8":
        return dequantize(quantize(x), x.dtype)
    return x.astype(pic_dtype).astype(x.dtype)

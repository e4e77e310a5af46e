"""What serving a config takes on one device, from abstract shapes (jax.eval_shape): no memory is allocated.

    python serve.py --dry-run --config llama8b_comb [--device-gb 80] [key=value overrides]

Lines of the plan (bytes at the serving dtypes: weights and caches in compute_dtype, the pool in serve.pic_dtype):
- backbone: the frozen decoder, embedding and LM head;
- encoder and cross blocks: the Comb parameters;
- PICache pool: serve.pool_tokens (or serve.pool_fraction of the device), with how many 1K-token documents it holds
  (each rounded up to whole pages), and as many at int8 for comparison;
- decode slots: the decoder's KV cache of serve.max_batch requests, each the largest prompt bucket + max_new_tokens;
- batch context: the dense CrossContext a batch gathers from the pool (max_batch x the largest context bucket).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from comb_jax.config import Config
from comb_jax.model.layout import init_params, model_layout
from comb_jax.model.transformer import CrossContext, init_kv_cache
from comb_jax.serving import quant
from comb_jax.serving.pool import page_bytes, pool_pages

DOCUMENT_TOKENS = 1024


def nbytes(tree) -> int:
    return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


def documents(pages: int, page_tokens: int) -> int:
    """1K-token documents that fit in `pages` pages (each takes whole pages)."""
    return pages // math.ceil(DOCUMENT_TOKENS / page_tokens)


def memory_plan(cfg: Config, device_bytes: int) -> dict:
    """{"lines": [{"name", "bytes", "detail"}], "total_bytes", "device_bytes", "free_bytes", "fits", ...}."""
    m, s = cfg.model, cfg.serve
    dtype = jnp.dtype(cfg.compute_dtype)
    params = jax.eval_shape(lambda: init_params(model_layout(m), jax.random.key(0), dtype))
    lines = [{"name": "backbone", "bytes": nbytes(params["backbone"]),
              "detail": f"{m.num_layers} decoder layers, embedding and head, {dtype.name}"},
             {"name": "encoder", "bytes": nbytes(params["comb"]["encoder"]),
              "detail": f"{m.num_cross_layers} encoder blocks + K/V projections"},
             {"name": "cross blocks", "bytes": nbytes(params["comb"]["cross"]),
              "detail": f"{m.num_cross_layers} gated cross-attention blocks"}]

    pages = pool_pages(s, m, dtype, device_bytes)
    shape = (m.num_cross_layers, pages, s.page_tokens, m.num_kv_heads, m.head_dim)
    pool = jax.eval_shape(lambda: [quant.zeros(shape, s.pic_dtype, dtype) for _ in "kv"])
    pool_bytes = nbytes(pool)
    int8_pages = pool_bytes // page_bytes(dataclasses.replace(s, pic_dtype="int8"), m, dtype)
    storage = quant.storage_dtype(s.pic_dtype, dtype).name
    lines.append({"name": "PICache pool", "bytes": pool_bytes,
                  "detail": f"{pages} pages of {s.page_tokens} tokens in {storage}: "
                            f"{documents(pages, s.page_tokens)} documents of {DOCUMENT_TOKENS} tokens "
                            f"({documents(int8_pages, s.page_tokens)} at pic_dtype=int8 in the same bytes)",
                  "documents_1k": documents(pages, s.page_tokens),
                  "documents_1k_int8": documents(int8_pages, s.page_tokens)})

    slots = max(s.prompt_buckets) + s.max_new_tokens
    kv = jax.eval_shape(lambda: init_kv_cache(m, s.max_batch, slots, dtype))
    lines.append({"name": "decode slots (KV cache)", "bytes": nbytes(kv),
                  "detail": f"{s.max_batch} requests x {slots} slots (largest prompt bucket + max_new_tokens)"})
    context = min(s.max_context_tokens, max(s.context_buckets))
    ctx_shape = (m.num_cross_layers, s.max_batch, context, m.num_kv_heads, m.head_dim)
    ctx = jax.eval_shape(lambda: CrossContext(jnp.zeros(ctx_shape, dtype), jnp.zeros(ctx_shape, dtype),
                                              jnp.zeros((s.max_batch, context), bool)))
    lines.append({"name": "batch context (CrossContext)", "bytes": nbytes(ctx),
                  "detail": f"{s.max_batch} requests x {context} context tokens, gathered from the pool per batch"})
    total = sum(line["bytes"] for line in lines)
    return {"config": cfg.name, "compute_dtype": dtype.name, "pic_dtype": s.pic_dtype, "lines": lines,
            "total_bytes": total, "device_bytes": device_bytes, "free_bytes": device_bytes - total,
            "fits": total <= device_bytes,
            "note": "activations and XLA scratch of a prefill come on top (a few GB at these buckets)"}


def format_plan(plan: dict) -> str:
    gb = 1e9
    out = [f"memory plan for {plan['config']} on one device of {plan['device_bytes'] / gb:.0f} GB "
           f"(compute {plan['compute_dtype']}, PICache {plan['pic_dtype']}); abstract shapes, nothing allocated", ""]
    width = max(len(line["name"]) for line in plan["lines"])
    for line in plan["lines"]:
        out.append(f"  {line['name']:<{width}}  {line['bytes'] / gb:8.2f} GB  {line['detail']}")
    out.append(f"  {'total':<{width}}  {plan['total_bytes'] / gb:8.2f} GB  "
               f"{'fits' if plan['fits'] else 'DOES NOT FIT'}, {plan['free_bytes'] / gb:.2f} GB left")
    out.append(f"  ({plan['note']})")
    return "\n".join(out)

"""int8 PICache pool (serve.pic_dtype=int8): quantisation error bound, pool capacity, outputs against float."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from comb_jax.config import MeshConfig, load_config
from comb_jax.model.sharding import make_mesh
from comb_jax.model.transformer import PICache, encode, forward, lm_logits
from comb_jax.serving import quant
from comb_jax.serving.engine import Engine, Request
from comb_jax.serving.pool import PagePool, gather_context, page_bytes, pool_pages


def test_int8_round_trip_error_is_at_most_half_a_step():
    rng = np.random.default_rng(0)
    # vectors of very different magnitudes (per token and head), one all zero
    x = rng.normal(size=(3, 50, 4, 64)) * np.exp(rng.normal(size=(3, 50, 4, 1)) * 2)
    x[0, 0, 0] = 0.0
    x = jnp.asarray(x, jnp.float32)
    q = quant.quantize(x)
    assert q.values.dtype == jnp.int8 and q.scale.dtype == jnp.float16 and q.scale.shape == x.shape[:-1]
    back = np.asarray(quant.dequantize(q))
    scale = np.asarray(q.scale, np.float32)[..., None]
    err = np.abs(back - np.asarray(x))
    assert np.all(err <= scale / 2 * (1 + 1e-6) + 1e-30)
    # the scale is the vector's own: max|x| / 127, up to float16 rounding (rounded up)
    absmax = np.abs(np.asarray(x)).max(-1, keepdims=True)
    np.testing.assert_array_less(absmax / 127 * (1 - 1e-7), scale + 1e-30)
    np.testing.assert_allclose(scale, absmax / 127, rtol=2e-3)
    assert np.all(back[0, 0, 0] == 0) and np.abs(np.asarray(q.values)).max() <= 127


def test_int8_pool_holds_twice_the_pages_of_bfloat16_in_the_same_bytes(tiny_cfg):
    budget = 10 << 30
    for name, per_head in (("smollm2_comb", 64), ("llama8b_comb", 128)):
        cfg = load_config(name)
        serve = dataclasses.replace(cfg.serve, pool_fraction=0.5)
        pages = {d: pool_pages(dataclasses.replace(serve, pic_dtype=d), cfg.model, jnp.float32, budget)
                 for d in ("bfloat16", "int8")}
        assert pages["int8"] / pages["bfloat16"] >= 1.9  # exactly 2 * head_dim / (head_dim + 2) up to flooring
        np.testing.assert_allclose(pages["int8"] / pages["bfloat16"], 2 * per_head / (per_head + 2), rtol=1e-3)
    # what a page really takes on the device is what the sizing assumed
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    for pic_dtype in ("bfloat16", "int8"):
        serve = dataclasses.replace(tiny_cfg.serve, pic_dtype=pic_dtype, pool_tokens=8 * tiny_cfg.serve.page_tokens)
        pool = PagePool(tiny_cfg.model, serve, "fp", mesh)
        stored = sum(a.nbytes for a in jax.tree.leaves((pool.k, pool.v)))
        assert stored == pool.num_pages * page_bytes(serve, tiny_cfg.model, jnp.float32)


def test_int8_pages_gather_to_the_encoder_output_within_the_bound(tiny_cfg, tiny_params):
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    serve = dataclasses.replace(tiny_cfg.serve, pic_dtype="int8", pool_tokens=16 * tiny_cfg.serve.page_tokens)
    pool = PagePool(tiny_cfg.model, serve, "fp", mesh)
    assert isinstance(pool.k, quant.Int8Pages) and pool.k.values.dtype == jnp.int8
    rng = np.random.default_rng(3)
    chunks = [rng.integers(0, 256, n).tolist() for n in (7, 30)]
    entries = [pool.acquire(ids)[0] for ids in chunks]
    pool.write(tiny_params, entries, batch=2)
    table, mask = pool.page_table([entries], 64)
    k, v, _ = gather_context(pool.k, pool.v, table, mask)
    assert k.dtype == jnp.float32
    want = [encode(tiny_params, np.asarray([ids]), np.ones((1, len(ids)), bool), tiny_cfg.model) for ids in chunks]
    for got, ref in ((k, np.concatenate([w.k[:, 0] for w in want], 1)),
                     (v, np.concatenate([w.v[:, 0] for w in want], 1))):
        got = np.asarray(got[:, 0])[:, mask[0]]
        bound = np.abs(ref).max(-1, keepdims=True) / 127 / 2 * 1.01 + 1e-7
        assert np.all(np.abs(got - ref) <= bound)
        assert np.abs(got - ref).max() > 0  # really quantised


def test_int8_context_gives_outputs_close_to_float(tiny_cfg, tiny_params):
    """Logits read through an int8-stored PICache against the float one, and the engine end to end."""
    rng = np.random.default_rng(5)
    chunk = rng.integers(0, 256, (2, 48))
    cache = encode(tiny_params, chunk, np.ones_like(chunk, bool), tiny_cfg.model)
    prompt = jnp.asarray(rng.integers(0, 256, (2, 12)))

    def logits(picache):
        return np.asarray(lm_logits(tiny_params, forward(tiny_params, prompt, tiny_cfg.model, picache)[0]))

    stored = PICache(quant.round_trip(cache.k, "int8"), quant.round_trip(cache.v, "int8"), cache.mask)
    ref, got, none = logits(cache), logits(stored), logits(None)
    # int8 moves the logits far less than the context itself does
    assert np.abs(got - ref).max() < 0.02 * np.abs(ref - none).max()
    assert np.abs(got - ref).max() > 0

    requests = [Request(f"r{i}", rng.integers(3, 256, 10).tolist(), [rng.integers(3, 256, 20).tolist()
                for _ in range(2)], max_tokens=6) for i in range(3)]
    out = {}
    for pic_dtype in ("auto", "int8"):
        cfg = dataclasses.replace(tiny_cfg, serve=dataclasses.replace(tiny_cfg.serve, pic_dtype=pic_dtype))
        out[pic_dtype] = [r.tokens for r in Engine(cfg, tiny_params).run(requests)]
    assert out["int8"] == out["auto"]

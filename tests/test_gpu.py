"""The CPU suite's identities on the accelerator, in bfloat16 with fused (cuDNN) attention, and no recompiles.

Marked gpu: deselected from the CPU suite; `make test` runs them (`pytest -m gpu`, JAX_PLATFORMS=cuda) where
nvidia-smi finds a GPU. They fail, rather than pass vacuously, on a CPU backend unless COMB_GPU_TESTS_ON_CPU=1, which
runs the same checks on CPU (XLA attention instead of cuDNN) to try them out without an accelerator.

Tolerances (logits of a random model with the cross blocks open; the scale is the float32 logits' standard deviation):
- bfloat16 (cuDNN) against float32 (XLA): max |diff| <= 0.15 x std, mean |diff| <= 0.02 x std;
- chunk order [a, b] against [b, a] in bfloat16: max |diff| <= 0.05 x std, the same argmax at >= 95% of positions.
On CPU (COMB_GPU_TESTS_ON_CPU=1, XLA attention) they measure 0.036 / 0.0065 and 0 / 100%.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from comb_jax.config import load_config
from comb_jax.model.compiles import compile_count
from comb_jax.model.decode import prefill
from comb_jax.model.layout import init_params, model_layout
from comb_jax.model.transformer import concat_picaches, encode, forward, lm_logits, resolve_attention
from comb_jax.serving.engine import Engine, Request

pytestmark = pytest.mark.gpu

# head_dim 64 and sequence lengths of multiples of 64: shapes cuDNN flash attention takes
MODEL = ["vocab_size=512", "hidden=256", "mlp_hidden=512", "num_layers=4", "num_heads=4", "num_kv_heads=2",
         "head_dim=64", "num_cross_layers=2"]
SERVE = ["serve.prompt_buckets=(64, 128)", "serve.context_buckets=(256, 512)", "serve.chunk_buckets=(128, 256)",
         "serve.max_chunk_tokens=256", "serve.max_context_tokens=512", "serve.page_tokens=64", "serve.max_batch=4",
         "serve.max_new_tokens=8", "serve.encode_batch=4", "serve.pool_tokens=8192"]


@pytest.fixture(scope="module")
def device_cfg():
    if jax.default_backend() == "cpu" and os.environ.get("COMB_GPU_TESTS_ON_CPU") != "1":
        pytest.fail("tests marked gpu need an accelerator (run with JAX_PLATFORMS=cuda); "
                    "COMB_GPU_TESTS_ON_CPU=1 tries them on CPU")
    return load_config("tiny_comb", [*MODEL, *SERVE, "compute_dtype=bfloat16"])


def open_gates(params):
    cross = dict(params["comb"]["cross"])
    cross["gate_attn"] = cross["gate_attn"] + 0.5
    cross["gate_mlp"] = cross["gate_mlp"] + 0.3
    return {"backbone": params["backbone"], "comb": {**params["comb"], "cross": cross}}


@pytest.fixture(scope="module")
def params(device_cfg):
    return open_gates(init_params(model_layout(device_cfg.model), jax.random.key(0)))


def chunks_and_prompt(cfg, seed=0, lengths=(200, 120), prompt=128):
    rng = np.random.default_rng(seed)
    chunks = [rng.integers(1, cfg.model.vocab_size, (1, n)) for n in lengths]
    return chunks, jnp.asarray(rng.integers(1, cfg.model.vocab_size, (1, prompt)))


def picache_of(params, cfg, chunks, dtype):
    return concat_picaches([encode(params, jnp.asarray(c), jnp.ones(c.shape, bool), cfg, dtype) for c in chunks])


def logits(params, cfg, prompt, picache, dtype):
    hidden, _ = jax.jit(forward, static_argnames=("cfg", "dtype"))(params, prompt, cfg=cfg, picache=picache,
                                                                   dtype=dtype)
    return np.asarray(lm_logits(params, hidden), np.float32)


def test_fused_attention_is_used_on_the_accelerator(device_cfg):
    want = "xla" if jax.default_backend() == "cpu" else "cudnn"
    assert resolve_attention(device_cfg.model, jnp.bfloat16) == want


def test_zero_gates_equal_the_backbone(device_cfg):
    params = init_params(model_layout(device_cfg.model), jax.random.key(1))  # release init: gates 0
    chunks, prompt = chunks_and_prompt(device_cfg, 1)
    picache = picache_of(params, device_cfg.model, chunks, jnp.bfloat16)
    np.testing.assert_array_equal(logits(params, device_cfg.model, prompt, picache, jnp.bfloat16),
                                  logits(params, device_cfg.model, prompt, None, jnp.bfloat16))


def test_chunk_order_does_not_change_the_output(device_cfg, params):
    chunks, prompt = chunks_and_prompt(device_cfg, 2)
    m = device_cfg.model
    ab = logits(params, m, prompt, picache_of(params, m, chunks, jnp.bfloat16), jnp.bfloat16)
    ba = logits(params, m, prompt, picache_of(params, m, chunks[::-1], jnp.bfloat16), jnp.bfloat16)
    scale = ab.std()
    assert np.abs(ab - ba).max() <= 0.05 * scale
    assert (ab.argmax(-1) == ba.argmax(-1)).mean() >= 0.95  # a near tie may flip under a different summation order


def test_bfloat16_is_within_tolerance_of_float32(device_cfg, params):
    chunks, prompt = chunks_and_prompt(device_cfg, 3)
    m = device_cfg.model
    ref = logits(params, m, prompt, picache_of(params, m, chunks, jnp.float32), jnp.float32)
    got = logits(params, m, prompt, picache_of(params, m, chunks, jnp.bfloat16), jnp.bfloat16)
    no_context = logits(params, m, prompt, None, jnp.float32)
    scale = ref.std()
    assert np.abs(got - ref).max() <= 0.15 * scale and np.abs(got - ref).mean() <= 0.02 * scale
    assert np.abs(ref - no_context).mean() > 5 * np.abs(got - ref).mean()  # the context matters more than bf16


def test_fused_attention_agrees_with_the_einsum_reference(device_cfg, params):
    chunks, prompt = chunks_and_prompt(device_cfg, 4)
    ref_cfg = dataclasses.replace(device_cfg.model, attention_impl="einsum")
    ref = logits(params, ref_cfg, prompt, picache_of(params, ref_cfg, chunks, jnp.bfloat16), jnp.bfloat16)
    m = device_cfg.model
    got = logits(params, m, prompt, picache_of(params, m, chunks, jnp.bfloat16), jnp.bfloat16)
    assert np.abs(got - ref).max() <= 0.05 * ref.std()


def _prefill_temp_bytes(cfg, tokens: int) -> int:
    """Scratch memory XLA plans for a full prefill of `tokens` tokens (compiled from abstract shapes, not run)."""
    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
    f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    layout = jax.eval_shape(lambda: init_params(model_layout(cfg), jax.random.key(0)))
    compiled = prefill.lower(layout, i32(1, tokens), i32(1), None, jax.eval_shape(lambda: jax.random.key(0)),
                             f32(1), f32(1), cfg=cfg, slots=tokens + 8, max_new_tokens=8, stop_ids=(),
                             dtype=jnp.bfloat16).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_long_prefill_has_no_token_by_token_score_matrix(device_cfg):
    tokens = 4096
    one_head_scores = tokens * tokens * 4  # float32 [tokens, tokens] of a single head
    einsum = _prefill_temp_bytes(dataclasses.replace(device_cfg.model, attention_impl="einsum"), tokens)
    assert einsum >= one_head_scores  # the measure sees the reference's score matrix
    if resolve_attention(device_cfg.model, jnp.bfloat16) == "cudnn":
        assert _prefill_temp_bytes(device_cfg.model, tokens) < one_head_scores / 4


def test_nothing_recompiles_after_warmup(device_cfg, params):
    rng = np.random.default_rng(5)
    vocab = device_cfg.model.vocab_size
    requests = [Request(f"r{i}", rng.integers(3, vocab, n).tolist(),
                        [rng.integers(3, vocab, c).tolist() for c in chunk_lengths], max_tokens=8)
                for i, (n, chunk_lengths) in enumerate([(20, (100, 150)), (90, (250,)), (60, ()), (128, (64, 64, 64))])]
    answers = {}
    for pic_dtype in ("auto", "int8"):
        cfg = dataclasses.replace(device_cfg, serve=dataclasses.replace(device_cfg.serve, pic_dtype=pic_dtype))
        engine = Engine(cfg, params)
        engine.warmup()
        before = compile_count()
        results = engine.run(requests) + engine.run(requests[::-1])
        assert compile_count() == before, f"pic_dtype={pic_dtype}: compiled after warm-up"
        assert all(r.error is None and r.tokens for r in results)
        answers[pic_dtype] = [r.tokens for r in results]
    # int8 pages change answers rarely: at least the first generated token of every request agrees
    assert [a[0] for a in answers["int8"]] == [a[0] for a in answers["auto"]]

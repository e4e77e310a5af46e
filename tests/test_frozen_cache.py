"""training.frozen_cache: the step from cached frozen features equals the step that computes them; rows are read back
from disk by their token ids; the top-k KL equals the full KL at k = vocab; a run trains the same with the cache."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import toy_cfg, toy_examples

from comb_jax.model.layout import init_params, model_layout
from comb_jax.text.codec import make_codec
from comb_jax.training import data as D
from comb_jax.training import objectives as O
from comb_jax.training.frozen_cache import FrozenCache, frozen_features
from comb_jax.training.trainer import train


def _setup(tiny_cfg, *overrides, seed=3):
    cfg = toy_cfg(tiny_cfg, "model.context_layer=1", "remat=false", *overrides)
    params = init_params(model_layout(cfg.model), jax.random.key(seed))
    comb = jax.tree.map(np.asarray, params["comb"])
    comb["cross"]["gate_attn"] = np.full_like(comb["cross"]["gate_attn"], 0.6)  # the cross blocks matter
    comb["cross"]["gate_mlp"] = np.full_like(comb["cross"]["gate_mlp"], 0.3)
    for i, name in enumerate(("context_k_proj", "context_v_proj")):  # the context path starts at 0: open it
        shape = comb["encoder"][name].shape
        comb["encoder"][name] = 0.1 * np.asarray(jax.random.normal(jax.random.key(4 + i), shape))
    codec = make_codec(cfg)
    # rows of different lengths, so that padding and the answer-position gather are exercised
    examples = toy_examples(5)
    examples[1] = dataclasses.replace(examples[1], answer="a longer answer of several words")
    batch = D.collate([D.tokenize(e, codec, cfg.train) for e in examples], cfg.train)
    return cfg, params["backbone"], comb, batch


def _loss_and_grads(cfg, backbone, comb, batch):
    fn = jax.jit(jax.value_and_grad(lambda c, b: O.loss_fn(c, backbone, b, cfg), has_aux=True))
    (loss, metrics), grads = fn(comb, jax.tree.map(jnp.asarray, batch))
    return float(loss), metrics, grads


def test_cached_features_and_answer_positions_give_the_step_that_computes_everything(tiny_cfg, tmp_path):
    cfg, backbone, comb, batch = _setup(tiny_cfg, "frozen_cache_dtype=float32")
    assert batch["answer_positions"].shape[1] >= 8 and (batch["loss_mask"].sum(1) > 1).any()
    # the reference: every position through the LM head, every frozen layer run in the step
    plain = {k: v for k, v in batch.items() if k != "answer_positions"}
    ref_loss, ref_metrics, ref_grads = _loss_and_grads(cfg, backbone, comb, plain)
    loss, _, grads = _loss_and_grads(cfg, backbone, comb, batch)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)

    cache = FrozenCache(cfg, tmp_path, backbone, "fingerprint-a")
    filled = cache.fill(batch)
    assert (cache.misses, cache.hits) == (5, 0)
    assert filled["decoder_states"].shape == (*batch["tokens"].shape, cfg.model.hidden)
    assert filled["chunk_states"].shape == (*batch["chunk_tokens"].shape, cfg.model.hidden)
    cached_loss, cached_metrics, cached_grads = _loss_and_grads(cfg, backbone, comb, filled)
    np.testing.assert_allclose(cached_loss, ref_loss, rtol=1e-5)
    assert float(cached_metrics["answer_tokens"]) == float(ref_metrics["answer_tokens"]) == batch["loss_mask"].sum()
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6), cached_grads, ref_grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6), grads, ref_grads)
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(cached_grads["encoder"]["context_k_proj"]))

    # a second cache over the same directory reads every row back, the same values, in a batch of another order
    again = FrozenCache(cfg, tmp_path, backbone, "fingerprint-a")
    order = np.array([3, 0, 4, 1, 2])
    refilled = again.fill({k: v[order] for k, v in batch.items()})
    assert (again.misses, again.hits) == (0, 5)
    for name in ("decoder_states", "chunk_states"):
        np.testing.assert_array_equal(refilled[name], filled[name][order])
    # a damaged row (a torn disk write, a full disk) is computed again and rewritten, the same values
    damaged = sorted(again.directory.glob("*/*.npz"))[0]
    damaged.write_bytes(damaged.read_bytes()[:100])
    repaired = FrozenCache(cfg, tmp_path, backbone, "fingerprint-a")
    np.testing.assert_array_equal(repaired.fill(batch)["decoder_states"], filled["decoder_states"])
    assert (repaired.misses, repaired.hits) == (1, 4)
    # another backbone (fingerprint) or layout never reads these rows
    other = FrozenCache(cfg, tmp_path, backbone, "fingerprint-b")
    other.fill(batch)
    assert other.misses == 5 and other.directory != again.directory


def test_bfloat16_rows_read_back_as_they_were_used(tiny_cfg, tmp_path):
    cfg, backbone, comb, batch = _setup(tiny_cfg)  # the default storage: bfloat16
    first = FrozenCache(cfg, tmp_path, backbone, "fp").fill(batch)
    second = FrozenCache(cfg, tmp_path, backbone, "fp").fill(batch)
    np.testing.assert_array_equal(first["decoder_states"], second["decoder_states"])  # computed == read back
    exact = jax.device_get(frozen_features(backbone, batch, cfg))["decoder_states"]
    real = np.cumsum(batch["loss_mask"][:, ::-1], 1)[:, ::-1] > 0  # up to each row's last answer target
    np.testing.assert_allclose(first["decoder_states"][real], exact[real], rtol=1e-2, atol=1e-2)
    assert not first["decoder_states"][~real].any()  # past it: padding, never read by the loss
    loss, _, _ = _loss_and_grads(cfg, backbone, comb, first)
    ref, _, _ = _loss_and_grads(cfg, backbone, comb, batch)
    np.testing.assert_allclose(loss, ref, rtol=1e-2)


def test_top_k_kl_is_the_full_kl_at_k_vocab_and_close_below(tiny_cfg, tmp_path):
    vocab = tiny_cfg.model.vocab_size
    cfg, backbone, comb, batch = _setup(tiny_cfg, "kl_weight=0.5", f"teacher_top_k={vocab}",
                                        "frozen_cache_dtype=float32")
    assert "teacher_tokens" in batch
    ref_loss, ref_metrics, _ = _loss_and_grads(cfg, backbone, comb, batch)  # the teacher forward in the step
    filled = FrozenCache(cfg, tmp_path / "full", backbone, "fp").fill(batch)
    assert "teacher_tokens" not in filled and filled["teacher_top_ids"].shape[-1] == vocab
    loss, metrics, _ = _loss_and_grads(cfg, backbone, comb, filled)
    np.testing.assert_allclose(float(metrics["kl"]), float(ref_metrics["kl"]), rtol=1e-4)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert float(metrics["kl"]) > 1e-3

    # fewer tokens: the rest of the vocabulary is one bucket, a coarser partition, so the KL can only shrink
    # (data processing inequality), and it grows back with k
    kls = []
    for k in (8, 64):
        cfg_k, *_ = _setup(tiny_cfg, "kl_weight=0.5", f"teacher_top_k={k}", "frozen_cache_dtype=float32")
        filled_k = FrozenCache(cfg_k, tmp_path / f"top{k}", backbone, "fp").fill(batch)
        kls.append(float(_loss_and_grads(cfg_k, backbone, comb, filled_k)[1]["kl"]))
    assert 0 < kls[0] < kls[1] < float(ref_metrics["kl"]) * (1 + 1e-5)


def test_runs_it_cannot_serve_are_refused_by_name(tiny_cfg, tmp_path):
    cfg, backbone, _, _ = _setup(tiny_cfg, "hidden_weight=0.1")
    with pytest.raises(ValueError, match="hidden_weight"):
        FrozenCache(cfg, tmp_path, backbone, "fp")
    cfg, backbone, _, _ = _setup(tiny_cfg, "objective=kv")
    with pytest.raises(ValueError, match="objective=answer"):
        FrozenCache(cfg, tmp_path, backbone, "fp")


def test_a_run_with_the_cache_trains_like_one_without(tiny_cfg, tmp_path):
    """Two epochs of 8 examples in batches of 4: the second epoch reads every row back; float32 storage, so the
    losses match the run that computes everything in its steps."""
    losses = {}
    for cache in (False, True):
        cfg, backbone, comb, _ = _setup(tiny_cfg, "batch_size=4", "mesh.data=1", "steps=4", "checkpoint_every=4",
                                        "learning_rate=1e-2", f"run_dir={tmp_path / str(cache)}",
                                        f"frozen_cache={cache}", "frozen_cache_dtype=float32", "init=random")
        summary = train(cfg, progress=False, backbone=backbone, examples=(toy_examples(8), []))
        losses[cache] = summary["losses"]
        if cache:
            assert summary["frozen_cache"]["misses"] == 8 and summary["frozen_cache"]["hits"] == 8
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-4)

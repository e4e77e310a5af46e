"""Training: sharded step == single-device step, frozen backbone untouched, overfitting, warm start."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import toy_cfg, toy_examples

from comb_jax.cli.train import train
from comb_jax.config import MeshConfig, apply_overrides
from comb_jax.methods.comb import batch_picache
from comb_jax.model.layout import count_params, flatten_names
from comb_jax.model.sharding import make_mesh
from comb_jax.model.transformer import concat_picaches, encode, forward, lm_logits
from comb_jax.text.codec import make_codec
from comb_jax.training import data as D
from comb_jax.training import objectives as O
from comb_jax.training import trainer as T
from comb_jax.training.warm_start import init_comb


def _run_steps(cfg, mesh, params, batches):
    optimizer = T.make_optimizer(cfg.train)
    state = T.init_state(cfg, mesh, optimizer, params["comb"])
    backbone = T.place_backbone(cfg, mesh, params["backbone"])
    step = T.make_train_step(cfg, mesh, optimizer, batches[0])
    losses = []
    for batch in batches:
        state, metrics = step(state, backbone, batch)
        losses.append(float(metrics["loss"]))
    return losses, jax.tree.map(np.asarray, state.comb), state, backbone


def test_sharded_steps_match_one_device_and_backbone_stays_frozen(tiny_cfg, tiny_params):
    cfg = toy_cfg(tiny_cfg, "batch_size=8", "learning_rate=1e-2")
    it = D.train_iterator(toy_examples(16), D.Codec(None), cfg.train)
    batches = [next(it) for _ in range(2)]
    one = make_mesh(MeshConfig(1, 1, 1))
    many = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert many.size == 8
    params = jax.tree.map(np.asarray, tiny_params)
    backbone_before = jax.tree.map(np.copy, params["backbone"])
    loss1, comb1, _, _ = _run_steps(cfg, one, params, batches)
    loss8, comb8, state8, backbone8 = _run_steps(cfg, many, params, batches)
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), comb1, params["comb"])
    assert all(jax.tree.leaves(changed)), "every trainable tensor should move"
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), comb8, comb1)
    # the frozen backbone: bit-identical afterwards, and no optimizer state was ever made for it
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), backbone8, backbone_before)
    n_comb = count_params(params["comb"])
    assert count_params(state8.opt_state) == 2 * n_comb + 2  # AdamW mu, nu + two step counters
    assert state8.comb["encoder"]["layers"]["w_up"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")


def test_tiny_model_overfits_a_handful_of_examples(tiny_cfg, tiny_params):
    cfg = toy_cfg(tiny_cfg, "batch_size=4", "learning_rate=1e-2", "warmup_steps=5", "mesh.data=1")
    mesh = make_mesh(cfg.mesh)
    it = D.train_iterator(toy_examples(4), D.Codec(None), cfg.train)
    batch = next(it)  # all four examples
    optimizer = T.make_optimizer(cfg.train)
    state = T.init_state(cfg, mesh, optimizer, tiny_params["comb"])
    # With N(0, 0.02) tied embeddings the frozen random head caps |logits| near 1 (loss >= ~4.3 whatever Comb
    # does); an embedding of std 1 gives the head the range a trained LM has.
    backbone = dict(tiny_params["backbone"], embed=np.asarray(tiny_params["backbone"]["embed"]) * 50)
    backbone = T.place_backbone(cfg, mesh, backbone)
    step = T.make_train_step(cfg, mesh, optimizer, batch)
    losses = []
    for _ in range(40):
        state, metrics = step(state, backbone, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.1 * losses[0], losses[::10]


def test_warm_start_copies_decoder_layers_and_keeps_the_backbone_function(tiny_cfg, tiny_params):
    cfg = apply_overrides(tiny_cfg, ["init=warm"])
    comb = init_comb(cfg, tiny_params["backbone"], jax.random.key(3))
    layers = tiny_params["backbone"]["layers"]
    for k, c in enumerate(cfg.model.cross_layers):  # c = [1, 3] for 4 layers and 2 cross blocks
        for name in layers:
            np.testing.assert_array_equal(comb["encoder"]["layers"][name][k], layers[name][c])
        np.testing.assert_array_equal(comb["encoder"]["k_proj"][k], layers["wk"][c])
        np.testing.assert_array_equal(comb["encoder"]["v_proj"][k], layers["wv"][c])
        np.testing.assert_array_equal(comb["cross"]["wq"][k], layers["wq"][c])
        np.testing.assert_array_equal(comb["cross"]["wo"][k], layers["wo"][c])
    assert not np.any(comb["cross"]["gate_attn"]) and not np.any(comb["cross"]["gate_mlp"])
    # gates at 0: the model with a PICache is exactly the backbone
    params = {"backbone": tiny_params["backbone"], "comb": comb}
    tokens = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
    chunks = jnp.arange(2 * 2 * 8, dtype=jnp.int32).reshape(2, 2, 8) % 200
    picache = batch_picache(params, chunks, jnp.ones(chunks.shape, bool), cfg, jnp.float32)
    with_ctx, _ = forward(params, tokens, cfg.model, picache)
    without, _ = forward(params, tokens, cfg.model)
    np.testing.assert_array_equal(np.asarray(with_ctx), np.asarray(without))


def test_batch_picache_is_per_chunk_encoding_concatenated(tiny_cfg, tiny_params):
    from comb_jax.model.transformer import concat_picaches, encode

    chunks = (jnp.arange(2 * 3 * 8, dtype=jnp.int32).reshape(2, 3, 8) * 7) % 256
    mask = jnp.arange(8)[None, None, :] < jnp.array([[8, 5, 3], [2, 8, 6]])[..., None]
    joined = batch_picache(tiny_params, chunks, mask, tiny_cfg, jnp.float32)
    parts = [encode(tiny_params, chunks[:, j], mask[:, j], tiny_cfg.model) for j in range(3)]
    expected = concat_picaches(parts)
    for a, b in zip(joined, expected):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_nan_loss_stops_with_a_clear_error(tiny_cfg, tiny_params, tmp_path):
    import pytest

    cfg = toy_cfg(tiny_cfg, "batch_size=4", "mesh.data=1", "steps=2", "checkpoint_every=1", f"run_dir={tmp_path}")
    backbone = dict(tiny_params["backbone"])
    backbone["final_norm"] = np.full_like(np.asarray(backbone["final_norm"]), np.nan)
    with pytest.raises(T.TrainingDiverged, match="loss is nan at step 1"):
        train(cfg, progress=False, backbone=backbone, examples=(toy_examples(8), []))
    assert not (tmp_path / "checkpoints" / "1").exists()


def test_kl_term_is_the_teachers_full_context_distribution_on_answer_tokens(tiny_cfg, tiny_params):
    """loss_fn's CE and KL against an independent per-example computation: the teacher reads the chunks inlined,
    the student reads them as PICaches (gates opened so they matter), both scored on the answer tokens."""
    cfg = toy_cfg(tiny_cfg, "kl_weight=0.5", "train.chunk_buckets=(32, 128)", "remat=false")
    codec = make_codec(cfg)
    comb = jax.tree.map(np.asarray, tiny_params["comb"])
    comb["cross"]["gate_attn"] = np.full_like(comb["cross"]["gate_attn"], 0.7)
    comb["cross"]["gate_mlp"] = np.full_like(comb["cross"]["gate_mlp"], -0.4)
    params = {"backbone": tiny_params["backbone"], "comb": comb}
    features = [D.tokenize(e, codec, cfg.train) for e in toy_examples(3)]
    batch = jax.tree.map(jnp.asarray, D.collate(features, cfg.train))
    loss, metrics = O.loss_fn(comb, params["backbone"], batch, cfg)

    ce_terms, kl_terms = [], []
    for f in features:
        picache = concat_picaches([encode(params, jnp.asarray([c]), jnp.ones((1, len(c)), bool), cfg.model)
                                   for c in f["chunks"]])
        student = jax.nn.log_softmax(lm_logits(params, forward(params, jnp.asarray([f["prompt"] + f["answer"]]),
                                                               cfg.model, picache)[0]), -1)[0]
        teacher = jax.nn.log_softmax(lm_logits(params, forward(params, jnp.asarray([f["teacher_prompt"] + f["answer"]]),
                                                               cfg.model)[0]), -1)[0]
        for j, token in enumerate(f["answer"]):  # position predicting answer token j in each sequence
            s, t = student[len(f["prompt"]) - 1 + j], teacher[len(f["teacher_prompt"]) - 1 + j]
            ce_terms.append(-float(s[token]))
            kl_terms.append(float(jnp.sum(jnp.exp(t) * (t - s))))
    np.testing.assert_allclose(float(metrics["ce"]), np.mean(ce_terms), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["kl"]), np.mean(kl_terms), rtol=1e-4)
    assert float(metrics["kl"]) > 1e-3  # the PICache student is not the full-context teacher
    np.testing.assert_allclose(float(loss), np.mean(ce_terms) + 0.5 * np.mean(kl_terms), rtol=1e-5)


def test_lr_multipliers_scale_only_their_parameters(tiny_cfg, tiny_params):
    """Two AdamW steps on the same gradients: each gate's and the cross o_proj's updates grow by their multiplier,
    all others (the encoder's own o_proj included) are unchanged."""
    comb = tiny_params["comb"]
    grads = jax.tree.map(lambda a: jnp.full_like(a, 1e-3), comb)

    def updates(attn, mlp, out=1.0):
        cfg = apply_overrides(tiny_cfg, ["warmup_steps=1", f"gate_attn_lr_multiplier={attn}",
                                         f"gate_mlp_lr_multiplier={mlp}", f"cross_out_lr_multiplier={out}"])
        optimizer = T.make_optimizer(cfg.train)
        opt_state = optimizer.init(comb)
        for _ in range(2):  # the first step has learning rate 0 (linear warm-up from 0)
            u, opt_state = optimizer.update(grads, opt_state, comb)
        return u

    base, scaled = flatten_names(updates(1.0, 1.0)), flatten_names(updates(25.0, 3.0, 7.0))
    for name, a in base.items():
        factor = {"cross/gate_attn": 25.0, "cross/gate_mlp": 3.0, "cross/wo": 7.0}.get(name, 1.0)
        assert np.any(a)
        np.testing.assert_allclose(scaled[name], factor * a, rtol=1e-6, err_msg=name)
    assert sum(jax.tree.leaves(T.cross_mask("gate_attn")(comb))) == 1
    assert "encoder/layers/wo" in base and sum(jax.tree.leaves(T.cross_mask("wo")(comb))) == 1


def test_dry_run_compiles_on_a_simulated_mesh_without_weights(tiny_cfg):
    """The --dry-run path (used for llama8b_comb) on the tiny shapes: abstract arrays, 8 devices, counts reported."""
    cfg = apply_overrides(tiny_cfg, ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "batch_size=8"])
    # in a fresh process, as `train.py --dry-run` runs: a compile that aborts cannot take the suite down with it
    code = ("import json, sys; from comb_jax.config import load_config; from comb_jax.training import trainer; "
            "cfg = load_config('tiny_comb', sys.argv[1:]); print(json.dumps(trainer.dry_run(cfg)))")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", code, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "batch_size=8"],
                          env=env, capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["devices"] == 8 and report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    layout = T.model_layout(cfg.model)
    assert report["trainable_params"] == count_params(layout["comb"])
    assert report["backbone_params"] == count_params(layout["backbone"])
    assert report["optimizer_state_params"] == 2 * report["trainable_params"] + 2
    assert report["per_device_memory_gib"]["arguments"] > 0


def test_gradient_accumulation_equals_one_full_batch_step(tiny_cfg, tiny_params):
    """A micro-batches weighted by their answer tokens give the full batch's token-mean loss and update."""
    cfg = toy_cfg(tiny_cfg, "batch_size=8", "learning_rate=1e-2")
    it = D.train_iterator(toy_examples(16), D.Codec(None), cfg.train)
    batches = [next(it) for _ in range(2)]
    params = jax.tree.map(np.asarray, tiny_params)
    for mesh, accum in ((make_mesh(MeshConfig(1, 1, 1)), 4), (make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)), 2)):
        loss_full, comb_full, _, _ = _run_steps(cfg, mesh, params, batches)
        accum_cfg = apply_overrides(cfg, [f"grad_accum_steps={accum}"])
        loss_acc, comb_acc, _, _ = _run_steps(accum_cfg, mesh, params, batches)
        np.testing.assert_allclose(loss_acc, loss_full, rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), comb_acc, comb_full)
    with pytest.raises(ValueError, match="multiple of data x fsdp x grad_accum_steps"):
        T.check_batch_divides(apply_overrides(cfg, ["grad_accum_steps=3"]), make_mesh(MeshConfig(1, 1, 1)))


def test_eval_at_start_logs_the_untrained_baseline(tiny_cfg, tiny_params, tmp_path):
    """Step 0's eval is the backbone alone (gates 0): its loss is the plain decoder's answer-token cross-entropy."""
    import json

    cfg = toy_cfg(tiny_cfg, "batch_size=4", "mesh.data=1", "steps=1", "eval_every=1", "eval_at_start=true",
                  "teacher_max_tokens=4", f"run_dir={tmp_path / 'run'}")
    eval_examples = toy_examples(4)
    backbone = jax.tree.map(np.asarray, tiny_params["backbone"])
    train(cfg, progress=False, backbone=backbone, examples=(toy_examples(8), eval_examples))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1] and "loss" not in records[0] and "eval_loss" in records[1]

    (batch, real, _), = D.eval_batches(eval_examples, D.Codec(None), cfg.train)
    assert real == 4
    hidden, _ = forward({"backbone": backbone}, jnp.asarray(batch["tokens"]), cfg.model)
    log_probs = jax.nn.log_softmax(lm_logits({"backbone": backbone}, hidden), axis=-1)
    nll = -np.take_along_axis(np.asarray(log_probs), batch["targets"][..., None], axis=-1)[..., 0]
    expected = (nll * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
    np.testing.assert_allclose(records[0]["eval_loss"], expected, rtol=1e-5)

"""Reading recipes: taps at the cross blocks, hidden-state distillation, open attention gates, needle/copy sets."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import toy_cfg, toy_examples

from comb_jax.model.layout import init_params, model_layout
from comb_jax.model.transformer import block, encode, forward, forward_with_taps, rope_tables
from comb_jax.training import data as D
from comb_jax.training import objectives as O
from comb_jax.training import trainer as T
from comb_jax.training.warm_start import init_comb


def _tokens(b, t, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(1, 256, size=(b, t)))


def test_taps_are_the_residual_stream_at_each_cross_layer(tiny_cfg):
    params = init_params(model_layout(tiny_cfg.model), jax.random.key(0))
    m = tiny_cfg.model
    tokens = _tokens(2, 11)
    hidden, taps = forward_with_taps(params, tokens, m)
    # the training forward runs group 0 outside the scan (inference scans it): the same sums, grouped otherwise
    np.testing.assert_allclose(np.asarray(hidden), np.asarray(forward(params, tokens, m)[0]), rtol=1e-5, atol=1e-6)
    # independent reference: run the decoder layers one by one and read the input of layer c_k
    x = params["backbone"]["embed"][tokens]
    cos, sin = rope_tables(m, jnp.broadcast_to(jnp.arange(11), (2, 11)))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((11, 11), bool)), (2, 11, 11))
    expected = {}
    for i in range(m.num_layers):
        if i in m.cross_layers:
            expected[i] = np.asarray(x)
        x, _ = block(x, jax.tree.map(lambda a, i=i: a[i], params["backbone"]["layers"]), m, cos, sin, mask)
    assert taps.shape == (m.num_cross_layers, 2, 11, m.hidden)
    for k, layer in enumerate(m.cross_layers):
        np.testing.assert_allclose(np.asarray(taps[k]), expected[layer], rtol=1e-5, atol=1e-5)


def test_taps_with_closed_gates_equal_the_backbone_and_open_gates_move_them(tiny_cfg, tiny_params):
    closed = init_params(model_layout(tiny_cfg.model), jax.random.key(3))
    tokens = _tokens(1, 9)
    chunk = _tokens(1, 6, seed=2)
    for params, same in ((closed, True), (tiny_params, False)):
        cache = encode(params, chunk, jnp.ones(chunk.shape, bool), tiny_cfg.model)
        _, with_ctx = forward_with_taps(params, tokens, tiny_cfg.model, cache)
        _, without = forward_with_taps(params, tokens, tiny_cfg.model)
        assert np.array_equal(np.asarray(with_ctx), np.asarray(without)) == same


def _batch(cfg, examples):
    return next(D.train_iterator(examples, D.Codec(None), cfg.train))


def test_distillation_terms_vanish_when_the_teacher_sees_what_the_student_sees(tiny_cfg):
    """A teacher given the student's own tokens: at closed gates (Comb == backbone) KL and hidden terms are 0."""
    cfg = toy_cfg(tiny_cfg, "batch_size=4", "kl_weight=1.0", "hidden_weight=1.0", "mesh.data=1",
                  "teacher_buckets=(48, 128)")
    params = init_params(model_layout(cfg.model), jax.random.key(3))  # gates 0: Comb == backbone
    batch = _batch(cfg, toy_examples(4))
    same = dict(batch, teacher_tokens=batch["tokens"],
                teacher_index=np.where(batch["loss_mask"] > 0, np.arange(batch["tokens"].shape[1])[None], 0))
    _, metrics = O.loss_fn(params["comb"], params["backbone"], same, cfg)
    assert abs(float(metrics["kl"])) < 1e-6 and float(metrics["hidden"]) < 1e-10
    # with the real teacher (context inlined) both terms are positive
    _, metrics = O.loss_fn(params["comb"], params["backbone"], batch, cfg)
    assert float(metrics["kl"]) > 1e-4 and float(metrics["hidden"]) > 1e-4
    np.testing.assert_allclose(float(metrics["loss"]),
                               float(metrics["ce"]) + float(metrics["kl"]) + float(metrics["hidden"]), rtol=1e-5)


def test_open_attention_gates_keep_the_backbone_and_let_gradients_reach_the_encoder(tiny_cfg):
    cfg = toy_cfg(tiny_cfg, "batch_size=4", "mesh.data=1", "hidden_weight=1.0", "teacher_buckets=(128,)",
                  "zero_cross_out=true")
    backbone = init_params(model_layout(cfg.model), jax.random.key(3))["backbone"]
    batch = _batch(cfg, toy_examples(4))
    grads = {}
    for gate in (0.0, 0.5):
        c = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init_attn_gate=gate))
        comb = init_comb(c, backbone, jax.random.key(0))
        if gate:
            np.testing.assert_allclose(np.tanh(np.asarray(comb["cross"]["gate_attn"])), gate, rtol=1e-6)
            assert not np.asarray(comb["cross"]["wo"]).any()
        chunk = jnp.asarray(batch["chunk_tokens"][:, 0])
        params = {"backbone": backbone, "comb": comb}
        cache = encode(params, chunk, jnp.asarray(batch["chunk_mask"][:, 0]), cfg.model)
        np.testing.assert_array_equal(np.asarray(forward(params, jnp.asarray(batch["tokens"]), cfg.model, cache)[0]),
                                      np.asarray(forward(params, jnp.asarray(batch["tokens"]), cfg.model)[0]))
        grads[gate] = jax.grad(lambda cb, c=c: O.loss_fn(cb, backbone, batch, c)[0])(comb)
    norm = lambda g: float(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(g)))
    # closed gates: nothing but the gates learns; open gates with o_proj 0: o_proj learns from the first step
    assert norm(grads[0.0]["encoder"]) == 0 and norm(grads[0.0]["cross"]["wo"]) == 0
    assert norm(grads[0.5]["cross"]["wo"]) > 0


def test_needle_set_facts_sit_in_exactly_one_chunk(shared_data):
    from comb_jax.training.needles import copy_examples, needle_examples

    rows = needle_examples(shared_data, "dev", 40, seed=3)
    again = needle_examples(shared_data, "dev", 40, seed=3)
    assert rows == again and len(rows) == 40
    assert rows != needle_examples(shared_data, "dev", 40, seed=4)
    for r in rows:
        assert len(r["chunks"]) == 3
        assert sum(r["answer"] in c for c in r["chunks"]) == 1, r
        assert r["answer"] not in r["question"]
    copies = copy_examples(shared_data, "train", 5)
    assert all(r["answer"] == r["chunks"][0] and len(r["answer"].split()) == 35 for r in copies)


def test_eval_dataset_replaces_the_eval_split(tmp_path, tiny_cfg):
    import json

    for name, n in (("a", 3), ("b", 5)):
        (tmp_path / f"{name}.jsonl").write_text("".join(
            json.dumps({"chunks": [f"c{i}"], "question": f"q{i}", "answer": name}) + "\n" for i in range(n)))
    cfg = toy_cfg(tiny_cfg, f"dataset=jsonl:{tmp_path / 'a.jsonl'}", f"eval_dataset=jsonl:{tmp_path / 'b.jsonl'}",
                  "eval_examples=0")
    assert [e.answer for e in D.run_examples(cfg.train, tmp_path, "train")] == ["a"] * 3
    assert [e.answer for e in D.run_examples(cfg.train, tmp_path, "eval")] == ["b"] * 5
    with pytest.raises(ValueError, match="init_attn_gate"):
        toy_cfg(tiny_cfg, "init_attn_gate=1.0")


def test_training_refuses_whole_context_encoding(tiny_cfg, tmp_path):
    cfg = toy_cfg(tiny_cfg, "model.context_encoding=whole_context", f"run_dir={tmp_path}")
    with pytest.raises(ValueError, match="each chunk on its own"):
        T.train(cfg, progress=False, backbone={}, examples=(toy_examples(4), toy_examples(4)))


def test_kv_objective_trains_the_encoder_alone_towards_the_backbone_kv(tiny_cfg):
    cfg = toy_cfg(tiny_cfg, "batch_size=4", "mesh.data=1", "objective=kv", "learning_rate=3e-3", "warmup_steps=1")
    params = init_params(model_layout(cfg.model), jax.random.key(3))
    batch = _batch(cfg, toy_examples(4))
    loss, grads = jax.value_and_grad(lambda c: O.objective_loss(c, params["backbone"], batch, cfg)[0])(params["comb"])
    assert np.isfinite(float(loss)) and float(loss) > 0
    assert all(not np.asarray(g).any() for g in jax.tree.leaves(grads["cross"]))
    assert all(np.asarray(g).any() for g in jax.tree.leaves(grads["encoder"]["k_proj"]))
    # an encoder whose k/v projections are zero predicts nothing: relative error exactly 1
    zero = dict(params["comb"], encoder=dict(params["comb"]["encoder"],
                                             k_proj=jnp.zeros_like(params["comb"]["encoder"]["k_proj"]),
                                             v_proj=jnp.zeros_like(params["comb"]["encoder"]["v_proj"])))
    np.testing.assert_allclose(float(O.objective_loss(zero, params["backbone"], batch, cfg)[0]), 1.0, rtol=1e-6)
    # the least-squares rescale of k/v projections never raises the error and leaves it at most 1
    calibrated = O.calibrate_kv_scale(params["comb"], params["backbone"], batch, cfg)
    after = float(O.objective_loss(calibrated, params["backbone"], batch, cfg)[0])
    assert after <= min(float(loss), 1.0) + 1e-6
    # a few steps lower it
    from comb_jax.model.sharding import make_mesh

    mesh = make_mesh(cfg.mesh)
    optimizer = T.make_optimizer(cfg.train)
    state = T.init_state(cfg, mesh, optimizer, params["comb"])
    step = T.make_train_step(cfg, mesh, optimizer, batch)
    backbone = T.place_backbone(cfg, mesh, params["backbone"])
    losses = []
    for _ in range(10):
        state, metrics = step(state, backbone, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.7 * losses[0], losses


def test_pointer_init_writes_the_attended_token_towards_its_lm_head_row(tiny_cfg):
    """init=pointer: encoder block k is decoder layer k; a cross block that attends to one chunk token adds
    tanh(gate) * final_norm * P P^T (the token's encoder output) to the residual stream, P orthonormal."""
    cfg = toy_cfg(tiny_cfg, "init=pointer")
    m = cfg.model
    backbone = init_params(model_layout(m), jax.random.key(3))["backbone"]
    comb = init_comb(cfg, backbone, jax.random.key(0))
    for name in ("wq", "wo", "w_down"):
        np.testing.assert_array_equal(np.asarray(comb["encoder"]["layers"][name]),
                                      np.asarray(backbone["layers"][name][:m.num_cross_layers]))
    proj = np.asarray(comb["encoder"]["v_proj"][0]).reshape(m.hidden, -1)  # [hidden, K*D]
    np.testing.assert_allclose(proj.T @ proj, np.eye(proj.shape[1]), atol=1e-5)
    np.testing.assert_allclose(np.tanh(np.asarray(comb["cross"]["gate_attn"])), 0.5, rtol=1e-6)
    params = {"backbone": backbone, "comb": comb}
    token = jnp.asarray([[77]])
    cache = encode(params, token, jnp.ones((1, 1), bool), m)
    prompt = _tokens(1, 5)
    _, read = forward_with_taps(params, prompt, m, cache)
    _, plain = forward_with_taps(params, prompt, m)
    # independent reference: the encoder's first block on the lone token, then g * P P^T of it
    cos, sin = rope_tables(m, jnp.zeros((1, 1), jnp.int32))
    layer0 = jax.tree.map(lambda a: a[0], backbone["layers"])
    x_enc, _ = block(backbone["embed"][token], layer0, m, cos, sin, jnp.ones((1, 1, 1), bool))
    expected = 0.5 * np.asarray(backbone["final_norm"]) * (proj @ (proj.T @ np.asarray(x_enc[0, 0])))
    delta = np.asarray(read[0, 0] - plain[0, 0])  # every prompt position gets the same write
    np.testing.assert_allclose(delta, np.broadcast_to(expected, delta.shape), rtol=1e-4, atol=1e-5)


def test_grow_starts_from_the_one_block_comb_and_adds_reading_blocks_below(tiny_cfg, tmp_path):
    """init=grow: with the new blocks' gates closed, the grown E=2 Comb gives the one-block Comb's logits (to float32
    rounding: the new encoder block passes its input through; the last cross block is the trained one)."""
    from comb_jax.training.warm_start import grow_comb, pointer_comb

    one_cfg = toy_cfg(tiny_cfg, "model.num_cross_layers=1", "init=pointer")
    two_cfg = toy_cfg(tiny_cfg, "model.num_cross_layers=2", "init=grow")
    backbone = init_params(model_layout(one_cfg.model), jax.random.key(3))["backbone"]
    one = pointer_comb(one_cfg, backbone, jax.random.key(1))
    one["cross"]["gate_mlp"] = one["cross"]["gate_mlp"] + 0.4  # every part of the trained block acts
    grown = grow_comb(two_cfg, backbone, one, jax.random.key(2))
    np.testing.assert_allclose(np.tanh(np.asarray(grown["cross"]["gate_attn"][0])), 0.1, rtol=1e-5)
    assert float(grown["cross"]["gate_mlp"][0]) == 0.0
    closed = dict(grown, cross=dict(grown["cross"], gate_attn=grown["cross"]["gate_attn"].at[0].set(0.0)))
    chunk = _tokens(2, 12)
    prompt = _tokens(2, 6)
    mask = jnp.ones(chunk.shape, bool)
    logits = {}
    for name, cfg, comb in (("one", one_cfg, one), ("grown", two_cfg, closed), ("open", two_cfg, grown)):
        params = {"backbone": backbone, "comb": comb}
        logits[name] = np.asarray(forward(params, prompt, cfg.model, encode(params, chunk, mask, cfg.model))[0])
    # the same arithmetic in another layer grouping (E groups of N/E layers): equal up to float32 summation order
    np.testing.assert_allclose(logits["grown"], logits["one"], rtol=0, atol=2e-6)
    assert np.abs(logits["open"] - logits["one"]).max() > 1e-4  # the new block reads once its gate opens
    with pytest.raises(ValueError, match="num_cross_layers must be >= 2"):
        grow_comb(one_cfg, backbone, one, jax.random.key(2))
    with pytest.raises(ValueError, match="init=grow needs train.init_checkpoint"):
        init_comb(two_cfg, backbone, jax.random.key(0))

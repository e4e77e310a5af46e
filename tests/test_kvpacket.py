"""KV Packet on tiny_comb random weights: the P=0 packet is naive reuse, the trailer is the backbone reading soft
tokens after the document, training and serving assemble the same cache, and a training step lowers the loss."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from comb_jax.eval import kvpacket as kvpacket_eval
from comb_jax.eval.pic_modes import PicRunner, _pad, chunk_kv, packet_kv
from comb_jax.eval.reading import reading_nlls
from comb_jax.methods import kvpacket
from comb_jax.model.buckets import power_of_two as bucket
from comb_jax.text.prompt import Segments
from comb_jax.training.kvpacket_data import collate
from comb_jax.weights.adapter import load_adapter

TOL = 1e-5
rng = np.random.default_rng(3)
PREFIX = tuple(int(i) for i in rng.integers(1, 256, 7))
CHUNKS = tuple(tuple(int(i) for i in rng.integers(1, 256, n)) for n in (13, 11, 9))
SUFFIX = tuple(int(i) for i in rng.integers(1, 256, 6))
ANSWER = [int(i) for i in rng.integers(1, 256, 5)]


def seg(chunks=CHUNKS):
    return Segments(PREFIX, tuple(chunks), SUFFIX, SUFFIX)


def with_adapter(params, adapter):
    return {**params, "kvpacket": jax.tree.map(jnp.asarray, adapter)}


def random_adapter(params, p, seed=0):
    return kvpacket.init_kvpacket(params["backbone"], p, key=jax.random.key(seed), noise=1.0)


def test_zero_adapter_is_naive_reuse(tiny_cfg, tiny_params):
    params = with_adapter(tiny_params, kvpacket.init_kvpacket(tiny_params["backbone"], 0))
    runner = PicRunner(params, tiny_cfg.model, max_new_tokens=4)
    for s in (seg(), seg(CHUNKS[::-1])):
        naive, packet = runner.answer("naive", s), runner.answer("kvpacket", s)
        assert packet.tokens == naive.tokens
        np.testing.assert_array_equal(packet.last_hidden, naive.last_hidden)
        np.testing.assert_array_equal(np.asarray(packet.kv_cache.k), np.asarray(naive.kv_cache.k))
        np.testing.assert_array_equal(np.asarray(packet.kv_cache.v), np.asarray(naive.kv_cache.v))
    assert runner.cache_bytes_per_token("kvpacket") == runner.cache_bytes_per_token("naive")


def test_trailer_is_the_backbone_reading_soft_tokens_after_the_document(tiny_cfg, tiny_params):
    """A trailer holding real tokens' embeddings gives exactly the KV of the document followed by those tokens."""
    extra = (5, 17, 250)
    adapter = {"trailer": np.asarray(tiny_params["backbone"]["embed"])[list(extra)]}
    runner = PicRunner(with_adapter(tiny_params, adapter), tiny_cfg.model, max_new_tokens=2)
    k, v = packet_kv(runner, CHUNKS[0])
    ids = CHUNKS[0] + extra
    ref_k, ref_v = chunk_kv(tiny_params, _pad(ids, bucket(len(ids))), jnp.int32(len(ids)), cfg=tiny_cfg.model)
    np.testing.assert_allclose(k, np.asarray(ref_k[:, : len(ids)]), atol=TOL, rtol=TOL)
    np.testing.assert_allclose(v, np.asarray(ref_v[:, : len(ids)]), atol=TOL, rtol=TOL)


def batch_for(tiny_cfg, segments):
    features = [{"prefix": list(s.prefix), "chunks": [list(c) for c in s.chunks], "suffix": list(s.suffix),
                 "answer": ANSWER} for s in segments]
    tc = dataclasses.replace(tiny_cfg.train, chunk_buckets=(16, 32), decoder_buckets=(16, 32),
                             teacher_buckets=(64, 128))
    return {k: jnp.asarray(v) for k, v in collate(features, tc).items()}


def test_training_student_matches_serving(tiny_cfg, tiny_params):
    """The training forward (one batch, padded chunks) sees the same cache as the serving mode."""
    adapter = random_adapter(tiny_params, 3)
    runner = PicRunner(with_adapter(tiny_params, adapter), tiny_cfg.model, max_new_tokens=2)
    segments = [seg(), seg(CHUNKS[1:])]  # the second row has a padding chunk
    batch = batch_for(tiny_cfg, segments)
    hidden = kvpacket.student_hidden(jax.tree.map(jnp.asarray, adapter), tiny_params["backbone"], batch,
                                     tiny_cfg.model)
    for row, s in enumerate(segments):
        served = runner.answer("kvpacket", s)
        np.testing.assert_allclose(np.asarray(hidden[row, len(SUFFIX) - 1]), served.last_hidden, atol=1e-4,
                                   rtol=1e-4)


def test_training_step_lowers_the_loss_and_trains_only_the_adapter(tiny_cfg, tiny_params):
    """The Comb trainer's sharded jit step with train.objective=kvpacket: only the trailer has state and moves."""
    from comb_jax.config import apply_overrides
    from comb_jax.model.sharding import make_mesh
    from comb_jax.training import trainer as T

    cfg = apply_overrides(tiny_cfg, ["objective=kvpacket", "kvpacket_tokens=4", "learning_rate=3e-2",
                                     "warmup_steps=1", "weight_decay=0", "batch_size=2", "mesh.data=1"])
    batch = batch_for(tiny_cfg, [seg(), seg(CHUNKS[::-1])])
    adapter = random_adapter(tiny_params, 4, seed=1)
    backbone_before = jax.tree.map(np.copy, jax.tree.map(np.asarray, tiny_params["backbone"]))
    loss = lambda a: float(kvpacket.kvpacket_loss(a, tiny_params["backbone"], batch, cfg)[0])  # noqa: E731
    before = loss(jax.tree.map(jnp.asarray, adapter))
    mesh = make_mesh(cfg.mesh)
    optimizer = T.make_optimizer(cfg.train)
    state = T.init_state(cfg, mesh, optimizer, adapter)
    backbone = T.place_backbone(cfg, mesh, tiny_params["backbone"])
    step = T.make_train_step(cfg, mesh, optimizer, batch)
    for _ in range(5):
        state, metrics = step(state, backbone, batch)
    assert before > 0 and float(metrics["kl"]) > 0
    assert loss(state.comb) < before
    assert set(state.comb) == {"trailer"}  # only the adapter is trained: the backbone is an argument, never returned
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), backbone, backbone_before)


def test_train_py_trains_kvpacket_with_exact_resume_and_writes_the_adapter(tiny_cfg, tiny_params, tmp_path):
    """`training.train` with objective=kvpacket: metrics and held-out eval logged, a run killed after step 2 and
    resumed ends bit-identical to one that never stopped, and adapter.safetensors holds the final trailer."""
    import json

    from train_helpers import toy_cfg, toy_examples

    from comb_jax.cli.train import train

    backbone = jax.tree.map(np.asarray, tiny_params["backbone"])
    examples = (toy_examples(8), toy_examples(4))

    def cfg_for(run):
        return toy_cfg(tiny_cfg, "objective=kvpacket", "kvpacket_tokens=3", "batch_size=2", "mesh.data=1", "steps=4",
                       "checkpoint_every=2", "eval_every=2", "eval_examples=4", "learning_rate=1e-2",
                       "train.chunk_buckets=(32,)", "decoder_buckets=(48,)", "targets=gold", f"run_dir={run}")

    whole = train(cfg_for(tmp_path / "whole"), progress=False, backbone=backbone, examples=examples)
    train(cfg_for(tmp_path / "cut"), progress=False, backbone=backbone, examples=examples, stop_after=2)
    resumed = train(cfg_for(tmp_path / "cut"), resume=True, progress=False, backbone=backbone, examples=examples)
    assert resumed["start_step"] == 2 and resumed["end_step"] == 4
    final = np.asarray(whole["state"].comb["trailer"])
    np.testing.assert_array_equal(np.asarray(resumed["state"].comb["trailer"]), final)
    assert final.shape == (3, tiny_cfg.model.hidden)
    np.testing.assert_array_equal(load_adapter(tmp_path / "whole")["trailer"], final)
    records = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["kl"] > 0 and "gate_attn" not in r for r in records)
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(r["eval_loss"] >= 0 and r["eval_kl_naive"] >= 0 and "eval_gap_closed" in r for r in evals)


@pytest.mark.parametrize("p", [0, 2])
def test_packet_slots(tiny_cfg, tiny_params, p):
    runner = PicRunner(with_adapter(tiny_params, random_adapter(tiny_params, p)), tiny_cfg.model, max_new_tokens=2)
    answer = runner.answer("kvpacket", seg())
    assert int(answer.kv_cache.lengths[0]) == len(seg().full) + p * len(CHUNKS)


def test_reading_nlls_zero_adapter_reads_like_naive(tiny_cfg, tiny_params):
    from comb_jax.training.data import Example

    examples = [Example(f"e{i}", ("alpha beta gamma " * (i + 1), "delta epsilon"), f"what {i}?", "beta", ("beta",))
                for i in range(3)]
    read = lambda adapter: reading_nlls(examples, kvpacket_eval.kvpacket_reading(tiny_cfg, tiny_params["backbone"],
                                                                                 adapter, batch_size=2))
    zero = read(kvpacket.init_kvpacket(tiny_params["backbone"], 0))
    assert zero["nll_kvpacket"] == zero["nll_naive"] and zero["kl_kvpacket"] == zero["kl_naive"] >= 0
    assert zero["requests"] == 3
    assert zero["nll_none"] != zero["nll_full"]
    trained = read(random_adapter(tiny_params, 2))
    assert trained["nll_naive"] == pytest.approx(zero["nll_naive"]) and trained["nll_kvpacket"] != zero["nll_naive"]

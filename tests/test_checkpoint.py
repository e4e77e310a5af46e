"""Checkpoints: exact resume after a kill, restore_comb_params round trip, clear errors for bad checkpoints."""

import shutil

import jax
import numpy as np
import pytest
from train_helpers import checkpointed_run_cfg, toy_examples

from comb_jax.cli.train import train
from comb_jax.errors import CheckpointError
from comb_jax.training import checkpoint as ckpt
from comb_jax.weights.run_dir import restore_comb_params


def test_resume_after_kill_continues_exactly(tiny_cfg, tiny_params, tmp_path, monkeypatch):
    def cfg_for(name):
        return checkpointed_run_cfg(tiny_cfg, tmp_path / name, steps=5, keep=2)

    examples = (toy_examples(12), [])
    backbone = jax.tree.map(np.asarray, tiny_params["backbone"])
    full = train(cfg_for("full"), progress=False, backbone=backbone, examples=examples)
    # killed after step 3: the last checkpoint is step 2, so steps 3..5 are replayed from it
    train(cfg_for("killed"), progress=False, backbone=backbone, examples=examples, stop_after=3)
    resumed = train(cfg_for("killed"), resume=True, progress=False, backbone=backbone, examples=examples)
    assert resumed["start_step"] == 2 and resumed["end_step"] == 5
    assert resumed["losses"] == full["losses"][2:]  # bit-identical losses

    # keep_checkpoints=2: steps 4 and 5 remain
    run = tmp_path / "full"
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["4", "5"]
    # restore_comb_params round trip: run dir (latest, no eval metrics), one step dir, a relative run dir
    final = jax.tree.map(np.asarray, full["state"].comb)
    monkeypatch.chdir(tmp_path)
    for where in (run, run / "checkpoints" / "5", "full"):
        restored = restore_comb_params(str(where), tiny_cfg)
        jax.tree.map(np.testing.assert_array_equal, restored, final)
        assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(restored))

    # an existing run without --resume is refused
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg_for("full"), progress=False, backbone=backbone, examples=examples)

    # corrupt: a truncated array file in the step's comb item
    bad = tmp_path / "bad"
    shutil.copytree(run / "checkpoints" / "5", bad)
    for f in (bad / "comb").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    with pytest.raises(CheckpointError, match=str(bad / "comb")):
        restore_comb_params(str(bad), tiny_cfg)


def test_missing_checkpoints_raise_naming_the_path(tiny_cfg, tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        restore_comb_params(str(tmp_path / "nowhere"), tiny_cfg)
    (tmp_path / "empty_run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint steps"):
        restore_comb_params(str(tmp_path / "empty_run"), tiny_cfg)


def test_keeps_the_best_by_eval_loss_and_restores_it_by_default(tiny_cfg, tiny_params, tmp_path):
    comb = jax.tree.map(np.asarray, tiny_params["comb"])
    manager = ckpt.make_manager(tmp_path / "checkpoints", keep=2)
    for step, eval_loss in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 2.5)]:
        scaled = jax.tree.map(lambda x, s=step: x * s, comb)  # each step's params are told apart by the scale
        ckpt.save(manager, step, scaled, {"mu": np.zeros(3)}, {"epoch": 0}, tiny_cfg, eval_loss=eval_loss)
    manager.wait_until_finished()
    manager.close()
    kept = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == [2, 3, 4]  # the last 2, plus step 2 with the lowest eval loss
    scale_of = {s: jax.tree.map(lambda x, s=s: x * s, comb) for s in kept}
    best = restore_comb_params(str(tmp_path), tiny_cfg)
    jax.tree.map(np.testing.assert_array_equal, best, scale_of[2])
    latest = restore_comb_params(str(tmp_path), tiny_cfg, prefer="latest")
    jax.tree.map(np.testing.assert_array_equal, latest, scale_of[4])

"""Training faults: the NaN guard keeps the state from before a non-finite step, a corrupt checkpoint falls back
to the newest one that restores, configs are validated when built, and CLI errors are one line with status 2."""

import dataclasses
import logging
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from train_helpers import checkpointed_run_cfg, toy_examples

from comb_jax.cli.train import train
from comb_jax.config import CONFIG_DIR, ConfigError, load_config, validate
from comb_jax.errors import CheckpointError, run
from comb_jax.training import checkpoint as ckpt
from comb_jax.training import data as D
from comb_jax.training import trainer as T
from comb_jax.weights.run_dir import restore_comb_params

REPO = Path(__file__).resolve().parents[1]


def _poisoned(bad_batch: int):
    """train_iterator whose `bad_batch`-th batch (1-based) carries an inf in its loss mask: the loss is not finite."""
    real = D.train_iterator

    class Poisoned:
        def __init__(self, *args, **kwargs):
            self.it, self.drawn = real(*args, **kwargs), 0

        def __iter__(self):
            return self

        def __next__(self):
            batch = dict(next(self.it))
            self.drawn += 1
            if self.drawn == bad_batch:
                mask = np.array(batch["loss_mask"], np.float32)
                row, col = np.argwhere(mask > 0)[0]
                mask[row, col] = np.inf
                batch["loss_mask"] = mask
            return batch

        def get_state(self):
            return self.it.get_state()

        def set_state(self, state):
            self.it.set_state(state)

    return Poisoned


def test_nan_guard_keeps_and_saves_the_state_from_before_the_bad_step(tiny_cfg, tiny_params, tmp_path, monkeypatch):
    def cfg_for(name):
        return checkpointed_run_cfg(tiny_cfg, tmp_path / name, steps=6, keep=5)

    examples = (toy_examples(12), [])
    backbone = jax.tree.map(np.asarray, tiny_params["backbone"])
    clean = train(cfg_for("clean"), progress=False, backbone=backbone, examples=examples, stop_after=3)
    after_3 = jax.tree.map(np.asarray, clean["state"].comb)

    monkeypatch.setattr(D, "train_iterator", _poisoned(bad_batch=4))
    with pytest.raises(T.TrainingDiverged, match=r"loss is nan at step 4 .*not applied.*state before it \(step 3\)"):
        train(cfg_for("poisoned"), progress=False, backbone=backbone, examples=examples)
    root = tmp_path / "poisoned" / "checkpoints"
    assert sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) == [2, 3]
    kept = restore_comb_params(str(root / "3"), tiny_cfg)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(kept))
    jax.tree.map(np.testing.assert_array_equal, kept, after_3)  # the weights from before step 4, bit for bit


# ----------------------------------------------------------------------------------------------------------
# Checkpoint fallback


def _save_steps(root, tiny_cfg, comb, steps):
    manager = ckpt.make_manager(root, keep=len(steps))
    for s in steps:
        ckpt.save(manager, s, jax.tree.map(lambda x, s=s: x * s, comb), {"mu": np.full(3, s, np.float32)},
                  {"epoch": s}, tiny_cfg)
    manager.wait_until_finished()
    manager.close()


def _corrupt(step_dir: Path):
    for f in (step_dir / "comb").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])


def _abstract(tree):
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=sharding), tree)


def test_corrupt_latest_checkpoint_falls_back_with_one_line(tiny_cfg, tiny_params, tmp_path, caplog):
    comb = jax.tree.map(np.asarray, tiny_params["comb"])
    root = tmp_path / "run" / "checkpoints"
    _save_steps(root, tiny_cfg, comb, (1, 2, 3))
    _corrupt(root / "3")
    caplog.set_level(logging.WARNING, logger="comb_jax.weights.run_dir")

    # serving / export: the run dir falls back to step 2 and says so in one line
    restored = restore_comb_params(str(tmp_path / "run"), tiny_cfg)
    jax.tree.map(np.testing.assert_array_equal, restored, jax.tree.map(lambda x: x * 2, comb))
    [warning] = [r.getMessage() for r in caplog.records if r.name == "comb_jax.weights.run_dir"]
    assert warning.startswith("skipping checkpoint step 3: ") and "\n" not in warning and len(warning) < 260
    with pytest.raises(CheckpointError, match="3/comb is missing or corrupt"):  # a step named explicitly: no fallback
        restore_comb_params(str(root / "3"), tiny_cfg)

    # training resume: step 2 restores, step 3 is set aside (kept) so that step 3 can be saved again
    caplog.clear()
    manager = ckpt.make_manager(root, keep=3)
    got_comb, opt, step, data = ckpt.restore(manager, manager.latest_step(), _abstract(comb),
                                             _abstract({"mu": np.zeros(3, np.float32)}))
    assert (step, data, float(opt["mu"][0])) == (2, {"epoch": 2}, 2.0)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b * 2), got_comb, comb)
    assert any(m.startswith("skipping checkpoint step 3: ") for m in (r.getMessage() for r in caplog.records))
    assert (root.parent / "checkpoints.corrupt" / "3" / "comb").is_dir() and not (root / "3").exists()
    assert manager.latest_step() == 2
    ckpt.save(manager, 3, comb, {"mu": np.zeros(3, np.float32)}, {"epoch": 3}, tiny_cfg)
    manager.wait_until_finished()
    manager.close()

    # every step broken: one error that lists each step and why, on one line
    for s in (1, 2, 3):
        _corrupt(root / str(s))
    manager = ckpt.make_manager(root, keep=3)
    with pytest.raises(CheckpointError) as err:
        ckpt.restore(manager, 3, _abstract(comb), _abstract({"mu": np.zeros(3, np.float32)}))
    manager.close()
    message = str(err.value)
    assert "no checkpoint" in message and all(f"step {s}:" in message for s in (1, 2, 3)) and "\n" not in message


# ----------------------------------------------------------------------------------------------------------
# Config validation and CLI errors


@pytest.mark.parametrize("override, message", [
    ("checkpoint_every=0", "train.checkpoint_every=0 must be >= 1"),
    ("keep_checkpoints=0", "train.keep_checkpoints=0 must be >= 1"),
    ("steps=True", "train.steps: expected int, got the boolean 'True'"),
    ("warmup_steps=-5", "train.warmup_steps=-5 must be >= 0"),
    ("learning_rate=1e400", "train.learning_rate=inf: expected a finite number"),
    ("batch_size=0", "train.batch_size=0 must be >= 1"),
    ("mesh.data=0", "mesh.data=0 must be -1"),
    ("serve.max_batch=0", "serve.max_batch=0 must be >= 1"),
    ("serve.prompt_buckets=()", r"serve.prompt_buckets=\(\) must be a non-empty tuple"),
    ("serve.pool_fraction=1.5", r"serve.pool_fraction=1.5 must be in \[0, 1\)"),
    ("context_encoding=whole", "model.context_encoding='whole' must be one of per_chunk, whole_context"),
    ("schedule=linear", "train.schedule='linear' must be one of constant, cosine"),
    ("model.head_dim=15", "model.head_dim=15 must be a positive even number"),
    ("model.num_kv_heads=3", "num_heads=4 is not a multiple of num_kv_heads=3"),
])
def test_bad_config_values_fail_when_the_config_is_built(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny_comb", [override])


def test_config_files_are_validated_too_and_only_come_from_configs(tmp_path):
    cfg = load_config("tiny_comb")
    with pytest.raises(ConfigError, match="train.steps=True: expected an integer"):
        validate(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=True)))
    with pytest.raises(ConfigError, match=r"serve.chunk_buckets=\(16, 2.5\): expected a tuple of integers"):
        validate(dataclasses.replace(cfg, serve=dataclasses.replace(cfg.serve, chunk_buckets=(16, 2.5))))
    assert load_config(str(CONFIG_DIR / "tiny_comb.py")).name == "tiny_comb"
    assert load_config("tiny_comb.py").name == "tiny_comb"
    outside = tmp_path / "evil.py"
    outside.write_text("raise SystemExit('executed')\n")
    for name in (str(outside), "../tests/conftest", str(CONFIG_DIR / ".." / "train.py"), "/etc/passwd", ""):
        with pytest.raises(ConfigError, match="unknown config"):
            load_config(name)


@pytest.mark.parametrize("prog, argv, message", [
    ("train.py", ["--config", "tiny_comb", "checkpoint_every=0"], "train.checkpoint_every=0 must be >= 1"),
    ("train.py", [], "the following arguments are required: --config"),
    ("train.py", ["--config", "/etc/passwd"], "unknown config '/etc/passwd'"),
    ("serve.py", ["--config", "tiny_comb", "steps=True"], "train.steps: expected int"),
    ("serve.py", ["--mode", "fast"], "argument --mode: invalid choice"),
    ("python -m comb_jax.export", ["--config", "tiny_comb", "--out", "x", "nope=1"], "unknown config key 'nope'"),
])
def test_cli_errors_are_one_line_and_status_2(prog, argv, message, capsys):
    import serve
    import train
    from comb_jax import export

    main = {"train.py": train.main, "serve.py": serve.main, "python -m comb_jax.export": export.main}[prog]
    with pytest.raises(SystemExit) as exit_info:
        run(main, prog, argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"{prog}: error: ") and message in err


def test_cli_error_as_a_process_has_no_traceback():
    out = subprocess.run([sys.executable, "train.py", "--config", "tiny_comb", "steps=True"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "train.py: error: train.steps: expected int, got the boolean 'True'"]

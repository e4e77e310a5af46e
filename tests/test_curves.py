"""Training curves: metrics.jsonl reading (resumed steps, clear errors), moving average, a PNG per call."""

import json

import numpy as np
import pytest

from comb_jax.training.curves import main, moving_average, read_metrics


def _write_run(path, losses, evals=()):
    path.mkdir()
    with (path / "metrics.jsonl").open("w") as f:
        for step, loss in enumerate(losses, start=1):
            f.write(json.dumps({"step": step, "loss": loss}) + "\n")
        for step, eval_loss in evals:  # a resumed run writes its steps again: the later record wins
            f.write(json.dumps({"step": step, "loss": 0.5, "eval_loss": eval_loss, "eval_f1": 0.1,
                                "eval_f1_target": 0.2}) + "\n")


def test_moving_average_by_hand():
    np.testing.assert_allclose(moving_average([1, 2, 3, 4], 2), [1.0, 1.5, 2.5, 3.5])
    np.testing.assert_allclose(moving_average([4, 2], 10), [4.0, 3.0])


def test_reads_runs_and_writes_a_png(tmp_path):
    _write_run(tmp_path / "warm", [3.0, 2.0, 1.0], evals=[(3, 1.5)])
    _write_run(tmp_path / "random", [3.0, 2.5, 2.0])
    records = read_metrics(tmp_path / "warm")
    assert [r["step"] for r in records] == [1, 2, 3] and records[-1]["eval_loss"] == 1.5
    out = main([str(tmp_path / "warm"), str(tmp_path / "random"), "--out", str(tmp_path / "c.png")])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl does not exist"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2}\nnot json\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2: not valid JSON"):
        read_metrics(tmp_path)

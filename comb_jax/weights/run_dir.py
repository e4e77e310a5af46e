"""Reading the trained params out of a train.py run: `RUN_DIR/checkpoints/STEP/comb` (Orbax).

Training writes these checkpoints (`training.checkpoint`); serving, eval, export and warm starts read them here,
through `restore_comb_params`. The manager's layout and retention policy are defined here once, for both.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from comb_jax.errors import CheckpointError
from comb_jax.model.layout import abstract_params, check_shapes, model_layout

log = logging.getLogger("comb_jax.weights.run_dir")


def is_url(path) -> bool:
    """Whether `path` names a file system by URL (gs://bucket/run, s3://...), not a local path."""
    return "://" in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
    """A checkpoint location: a local path made absolute (Orbax wants absolute paths; users pass relative ones),
    or a URL such as `gs://bucket/run` kept as one, read and written through etils.epath (never resolved as local).
    """
    if is_url(path):
        return epath.Path(os.fspath(path))
    return epath.Path(Path(path).resolve())


def checkpoint_root(run_dir: str | os.PathLike) -> epath.Path:
    return as_path(run_dir) / "checkpoints"


def make_manager(directory: str | os.PathLike, keep: int, read_only: bool = False) -> ocp.CheckpointManager:
    """Manager over a checkpoints directory (`checkpoint_root(run_dir)` for a run)."""
    policy = ocp.checkpoint_managers.AnyPreservationPolicy([
        ocp.checkpoint_managers.LatestN(n=keep),
        # BestN keeps the last n after sorting; reverse=True puts the lowest eval loss last
        ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: m["eval_loss"], reverse=True, n=1,
                                      keep_checkpoints_without_metrics=False),
    ])
    # best_fn is what makes Orbax write each step's metrics to disk (retention is the policy's job)
    options = ocp.CheckpointManagerOptions(preservation_policy=policy, enable_async_checkpointing=True,
                                           best_fn=lambda m: m["eval_loss"], best_mode="min",
                                           create=not read_only, read_only=read_only)
    return ocp.CheckpointManager(as_path(directory), options=options,
                                 item_names=("comb", "opt", "data", "config"))


def reason(e: BaseException, limit: int = 200) -> str:
    """One line saying why a checkpoint did not restore (orbax errors can span hundreds of lines)."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    text = f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _step_dirs(root: epath.Path) -> list[int]:
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit())


def _metric(manager, step):
    try:
        return (manager.metrics(step) or {}).get("eval_loss")
    except Exception:  # unreadable metrics: the step is just not ranked
        return None


def _candidate_step_dirs(checkpoint_dir: str | os.PathLike, prefer: str) -> list[epath.Path]:
    """Step dirs to try in order: a step dir alone; for a run or checkpoints dir, the best by eval loss (unless
    `prefer="latest"`), then every step from the latest down."""
    path = as_path(checkpoint_dir)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    if (path / "comb").is_dir():
        return [path]
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    steps = _step_dirs(root)
    if not steps:
        raise FileNotFoundError(f"no checkpoint steps under {root}")
    order = steps[::-1]
    if prefer == "best":
        manager = make_manager(root, keep=len(steps), read_only=True)
        losses = {s: _metric(manager, s) for s in steps}
        manager.close()
        scored = [s for s in steps if losses[s] is not None]
        if scored:  # lowest eval loss; the later step on a tie
            best = min(scored, key=lambda s: (losses[s], -s))
            order = [best] + [s for s in order if s != best]
    return [root / str(s) for s in order]


def restore_comb_params(checkpoint_dir: str, cfg, prefer: str = "best") -> dict:
    """Trainable params as host numpy arrays, structured like `model_layout(cfg.model)["comb"]`.

    `checkpoint_dir` is a run dir, its `checkpoints/` dir (take the best step by eval loss, else the latest;
    `prefer="latest"` always takes the latest) or one step dir. A run or checkpoints dir falls back to the next
    step when one does not restore cleanly, logging one line per step skipped; a step dir given by name, or a run
    whose every step is broken, raises CheckpointError naming the path.
    """
    candidates = _candidate_step_dirs(checkpoint_dir, prefer)
    errors = []
    for step_dir in candidates:
        try:
            return _restore_comb_dir(step_dir, cfg)
        except (CheckpointError, FileNotFoundError, ValueError) as e:
            if len(candidates) == 1:
                raise
            errors.append((step_dir, e))
            log.warning("skipping checkpoint step %s: %s", step_dir.name, reason(e.__cause__ or e))
    raise CheckpointError(f"no checkpoint under {candidates[0].parent} restores cleanly: "
                          + "; ".join(f"step {d.name}: {reason(e.__cause__ or e, 120)}" for d, e in errors))


def _restore_comb_dir(step_dir: epath.Path, cfg) -> dict:
    comb_dir = step_dir / "comb"
    if not comb_dir.is_dir():
        raise FileNotFoundError(f"checkpoint {step_dir} has no 'comb' item")
    layout = model_layout(cfg.model)["comb"]
    target = abstract_params(layout)
    restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(restore_type=np.ndarray), target)
    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            comb = ckptr.restore(comb_dir, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args))
    except Exception as e:
        raise CheckpointError(f"checkpoint {comb_dir} is missing or corrupt: {reason(e)}") from e
    comb = jax.tree.map(np.asarray, comb)
    check_shapes(layout, comb, where=str(comb_dir))
    return comb

"""Orbax checkpoints of a training run: `RUN_DIR/checkpoints/STEP/{comb,opt,data,config}`, saved and resumed.

- comb: the trainable parameters (what serving and export need);
- opt: {"step", "opt_state"};
- data: the grain iterator state (JSON);
- config: the full Config as JSON.
The manager (`weights.run_dir.make_manager`) saves asynchronously and keeps the last `keep_checkpoints` steps plus
the best by eval loss; serving, eval and export read the comb params back through `weights.run_dir`.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from comb_jax.errors import CheckpointError
from comb_jax.weights.run_dir import checkpoint_root, make_manager, reason

log = logging.getLogger("comb_jax.training.checkpoint")
__all__ = ["CheckpointError", "checkpoint_root", "make_manager", "restore", "save", "set_aside"]


def save(manager: ocp.CheckpointManager, step: int, comb, opt_state, data_state: dict, cfg,
         eval_loss: float | None = None) -> None:
    """Start an async save of one step (device arrays are copied before this returns)."""
    metrics = None if eval_loss is None else {"eval_loss": float(eval_loss)}
    manager.save(step, metrics=metrics, args=ocp.args.Composite(
        comb=ocp.args.StandardSave(comb),
        opt=ocp.args.StandardSave({"step": np.asarray(step, np.int64), "opt_state": opt_state}),
        data=ocp.args.JsonSave(_jsonable(data_state)),
        config=ocp.args.JsonSave(dataclasses.asdict(cfg)),
    ))


def _jsonable(tree):
    if isinstance(tree, dict):
        return {k: _jsonable(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_jsonable(v) for v in tree]
    if isinstance(tree, (np.integer, np.floating)):
        return tree.item()
    return tree


def _restore_step(manager: ocp.CheckpointManager, step: int, abstract_comb, abstract_opt_state):
    try:
        out = manager.restore(step, args=ocp.args.Composite(
            comb=ocp.args.StandardRestore(abstract_comb),
            opt=ocp.args.StandardRestore({"step": jax.ShapeDtypeStruct((), np.int64),
                                          "opt_state": abstract_opt_state}),
            data=ocp.args.JsonRestore(),
        ))
        values = (out["comb"], out["opt"]["opt_state"], int(out["opt"]["step"]), out["data"])
    except Exception as e:  # orbax raises many types for truncated or tampered files
        raise CheckpointError(f"checkpoint {manager.directory / str(step)} is missing or corrupt: {reason(e)}") from e
    if values[2] != step:
        raise CheckpointError(f"checkpoint {manager.directory / str(step)} holds step {values[2]}, not {step}")
    return values


def set_aside(directory: Path, step: int) -> Path:
    """Move a step dir that does not restore to `checkpoints.corrupt/STEP[.n]` beside it (kept, never deleted)."""
    target_dir = directory.parent / f"{directory.name}.corrupt"
    target_dir.mkdir(exist_ok=True)
    target, n = target_dir / str(step), 1
    while target.exists():
        target, n = target_dir / f"{step}.{n}", n + 1
    (directory / str(step)).rename(target)
    return target


def restore(manager: ocp.CheckpointManager, step: int, abstract_comb, abstract_opt_state):
    """(comb, opt_state, step, data_state) of `step`, placed like the abstract trees' shardings.

    If `step` does not restore cleanly, the newest earlier step that does is restored instead: each step skipped
    is logged as one line (which step, why) and moved to `checkpoints.corrupt/` so training can save it again.
    Raises CheckpointError, listing every step and why, when none restores.
    """
    candidates = sorted((s for s in manager.all_steps() if s <= step), reverse=True) or [step]
    skipped = []
    for s in candidates:
        try:
            values = _restore_step(manager, s, abstract_comb, abstract_opt_state)
        except CheckpointError as e:
            skipped.append((s, e))
            log.warning("skipping checkpoint step %d: %s", s, reason(e.__cause__ or e))
            continue
        for bad, _ in skipped:
            moved = set_aside(Path(manager.directory), bad)
            log.warning("checkpoint step %d moved to %s; resuming from step %d", bad, moved, s)
        if skipped:
            manager.reload()
        return values
    raise CheckpointError(f"no checkpoint in {manager.directory} restores cleanly: "
                          + "; ".join(f"step {s}: {reason(e.__cause__ or e, 120)}" for s, e in skipped))

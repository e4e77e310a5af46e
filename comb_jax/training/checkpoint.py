"""Orbax checkpoints of a training run: `RUN_DIR/checkpoints/STEP/{comb,opt,data,config}`, saved and resumed.

- comb: the trainable parameters (what serving and export need);
- opt: {"step", "opt_state"};
- data: every process's grain iterator state (JSON, `{"per_process": [state of process 0, ...]}`);
- config: the full Config as JSON.
The manager (`weights.run_dir.make_manager`) saves asynchronously and keeps the last `keep_checkpoints` steps plus
the best by eval loss; serving, eval and export read the comb params back through `weights.run_dir`.

In a multi-process run every process calls `save` and `restore` (Orbax writes each process's shards to the shared
directory); which step restores is decided once for all of them, and a step that does not restore is moved aside by
the primary only.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from comb_jax import distributed
from comb_jax.errors import CheckpointError
from comb_jax.weights.run_dir import checkpoint_root, make_manager, reason

log = logging.getLogger("comb_jax.training.checkpoint")
__all__ = ["CheckpointError", "checkpoint_root", "make_manager", "process_data_state", "restore", "save", "set_aside"]


def save(manager: ocp.CheckpointManager, step: int, comb, opt_state, data_state: dict, cfg,
         eval_loss: float | None = None) -> None:
    """Start an async save of one step (device arrays are copied before this returns).

    `data_state` is this process's iterator state; every process's is gathered and saved (a collective call).
    """
    metrics = None if eval_loss is None else {"eval_loss": float(eval_loss)}
    per_process = distributed.allgather_json(_jsonable(data_state))
    manager.save(step, metrics=metrics, args=ocp.args.Composite(
        comb=ocp.args.StandardSave(comb),
        opt=ocp.args.StandardSave({"step": np.asarray(step, np.int64), "opt_state": opt_state}),
        data=ocp.args.JsonSave({"per_process": per_process}),
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


def process_data_state(saved):
    """This process's iterator state out of a checkpoint's data item.

    A checkpoint of another process count resumes only when every process saved the same state (our pipeline's
    state is the global batch index, the same on every process: see `data.train_dataset`). An older checkpoint
    holds the one state itself.
    """
    if not (isinstance(saved, dict) and set(saved) == {"per_process"}):
        return saved
    states = saved["per_process"]
    if len(states) == jax.process_count():
        return states[jax.process_index()]
    if all(s == states[0] for s in states):
        return states[0]
    raise CheckpointError(f"the checkpoint's data iterator states differ between its {len(states)} processes: it "
                          f"resumes only with {len(states)} processes (this run has {jax.process_count()})")


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


def _restore_everywhere(manager: ocp.CheckpointManager, step: int, abstract_comb, abstract_opt_state):
    """`_restore_step` on every process, and one verdict for all: a step that fails on any process fails on all
    (each process reads only its own shards, so one may see damage another does not)."""
    try:
        values, error = _restore_step(manager, step, abstract_comb, abstract_opt_state), None
    except CheckpointError as e:
        values, error = None, e
    failed = distributed.allgather(np.asarray(error is not None))
    if error is None and failed.any():
        where = ", ".join(str(i) for i in np.flatnonzero(failed))
        error = CheckpointError(f"checkpoint {manager.directory / str(step)} did not restore on process(es) {where}")
    if error is not None:
        raise error
    return values


def _agreed_steps(steps: list[int]) -> list[int]:
    """The primary's list of steps, on every process (the decision which step to try is made once)."""
    if jax.process_count() == 1:
        return steps
    count = int(distributed.broadcast(np.asarray(len(steps), np.int64)))
    padded = np.zeros(count, np.int64)
    padded[:min(count, len(steps))] = steps[:count]
    return [int(s) for s in distributed.broadcast(padded)]


def set_aside(directory, step: int) -> epath.Path:
    """Move a step dir that does not restore to `checkpoints.corrupt/STEP[.n]` beside it (kept, never deleted)."""
    directory = epath.Path(directory)
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

    Across processes (every one calls this): the steps tried are the primary's, a step counts as restored only when
    it restored on every process, and only the primary moves the skipped steps, then all wait for it.
    """
    candidates = _agreed_steps(sorted((s for s in manager.all_steps() if s <= step), reverse=True) or [step])
    skipped = []
    for s in candidates:
        try:
            values = _restore_everywhere(manager, s, abstract_comb, abstract_opt_state)
        except CheckpointError as e:
            skipped.append((s, e))
            log.warning("skipping checkpoint step %d: %s", s, reason(e.__cause__ or e))
            continue
        if skipped:
            if distributed.is_primary():
                for bad, _ in skipped:
                    moved = set_aside(manager.directory, bad)
                    log.warning("checkpoint step %d moved to %s; resuming from step %d", bad, moved, s)
            distributed.barrier("comb_jax.checkpoint.set_aside")
            manager.reload()
        return values[:3] + (process_data_state(values[3]),)
    raise CheckpointError(f"no checkpoint in {manager.directory} restores cleanly: "
                          + "; ".join(f"step {s}: {reason(e.__cause__ or e, 120)}" for s, e in skipped))

"""Orbax checkpoints of a training run: `RUN_DIR/checkpoints/STEP/{comb,opt,data,config}`.

- comb: the trainable parameters (what serving and export need);
- opt: {"step", "opt_state"};
- data: the grain iterator state (JSON);
- config: the full Config as JSON.
The manager saves asynchronously and keeps the last `keep_checkpoints` steps plus the best by eval loss.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from comb_jax.layout import abstract_params, check_shapes, model_layout

log = logging.getLogger("comb_jax.checkpoint")


class CheckpointError(RuntimeError):
    pass


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir).resolve() / "checkpoints"


def make_manager(directory: str | Path, keep: int, read_only: bool = False) -> ocp.CheckpointManager:
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
    return ocp.CheckpointManager(Path(directory).resolve(), options=options,
                                 item_names=("comb", "opt", "data", "config"))


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


def restore(manager: ocp.CheckpointManager, step: int, abstract_comb, abstract_opt_state):
    """(comb, opt_state, step, data_state) of `step`, placed like the abstract trees' shardings."""
    path = manager.directory / str(step)
    try:
        out = manager.restore(step, args=ocp.args.Composite(
            comb=ocp.args.StandardRestore(abstract_comb),
            opt=ocp.args.StandardRestore({"step": jax.ShapeDtypeStruct((), np.int64),
                                          "opt_state": abstract_opt_state}),
            data=ocp.args.JsonRestore(),
        ))
    except Exception as e:  # orbax raises many types for truncated or tampered files
        raise CheckpointError(f"checkpoint {path} is missing or corrupt: {type(e).__name__}: {e}") from e
    return out["comb"], out["opt"]["opt_state"], int(out["opt"]["step"]), out["data"]


def _step_dirs(root: Path) -> list[int]:
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit())


def _resolve_step_dir(checkpoint_dir: str | Path, prefer: str) -> Path:
    """A single step dir from a run dir, a checkpoints dir or a step dir (best by eval loss, else latest)."""
    path = Path(checkpoint_dir).resolve()  # Orbax wants absolute paths; users pass relative ones
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    if (path / "comb").is_dir():
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    steps = _step_dirs(root)
    if not steps:
        raise FileNotFoundError(f"no checkpoint steps under {root}")
    if prefer == "best":
        manager = make_manager(root, keep=len(steps), read_only=True)
        losses = {s: (manager.metrics(s) or {}).get("eval_loss") for s in steps}
        manager.close()
        scored = [s for s in steps if losses[s] is not None]
        if scored:  # lowest eval loss; the later step on a tie
            return root / str(min(scored, key=lambda s: (losses[s], -s)))
    return root / str(steps[-1])


def restore_comb_params(checkpoint_dir: str, cfg, prefer: str = "best") -> dict:
    """Trainable params as host numpy arrays, structured like `model_layout(cfg.model)["comb"]`.

    `checkpoint_dir` is a run dir, its `checkpoints/` dir (take the best step by eval loss, else the latest;
    `prefer="latest"` always takes the latest) or one step dir. Missing or corrupt checkpoints raise, naming
    the path.
    """
    step_dir = _resolve_step_dir(checkpoint_dir, prefer)
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
        raise CheckpointError(f"checkpoint {comb_dir} is missing or corrupt: {type(e).__name__}: {e}") from e
    comb = jax.tree.map(np.asarray, comb)
    check_shapes(layout, comb, where=str(comb_dir))
    return comb


def load_params(cfg, checkpoint: str | None) -> dict:
    """{"backbone": from cfg.weights, "comb": from a train.py checkpoint (see `restore_comb_params`)}.

    Without a checkpoint the comb parameters are freshly initialised (gates 0): the model then answers exactly
    like its backbone and ignores the chunks, which is logged as a warning.
    """
    from comb_jax.warm_start import random_comb
    from comb_jax.weights import load_backbone

    backbone = load_backbone(cfg)
    if checkpoint:
        comb = restore_comb_params(checkpoint, cfg)
    else:
        log.warning("no checkpoint: the comb parameters are freshly initialised (gates 0), so %s answers exactly "
                    "like its backbone and ignores the chunks", cfg.name)
        comb = jax.tree.map(np.asarray, random_comb(cfg, jax.random.key(cfg.train.seed)))
    return {"backbone": backbone, "comb": comb}

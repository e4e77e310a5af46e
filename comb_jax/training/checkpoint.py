"""Orbax checkpoints of a training run: `RUN_DIR/checkpoints/STEP/{comb,opt,data,config}`.

- comb: the trainable parameters (what serving and export need);
- opt: {"step", "opt_state"};
- data: the grain iterator state (JSON);
- config: the full Config as JSON.
The manager saves asynchronously and keeps the last `keep_checkpoints` steps plus the best by eval loss.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from comb_jax.model.layout import abstract_params, check_shapes, model_layout

log = logging.getLogger("comb_jax.training.checkpoint")


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


def reason(e: BaseException, limit: int = 200) -> str:
    """One line saying why a checkpoint did not restore (orbax errors can span hundreds of lines)."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    text = f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


def _step_dirs(root: Path) -> list[int]:
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit())


def _metric(manager, step):
    try:
        return (manager.metrics(step) or {}).get("eval_loss")
    except Exception:  # unreadable metrics: the step is just not ranked
        return None


def _candidate_step_dirs(checkpoint_dir: str | Path, prefer: str) -> list[Path]:
    """Step dirs to try in order: a step dir alone; for a run or checkpoints dir, the best by eval loss (unless
    `prefer="latest"`), then every step from the latest down."""
    path = Path(checkpoint_dir).resolve()  # Orbax wants absolute paths; users pass relative ones
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


def _restore_comb_dir(step_dir: Path, cfg) -> dict:
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


def is_comb_directory(path) -> bool:
    """A Comb model in the Hugging Face layout (config.json with model_type combllama), not an Orbax checkpoint."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == "combllama"
    except (ValueError, AttributeError):
        return False


def load_model(cfg, checkpoint: str | None):
    """(cfg, params): `load_params`, or for a Comb directory in the Hugging Face layout (export_comb's or the
    release's) its own model config (shapes, context encoding, encoder embedding) and weights, and its tokenizer
    when the directory holds one, so the model is served the way it was trained."""
    if not checkpoint or not is_comb_directory(checkpoint):
        return cfg, load_params(cfg, checkpoint)
    from comb_jax.config import WeightsConfig, validate
    from comb_jax.export import import_comb

    model, params = import_comb(checkpoint)
    if any((Path(checkpoint) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        cfg = dataclasses.replace(cfg, weights=WeightsConfig(source="hf", path=str(checkpoint)))
    elif model.vocab_size != cfg.model.vocab_size:
        raise CheckpointError(f"{checkpoint} has no tokenizer and its vocabulary ({model.vocab_size}) is not the "
                              f"config's ({cfg.model.vocab_size}); add the tokenizer files")
    log.info("serving %s as its config.json says: %s context, BOS %s", checkpoint, model.context_encoding,
             "on" if model.context_bos else "off")
    return validate(dataclasses.replace(cfg, model=model)), params


def load_params(cfg, checkpoint: str | None) -> dict:
    """{"backbone": from cfg.weights, "comb": from a train.py checkpoint (see `restore_comb_params`)}.

    Without a checkpoint, the trained Comb the package ships for this config (`comb_jax.shipped`) when there is
    one, logged with its fingerprint. `checkpoint="none"`, or no shipped model, gives freshly initialised comb
    parameters (gates 0): the model then answers exactly like its backbone and ignores the chunks (a warning).
    """
    from comb_jax import shipped
    from comb_jax.model.weights import load_backbone
    from comb_jax.training.warm_start import random_comb

    backbone = load_backbone(cfg)
    fresh = checkpoint is not None and checkpoint.strip().lower() == "none"
    if checkpoint and not fresh:
        comb = restore_comb_params(checkpoint, cfg)
    elif not fresh and shipped.shipped_dir(cfg.name) is not None:
        path = shipped.shipped_dir(cfg.name)
        comb = shipped.load_shipped(cfg, path)
        log.warning("no --checkpoint: loaded the shipped Comb %s (fingerprint %s...)", path,
                    shipped.read_card(path)["fingerprint"][:16])
    else:
        log.warning("no checkpoint: the comb parameters are freshly initialised (gates 0), so %s answers exactly "
                    "like its backbone and ignores the chunks", cfg.name)
        comb = jax.tree.map(np.asarray, random_comb(cfg, jax.random.key(cfg.train.seed)))
    return {"backbone": backbone, "comb": comb}

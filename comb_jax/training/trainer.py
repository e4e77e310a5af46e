"""Training: optimizer, a sharded jit train step, and the training loop with checkpoints and an eval hook.

Only the trainable subtree is differentiated and carries AdamW state: `params["comb"]`, or with
`train.objective=kvpacket` the KV Packet adapter `params["kvpacket"]`. What is trained and how is an `Objective`
value (`training.objectives`): the same loop, data sources, checkpoints and metrics train every one. The frozen
backbone is a separate argument of the step. Master weights are float32; the model computes in
`cfg.compute_dtype` (bfloat16 on accelerators). Held-out evaluation is a function the caller passes in
(`evaluate`; `cli.train` wires `eval.in_training`), so training never imports eval.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from tqdm import tqdm

from comb_jax import distributed
from comb_jax.model.buckets import bucket_for
from comb_jax.model.layout import abstract_params, count_params, model_layout
from comb_jax.model.sharding import logical_sharding, make_mesh, param_shardings, replicated
from comb_jax.paths import data_dir
from comb_jax.text.codec import make_codec
from comb_jax.training import checkpoint as ckpt
from comb_jax.training import data as data_lib
from comb_jax.training.frozen_cache import FrozenCache, check_supported
from comb_jax.training.objectives import LOSS_TERMS, Objective, calibrate_kv_scale, objective_for
from comb_jax.weights.fingerprint import tree_fingerprint
from comb_jax.weights.hf import load_hf_backbone_sharded
from comb_jax.weights.resolve import load_backbone

# Dense bf16 peak FLOP/s per device, for MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5": 459e12,
              "TPU v5 lite": 197e12, "TPU v6 lite": 918e12}


class TrainingDiverged(FloatingPointError):
    pass


# evaluate(trainable, placed backbone, eval examples, codec) -> {"eval_loss": float, ...}
Evaluate = Callable[[Any, Any, list, Any], dict]


class TrainState(NamedTuple):
    step: jax.Array  # [] int32
    comb: Any  # the trainable subtree (`Objective.layout`: Comb, or the KV Packet adapter), float32 master copy
    opt_state: Any  # AdamW state of `comb` only


# ----------------------------------------------------------------------------------------------------------
# Optimizer


def learning_rate(tc) -> optax.Schedule:
    """Linear warm-up to `learning_rate`, then constant or cosine decay to 10% over the remaining steps."""
    warmup = optax.linear_schedule(0.0, tc.learning_rate, max(tc.warmup_steps, 1))
    if tc.schedule == "constant":
        after = optax.constant_schedule(tc.learning_rate)
    elif tc.schedule == "cosine":
        after = optax.cosine_decay_schedule(tc.learning_rate, max(tc.steps - tc.warmup_steps, 1), alpha=0.1)
    else:
        raise ValueError(f"unknown train.schedule {tc.schedule!r}; valid: constant, cosine")
    return optax.join_schedules([warmup, after], [max(tc.warmup_steps, 1)])


def cross_mask(name: str):
    """A mask function over the comb tree: True on the cross blocks' parameter `name` (gate_attn, gate_mlp, wo, ...),
    False elsewhere (the encoder's own `wo` included)."""
    key = lambda p: str(getattr(p, "key", ""))
    return lambda tree: jax.tree_util.tree_map_with_path(
        lambda path, _: key(path[0]) == "cross" and key(path[-1]) == name, tree)


def make_optimizer(tc) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW; weight decay only on matrices (not norms or gates).

    `gate_attn_lr_multiplier` / `gate_mlp_lr_multiplier` scale the two gates' updates. The gates start at 0 and
    every cross-block signal passes through tanh(gate), so at the release's small learning rate a short run barely
    opens them (AdamW moves a scalar by about lr per step). Only the attention branch reads the context: the MLP
    branch sees the decoder's own hidden state, and opened alone it fits the targets' style without the chunks.
    `cross_out_lr_multiplier` scales the cross attention's o_proj updates: AdamW moves each weight by about lr per
    step, while the decoder's own o_proj weights have an RMS near 0.2 (SmolLM2), so an o_proj that starts at 0
    (`init_attn_gate`) needs a few hundred steps at lr 5e-4 to reach a useful scale.
    """
    decay_mask = lambda tree: jax.tree.map(lambda p: p.ndim >= 3, tree)  # stacked linears are [layers, in, ...]
    parts = [optax.clip_by_global_norm(tc.grad_clip),
             optax.adamw(learning_rate(tc), b1=0.9, b2=0.95, weight_decay=tc.weight_decay, mask=decay_mask)]
    for name, multiplier in (("gate_attn", tc.gate_attn_lr_multiplier), ("gate_mlp", tc.gate_mlp_lr_multiplier),
                             ("wo", tc.cross_out_lr_multiplier)):
        if multiplier != 1.0:
            parts.append(optax.masked(optax.scale(multiplier), cross_mask(name)))
    return optax.chain(*parts)


# ----------------------------------------------------------------------------------------------------------
# Shardings and the step


BATCH_AXES = {"chunk_tokens": ("batch", None, "seq"), "chunk_mask": ("batch", None, "seq"),
              "tokens": ("batch", "seq"), "targets": ("batch", "seq"), "loss_mask": ("batch", "seq"),
              "teacher_tokens": ("batch", "seq"), "teacher_index": ("batch", "seq"),
              "answer_positions": ("batch", None),
              # what training.frozen_cache adds
              "decoder_states": ("batch", "seq", None), "chunk_states": ("batch", None, "seq", None),
              "teacher_top_ids": ("batch", None, None), "teacher_top_logprobs": ("batch", None, None),
              # objective=kvpacket batches (kvpacket_data.collate)
              "prefix_tokens": ("batch", "seq"), "prefix_len": ("batch",), "query_tokens": ("batch", "seq")}


def batch_shardings(batch, mesh):
    """Batch arrays split over (data, fsdp) on their leading axis."""
    return {k: logical_sharding(np.shape(v), BATCH_AXES[k], mesh) for k, v in batch.items()}


def opt_state_shardings(abstract_opt_state, comb_shardings, mesh):
    """Shard AdamW moments like the parameter they belong to (matched by name and shape); scalars replicated."""
    by_name = {tuple(str(getattr(p, "key", p)) for p in path): s
               for path, s in jax.tree_util.tree_flatten_with_path(comb_shardings)[0]}

    def pick(path, leaf):
        name = tuple(str(p.key) for p in path if isinstance(p, jax.tree_util.DictKey))
        return by_name.get(name, replicated(mesh)) if leaf.ndim else replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


def state_shardings(cfg, mesh, optimizer):
    comb_layout = objective_for(cfg).layout(cfg)
    comb_sh = param_shardings(comb_layout, mesh)
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params(comb_layout, jnp.dtype(cfg.param_dtype)))
    return TrainState(replicated(mesh), comb_sh, opt_state_shardings(abstract_opt, comb_sh, mesh))


def check_batch_divides(cfg, mesh):
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    accum = cfg.train.grad_accum_steps
    if accum < 1:
        raise ValueError(f"train.grad_accum_steps={accum} must be >= 1")
    if cfg.train.batch_size % (shards * accum):
        raise ValueError(f"train.batch_size={cfg.train.batch_size} must be a multiple of data x fsdp x "
                         f"grad_accum_steps = {shards} x {accum} (mesh {dict(mesh.shape)})")


def accumulated_grads(comb, backbone, batch, cfg, mesh):
    """Gradients and metrics of the whole batch, computed in `grad_accum_steps` sequential micro-batches.

    Micro-batch j takes rows j, j + A, j + 2A, ... so that every device holds part of each one. Each micro-batch's
    mean-over-answer-tokens gradient is weighted by its answer tokens, so the result is the whole batch's token
    mean (what one big step computes), at 1/A of the activation memory.
    """
    grad_fn = jax.value_and_grad(objective_for(cfg).loss, has_aux=True)
    accum = cfg.train.grad_accum_steps
    if accum == 1:
        (_, metrics), grads = grad_fn(comb, backbone, batch, cfg)
        return grads, metrics
    micro = jax.tree.map(lambda a: jnp.moveaxis(a.reshape(a.shape[0] // accum, accum, *a.shape[1:]), 1, 0), batch)

    def body(total, mb):
        mb = jax.lax.with_sharding_constraint(mb, batch_shardings(mb, mesh))
        (_, m), g = grad_fn(comb, backbone, mb, cfg)
        weight = m["answer_tokens"]
        scaled = jax.tree.map(lambda x: weight * x, (g, {k: m[k] for k in LOSS_TERMS}))
        return jax.tree.map(jnp.add, total, scaled), weight

    zeros = (jax.tree.map(jnp.zeros_like, comb), {k: jnp.zeros((), jnp.float32) for k in LOSS_TERMS})
    (grads, sums), weights = jax.lax.scan(body, zeros, micro)
    count = jnp.maximum(weights.sum(), 1.0)
    metrics = dict(jax.tree.map(lambda x: x / count, sums), answer_tokens=weights.sum())
    return jax.tree.map(lambda g: g / count, grads), metrics


def make_train_step(cfg, mesh, optimizer, example_batch):
    """jit(step)(state, backbone, batch) -> (state, metrics) with explicit shardings; `state` is donated."""
    check_batch_divides(cfg, mesh)
    state_sh = state_shardings(cfg, mesh, optimizer)
    backbone_sh = param_shardings(model_layout(cfg.model)["backbone"], mesh)

    def step(state: TrainState, backbone, batch):
        grads, metrics = accumulated_grads(state.comb, jax.lax.stop_gradient(backbone), batch, cfg, mesh)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.comb)
        comb = optax.apply_updates(state.comb, updates)
        # NaN guard: a non-finite loss, gradient or new weight leaves the state as it was before this step
        all_finite = lambda tree: jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))
        finite = jnp.isfinite(metrics["loss"]) & all_finite(grads) & all_finite(comb)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads), finite=finite)
        return TrainState(state.step + finite.astype(state.step.dtype), keep(comb, state.comb),
                          keep(opt_state, state.opt_state)), metrics

    return jax.jit(step, in_shardings=(state_sh, backbone_sh, batch_shardings(example_batch, mesh)),
                   out_shardings=(state_sh, replicated(mesh)), donate_argnums=(0,))


def process_rows(mesh, batch_size: int) -> slice:
    """The rows of a global batch that this process's devices hold: one contiguous block, because the mesh orders
    devices by process (`make_mesh`). All rows in a one-process run."""
    sharding = logical_sharding((batch_size,), ("batch",), mesh)
    spans = sorted({(idx[0].start or 0, batch_size if idx[0].stop is None else idx[0].stop)
                    for d, idx in sharding.devices_indices_map((batch_size,)).items()
                    if d.process_index == jax.process_index()})
    for (_, stop), (start, _) in zip(spans, spans[1:]):
        if start > stop:
            raise ValueError(f"process {jax.process_index()} holds rows {spans} of the batch: not one block")
    return slice(spans[0][0], spans[-1][1])


def global_batch(local: dict, mesh, batch_size: int) -> tuple[dict, int]:
    """(the batch the step takes, its real tokens) from this process's rows (`process_rows`).

    One process: the numpy batch as it is. Several: the processes agree on each array's shape (the largest length
    bucket any of them picked, exchanged with their real-token counts in one allgather), pad their rows to it, and
    build global arrays from the process-local rows (`jax.make_array_from_process_local_data`).
    """
    tokens = real_tokens(local)
    if jax.process_count() == 1:
        return local, tokens
    names = sorted(local)
    dims = [d for k in names for d in local[k].shape[1:]]
    everyone = distributed.allgather(np.array(dims + [tokens], np.int64))
    agreed, tokens = everyone[:, :-1].max(0).tolist(), int(everyone[:, -1].sum())
    shapes, i = {}, 0
    for k in names:
        rank = local[k].ndim - 1
        shapes[k] = (batch_size, *agreed[i:i + rank])
        i += rank
    local = data_lib.pad_to(local, shapes)
    return {k: jax.make_array_from_process_local_data(logical_sharding(shapes[k], BATCH_AXES[k], mesh), local[k],
                                                      shapes[k]) for k in names}, tokens


def agreed_latest_step(manager) -> int | None:
    """The newest checkpoint step as the primary sees it, on every process (None: no checkpoint)."""
    latest = manager.latest_step()
    if jax.process_count() == 1:
        return latest
    latest = int(distributed.broadcast(np.asarray(-1 if latest is None else latest, np.int64)))
    return None if latest < 0 else latest


def init_state(cfg, mesh, optimizer, comb) -> TrainState:
    """Place `comb` (host or device arrays) on the mesh and build its optimizer state there."""
    sh = state_shardings(cfg, mesh, optimizer)
    # via host numpy: the step donates its state, so it must never alias the caller's arrays
    comb = jax.device_put(jax.tree.map(lambda a: np.array(a, jnp.dtype(cfg.param_dtype)), comb), sh.comb)
    opt_state = jax.jit(optimizer.init, out_shardings=sh.opt_state)(comb)
    return TrainState(jax.device_put(jnp.zeros((), jnp.int32), sh.step), comb, opt_state)


def place_backbone(cfg, mesh, backbone):
    """Frozen weights on the mesh, stored in the compute dtype (they are never updated)."""
    sh = param_shardings(model_layout(cfg.model)["backbone"], mesh)
    dtype = jnp.dtype(cfg.compute_dtype)
    return jax.device_put(jax.tree.map(lambda a: np.asarray(a).astype(dtype), backbone), sh)


def load_placed_backbone(cfg, mesh, backbone=None):
    """(the frozen backbone on the mesh, its host copy or None).

    In a multi-process run from a Hugging Face directory (`weights.source=hf`) each process reads only the blocks
    its own devices hold, so no host reads the whole backbone and there is no host copy; otherwise the backbone
    (`backbone`, or `cfg.weights`) is read whole on every host and placed."""
    if backbone is None and jax.process_count() > 1 and cfg.weights.source == "hf":
        sh = param_shardings(model_layout(cfg.model)["backbone"], mesh)
        return load_hf_backbone_sharded(cfg.weights.path, cfg.model, sh, jnp.dtype(cfg.compute_dtype)), None
    host = load_backbone(cfg) if backbone is None else backbone
    return place_backbone(cfg, mesh, host), host


# ----------------------------------------------------------------------------------------------------------
# The loop


def gate_values(comb) -> dict:
    """tanh of every cross block's gates, for the metrics log: {"gate_attn": [E], "gate_mlp": [E]}."""
    return {name: np.tanh(np.asarray(jax.device_get(comb["cross"][name]), np.float64)).round(5).tolist()
            for name in ("gate_attn", "gate_mlp")}


def real_tokens(batch) -> int:
    """Non-padding tokens in a batch: chunk tokens plus decoder tokens up to the last answer target."""
    mask = batch["loss_mask"]
    last = np.where(mask.any(1), mask.shape[1] - np.argmax(mask[:, ::-1], 1), 0)
    return int(batch["chunk_mask"].sum() + last.sum())


def peak_flops(device) -> float | None:
    kind = getattr(device, "device_kind", "")
    matches = [v for k, v in PEAK_FLOPS.items() if k.lower() in kind.lower()]
    return max(matches) if matches and device.platform != "cpu" else None


def step_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost.get("flops", 0.0)) or None
    except Exception:  # not every backend reports costs
        return None


def resolve_targets(cfg) -> str:
    t = cfg.train.targets
    if t == "auto":
        return "gold" if cfg.weights.source == "random" else "teacher"
    if t not in ("teacher", "gold"):
        raise ValueError(f"unknown train.targets {t!r}; valid: auto, teacher, gold")
    return t


def prepare_examples(cfg, codec, backbone_params, run_dir, progress: bool, fingerprint=None):
    """(train, eval) examples with their training targets (teacher answers cached in the run dir).
    `fingerprint()`: the backbone's `tree_fingerprint` (computed here when None)."""
    where = data_dir(cfg.train.data_dir)
    train_ex = data_lib.run_examples(cfg.train, where, "train")
    eval_ex = data_lib.run_examples(cfg.train, where, "eval")
    if resolve_targets(cfg) == "teacher":
        # once: a full read (and a gather on a pod)
        fingerprint = fingerprint() if fingerprint else tree_fingerprint(backbone_params["backbone"])
        train_ex = data_lib.teacher_targets(train_ex, backbone_params, cfg, codec, run_dir / "teacher_train.jsonl",
                                            fingerprint, progress)
        eval_ex = data_lib.teacher_targets(eval_ex, backbone_params, cfg, codec, run_dir / "teacher_eval.jsonl",
                                           fingerprint, progress)
    return train_ex, eval_ex


def train(cfg, resume: bool = False, progress: bool = True, stop_after: int | None = None,
          backbone=None, examples=None, evaluate: Evaluate | None = None, objective: Objective | None = None) -> dict:
    """Train `cfg`; returns a summary. `stop_after` ends the loop early without a final save (a simulated kill).

    `backbone` (host arrays) and `examples` ((train, eval) lists) may be passed in to skip loading them.
    `evaluate(trainable, backbone, eval_examples, codec)` -> {"eval_loss", ...} runs every `eval_every` steps (none:
    no eval); `objective` defaults to the one `train.objective` names.
    """
    tc = cfg.train
    objective = objective or objective_for(cfg)
    if cfg.model.context_encoding != "per_chunk" or cfg.model.context_bos:
        raise ValueError(f"training encodes each chunk on its own without BOS; model.context_encoding="
                         f"{cfg.model.context_encoding!r} / context_bos={cfg.model.context_bos} are for serving "
                         "imported release checkpoints")
    run_dir = epath.Path(tc.run_dir)  # local, or a URL such as gs://bucket/run (never resolved as a local path)
    primary = distributed.is_primary()  # host files (metrics, progress, caches) are written by the primary only
    if primary:
        run_dir.mkdir(parents=True, exist_ok=True)
    distributed.barrier("comb_jax.train.run_dir")
    mesh = make_mesh(cfg.mesh)
    check_batch_divides(cfg, mesh)
    if tc.frozen_cache:
        check_supported(cfg)  # before anything is loaded
    backbone, backbone_host = load_placed_backbone(cfg, mesh, backbone)
    if backbone_host is None and objective.name == "comb" and tc.init in ("warm", "pointer", "grow"):
        raise NotImplementedError(f"train.init={tc.init} copies backbone layers on the host, and this run reads the "
                                  "backbone in slices across processes: start from init=random or a "
                                  "train.init_checkpoint made with that init in one process")
    codec = make_codec(cfg)
    readable_backbone = backbone if backbone_host is None else backbone_host
    fingerprint = functools.cache(lambda: tree_fingerprint(readable_backbone))  # a full read: at most once
    if examples is None:
        # teacher answers from the host copy (each process answers its share of the prompts on its own devices) or,
        # with no host copy, from the sharded backbone (every process runs every batch together)
        examples = prepare_examples(cfg, codec, {"backbone": readable_backbone}, run_dir, progress and primary,
                                    fingerprint)
    train_ex, eval_ex = examples
    trainable_tree = objective.layout(cfg)
    if jax.process_count() > 1:
        # the kv stage's scale calibration runs on one process's host batch
        if tc.objective == "kv" and not tc.init_checkpoint:
            raise NotImplementedError(f"train.objective={tc.objective} trains in one process only")
        rows = process_rows(mesh, tc.batch_size)
        iterator = objective.batches(train_ex, codec, tc, tc.seed, rows)
    else:
        iterator = objective.batches(train_ex, codec, tc, tc.seed)

    optimizer = make_optimizer(tc)
    manager = ckpt.make_manager(ckpt.checkpoint_root(run_dir), tc.keep_checkpoints)
    latest = agreed_latest_step(manager)
    start = latest if resume else None
    if resume and start is None and primary:
        print(f"--resume: no checkpoint in {ckpt.checkpoint_root(run_dir)}; starting from scratch")
    if start is None:
        if not resume and latest is not None:
            raise FileExistsError(f"{ckpt.checkpoint_root(run_dir)} already has checkpoints: pass --resume to "
                                  "continue, or choose another train.run_dir")
        comb = objective.init(cfg, backbone_host, codec, jax.random.key(tc.seed))
        if tc.objective == "kv" and not tc.init_checkpoint:  # a batch from its own stream: the run's is untouched
            calibration = next(data_lib.train_iterator(train_ex, codec, tc, seed=tc.seed + 1))
            comb = jax.jit(lambda c, bb, b: calibrate_kv_scale(c, bb, b, cfg))(comb, backbone, calibration)
        state = init_state(cfg, mesh, optimizer, comb)
    else:
        sh = state_shardings(cfg, mesh, optimizer)
        abstract_comb = abstract_params(trainable_tree, jnp.dtype(cfg.param_dtype))
        with_sharding = lambda tree, shardings: jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)
        abstract = TrainState(None, with_sharding(abstract_comb, sh.comb),
                              with_sharding(jax.eval_shape(optimizer.init, abstract_comb), sh.opt_state))
        comb, opt_state, step, data_state = ckpt.restore(manager, start, abstract.comb, abstract.opt_state)
        state = TrainState(jax.device_put(jnp.asarray(step, jnp.int32), replicated(mesh)), comb, opt_state)
        iterator.set_state(data_state)

    frozen = None
    if tc.frozen_cache:  # the frozen forwards of each row, once (training.frozen_cache)
        frozen = FrozenCache(cfg, run_dir / "frozen_cache", backbone, fingerprint())

    def draw():
        batch, tokens = global_batch(next(iterator), mesh, tc.batch_size)
        return (batch if frozen is None else frozen.fill(batch)), tokens

    data_state = iterator.get_state()  # before each batch is drawn: what a checkpoint of the kept state needs
    first, first_tokens = draw()
    train_step = make_train_step(cfg, mesh, optimizer, first)
    schedule = learning_rate(tc)
    peak = peak_flops(jax.devices()[0])
    flops = {}
    metrics_path = run_dir / "metrics.jsonl"
    step = int(state.step)
    summary = {"start_step": step, "run_dir": str(run_dir)}
    bar = tqdm(total=tc.steps, initial=step, desc=cfg.name, disable=not (progress and primary), dynamic_ncols=True)
    batch, tokens = first, first_tokens
    last_eval = None

    def run_eval(at_step: int) -> dict:
        result = evaluate(state.comb, backbone, eval_ex, codec)
        shown = ", ".join(f"{k[len('eval_'):]} {'n/a' if v is None else f'{v:.4f}'}" for k, v in result.items()
                          if k != "eval_samples" and not k.startswith("eval_nll"))
        sample = f"; sample: {json.dumps(result['eval_samples'][:1])}" if result.get("eval_samples") else ""
        if primary:
            tqdm.write(f"step {at_step}: {shown}{sample}")
        return result

    def save(at_step: int, eval_loss=None):
        ckpt.save(manager, at_step, state.comb, state.opt_state, iterator.get_state(), cfg, eval_loss)
        if objective.after_save is not None:  # e.g. the KV Packet adapter the eval and serving load
            trainable = distributed.host_copy(state.comb)  # every process takes part in the gather; one writes
            if primary:
                objective.after_save(run_dir, trainable, at_step)

    try:
        with (metrics_path.open("a") if primary else open(os.devnull, "w")) as log:
            if evaluate and tc.eval_at_start and tc.eval_every > 0 and step == 0:  # the untrained baseline
                last_eval = run_eval(0)
                log.write(json.dumps({"step": 0, **{k: v for k, v in last_eval.items() if k != "eval_samples"}}) + "\n")
            while step < tc.steps:
                shapes = tuple(v.shape for v in batch.values())
                if shapes not in flops and peak:
                    flops[shapes] = step_flops(train_step.lower(state, backbone, batch).compile())
                t0 = time.perf_counter()
                state, metrics = train_step(state, backbone, batch)
                metrics = jax.device_get(metrics)
                seconds = time.perf_counter() - t0
                step += 1
                loss = float(metrics["loss"])
                if not (math.isfinite(loss) and bool(metrics["finite"])):
                    # the step kept the state from before it: save that (unless saved already) and stop
                    step -= 1
                    if step > 0 and step not in manager.all_steps():
                        ckpt.save(manager, step, state.comb, state.opt_state, data_state, cfg)
                    kept = (f"the state before it (step {step}) is the latest checkpoint in "
                            f"{ckpt.checkpoint_root(run_dir)}" if step > 0 else "nothing was saved")
                    raise TrainingDiverged(f"loss is {loss} at step {step + 1} (gradient norm "
                                           f"{float(metrics['grad_norm'])}): the update was not applied; stopping, "
                                           f"and {kept}")
                record = {"step": step, "loss": loss, "ce": float(metrics["ce"]), "kl": float(metrics["kl"]),
                          "hidden": float(metrics["hidden"]),
                          **(gate_values(state.comb) if objective.name == "comb" else {}),
                          "grad_norm": float(metrics["grad_norm"]), "lr": float(schedule(step - 1)),
                          "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}
                if frozen is not None:  # rows read back / computed so far (a miss step pays the frozen forwards)
                    record.update(frozen_hits=frozen.hits, frozen_misses=frozen.misses,
                                  frozen_fill_s=frozen.last_fill_s)  # this step's batch (drawn last)
                if flops.get(shapes) and peak:
                    record["mfu"] = flops[shapes] / seconds / (peak * mesh.size)
                eval_loss = None
                if evaluate and tc.eval_every > 0 and (step % tc.eval_every == 0 or step == tc.steps):
                    last_eval = run_eval(step)
                    eval_loss = last_eval["eval_loss"]
                    record.update({k: v for k, v in last_eval.items() if k != "eval_samples"})
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}",
                                **({"mfu": f"{record['mfu']:.1%}"} if "mfu" in record else {}))
                if step % tc.checkpoint_every == 0 or step == tc.steps:
                    save(step, eval_loss)
                summary.setdefault("losses", []).append(loss)
                if stop_after is not None and step >= stop_after:
                    break
                if step < tc.steps:
                    data_state = iterator.get_state()
                    batch, tokens = draw()
    finally:
        bar.close()
        manager.wait_until_finished()
        manager.close()
    summary.update(end_step=step, last_eval=last_eval, state=state, latest_checkpoint=step)
    if frozen is not None:
        summary["frozen_cache"] = {"hits": frozen.hits, "misses": frozen.misses, "directory": str(frozen.directory)}
    return summary


# ----------------------------------------------------------------------------------------------------------
# Dry run


def dry_run(cfg) -> dict:
    """Lower and compile the train step with abstract arrays on the current devices; no weights are loaded."""
    mesh = make_mesh(cfg.mesh)
    check_batch_divides(cfg, mesh)
    tc = cfg.train
    layout = model_layout(cfg.model)
    optimizer = make_optimizer(tc)
    sh = state_shardings(cfg, mesh, optimizer)
    comb = abstract_params(layout["comb"], jnp.dtype(cfg.param_dtype))
    state = TrainState(jax.ShapeDtypeStruct((), jnp.int32), comb, jax.eval_shape(optimizer.init, comb))
    backbone = abstract_params(layout["backbone"], jnp.dtype(cfg.compute_dtype))
    b, n = tc.batch_size, 1 + tc.num_distractors
    lc = bucket_for(tc.max_chunk_tokens, tc.chunk_buckets, "chunk")
    td = bucket_for(tc.max_decoder_tokens, tc.decoder_buckets, "decoder sequence")
    batch = {"chunk_tokens": np.zeros((b, n, lc), np.int32), "chunk_mask": np.zeros((b, n, lc), bool),
             "tokens": np.zeros((b, td), np.int32), "targets": np.zeros((b, td), np.int32),
             "loss_mask": np.zeros((b, td), np.float32)}
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    step = make_train_step(cfg, mesh, optimizer, batch)
    t0 = time.perf_counter()
    lowered = step.lower(state, backbone, batch)
    compiled = lowered.compile()
    mem = compiled.memory_analysis()
    gib = 2.0 ** 30
    report = {
        "config": cfg.name, "mesh": dict(mesh.shape), "devices": mesh.size, "processes": jax.process_count(),
        "trainable_params": count_params(layout["comb"]), "backbone_params": count_params(layout["backbone"]),
        "optimizer_state_params": count_params(jax.eval_shape(optimizer.init, comb)),
        "batch": {k: list(v.shape) for k, v in batch.items()},
        "compile_seconds": round(time.perf_counter() - t0, 1), "flops_per_step": step_flops(compiled),
        "sharding": {"comb/encoder/layers/wq": str(sh.comb["encoder"]["layers"]["wq"].spec)},
    }
    if mem is not None:
        report["per_device_memory_gib"] = {
            "arguments": mem.argument_size_in_bytes / gib, "outputs": mem.output_size_in_bytes / gib,
            "temporaries": mem.temp_size_in_bytes / gib, "generated_code": mem.generated_code_size_in_bytes / gib,
            "aliased": mem.alias_size_in_bytes / gib,
            "total_live_estimate": (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                                    - mem.alias_size_in_bytes) / gib,
        }
    return report

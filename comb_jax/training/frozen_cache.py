"""What a training step computes from frozen weights alone, computed once per training row and kept on disk.

The answer objective's step runs the frozen backbone over inputs that no trainable weight touches:
- the decoder's layers 0..c_0-1 below the first cross block, over the prompt + answer (`first_cross_input`);
- with `model.context_layer` = m, the context path's m backbone layers over every chunk (`chunk_context_states`);
- with `kl_weight` > 0, the full-prompt teacher's next-token distribution on the answer tokens (a forward over the
  whole context inlined: the most expensive of the three).
With `train.frozen_cache=true`, `FrozenCache.fill` adds them to a batch (`decoder_states`, `chunk_states`,
`teacher_top_ids` / `teacher_top_logprobs`: the teacher's `teacher_top_k` best tokens, for `objectives.top_k_kl`):
a row seen before is read from `run_dir/frozen_cache/<signature>/`, keyed by its token ids; a batch with a row not
seen yet runs `frozen_features` (one jit over the batch) and stores its new rows. The step then runs only the
encoder, the cross blocks, the decoder from layer c_0 up and the LM head on answer positions.

The first epoch costs what it did (plus the writes); every later one skips the frozen forwards. Values go through
`train.frozen_cache_dtype` whether they were computed or read back, so a resumed run sees the same numbers; the
signature (backbone fingerprint, layer counts, dtypes, k) keeps features of another backbone or layout apart.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zipfile
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from comb_jax.model.transformer import chunk_context_states, first_cross_input, forward, lm_logits

STORAGE = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}


def frozen_features(backbone, batch, cfg) -> dict:
    """The frozen parts of the step for a whole batch (see the module docstring); jit-able.

    -> decoder_states [B, T, embed]; chunk_states [B, n, L, embed] (with a context path); teacher_top_ids (int32)
    and teacher_top_logprobs (float32) [B, A, k] at `answer_positions` (with kl_weight > 0).
    """
    m, dtype = cfg.model, jnp.dtype(cfg.compute_dtype)
    out = {"decoder_states": first_cross_input(backbone, batch["tokens"], m, dtype)}
    if m.context_layer:
        b, n, length = batch["chunk_tokens"].shape
        states = chunk_context_states(backbone, batch["chunk_tokens"].reshape(b * n, length), m, dtype)
        out["chunk_states"] = states.reshape(b, n, length, -1)
    if cfg.train.kl_weight > 0:
        hidden, _ = forward({"backbone": backbone}, batch["teacher_tokens"], m, dtype=dtype)
        index = jnp.take_along_axis(batch["teacher_index"], batch["answer_positions"], axis=1)  # [B, A]
        hidden = jnp.take_along_axis(hidden, index[..., None], axis=1)
        log_probs = jax.nn.log_softmax(lm_logits({"backbone": backbone}, hidden), axis=-1)
        top, ids = jax.lax.top_k(log_probs, min(cfg.train.teacher_top_k, log_probs.shape[-1]))
        out["teacher_top_logprobs"], out["teacher_top_ids"] = top, ids.astype(jnp.int32)
    return out


def check_supported(cfg):
    """Clear errors for the runs the cache does not serve."""
    tc = cfg.train
    if tc.objective != "answer":
        raise ValueError(f"train.frozen_cache serves train.objective=answer, not {tc.objective!r}")
    if tc.hidden_weight > 0:
        raise ValueError("train.frozen_cache does not keep the teacher's hidden states: set train.hidden_weight=0 "
                         "(or train.frozen_cache=false)")
    if jax.process_count() > 1:
        raise NotImplementedError("train.frozen_cache keeps one process's rows: train in one process, or without it")


class FrozenCache:
    """Per-row frozen features on disk (see the module docstring). `fill(batch)` -> the batch with them added;
    `hits` / `misses` count rows."""

    def __init__(self, cfg, directory, backbone, fingerprint: str):
        check_supported(cfg)
        if "://" in str(directory):
            raise ValueError(f"train.frozen_cache keeps its rows on local disk; {directory} is not local (set "
                             "train.frozen_cache=false, or a local train.run_dir)")
        self.cfg, self.backbone = cfg, backbone
        self.storage = STORAGE[cfg.train.frozen_cache_dtype]
        m, tc = cfg.model, cfg.train
        signature = {"backbone": fingerprint, "first_cross_layer": m.cross_layers[0],
                     "context_layer": m.context_layer, "compute_dtype": cfg.compute_dtype,
                     "storage": tc.frozen_cache_dtype, "teacher_top_k": tc.teacher_top_k if tc.kl_weight > 0 else 0}
        text = json.dumps(signature, sort_keys=True)
        self.directory = Path(directory) / hashlib.sha256(text.encode()).hexdigest()[:16]
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "signature.json").write_text(text + "\n")
        self._compute = jax.jit(partial(frozen_features, cfg=cfg))
        self.hits = self.misses = 0
        self.last_fill_s = 0.0  # seconds the last `fill` took (a miss runs the frozen forwards)

    # -- rows ------------------------------------------------------------------------------------------------

    @staticmethod
    def _row_lengths(batch, i) -> tuple[int, list[int]]:
        """(decoder tokens up to the last answer target, each chunk's real tokens) of row i."""
        mask = batch["loss_mask"][i]
        where = np.flatnonzero(mask > 0)
        decoder = int(where[-1]) + 1 if len(where) else 0
        return decoder, [int(c) for c in batch["chunk_mask"][i].sum(-1)]

    def _key(self, batch, i, decoder: int, chunks: list[int]) -> str:
        h = hashlib.sha256()
        h.update(np.asarray(batch["tokens"][i, :decoder], np.int32).tobytes())
        h.update(np.asarray(batch["loss_mask"][i, :decoder] > 0).tobytes())
        for j, n in enumerate(chunks):
            h.update(f"|{n}|".encode())
            h.update(np.asarray(batch["chunk_tokens"][i, j, :n], np.int32).tobytes())
        if self.cfg.train.kl_weight > 0:  # the teacher's top k also depend on its full prompt
            h.update(np.asarray(batch["teacher_tokens"][i], np.int32).tobytes())
        return h.hexdigest()

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.npz"

    def _store(self, key: str, row: dict):
        path = self._path(key)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez(tmp, **{k: (v.view(np.uint16) if v.dtype == ml_dtypes.bfloat16 else v) for k, v in row.items()})
        os.replace(tmp, path)  # a killed write leaves no half file under the key

    def _load(self, key: str) -> dict | None:
        path = self._path(key)
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as f:
                row = {k: f[k] for k in f.files}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # unreadable: computed again and rewritten
            return None
        return {k: (v.view(self.storage) if k.endswith("_states") and v.dtype == np.uint16 else v)
                for k, v in row.items()}

    # -- batches -----------------------------------------------------------------------------------------------

    def _split(self, features: dict, i: int, decoder: int, chunks: list[int], count: int) -> dict:
        """Row i of `features` cut to its real tokens (states in the storage dtype)."""
        row = {"decoder_states": np.asarray(features["decoder_states"][i, :decoder]).astype(self.storage)}
        if "chunk_states" in features:
            row["chunk_states"] = np.concatenate([np.asarray(features["chunk_states"][i, j, :n])
                                                  for j, n in enumerate(chunks)]).astype(self.storage)
        if "teacher_top_ids" in features:
            row["teacher_top_ids"] = np.asarray(features["teacher_top_ids"][i, :count], np.int32)
            row["teacher_top_logprobs"] = np.asarray(features["teacher_top_logprobs"][i, :count], np.float32)
        return row

    def fill(self, batch: dict) -> dict:
        """`batch` (host numpy, one process) with the frozen features of every row added, in the compute dtype."""
        start = time.perf_counter()
        rows = len(batch["tokens"])
        lengths = [self._row_lengths(batch, i) for i in range(rows)]
        keys = [self._key(batch, i, *lengths[i]) for i in range(rows)]
        loaded = [self._load(k) for k in keys]
        counts = [(batch["loss_mask"][i] > 0).sum() for i in range(rows)]
        missing = [i for i in range(rows) if loaded[i] is None]
        if missing:
            features = jax.device_get(self._compute(self.backbone, batch))
            for i in missing:
                loaded[i] = self._split(features, i, *lengths[i], counts[i])
                self._store(keys[i], loaded[i])
        self.misses += len(missing)
        self.hits += rows - len(missing)
        filled = dict(batch, **self._assemble(batch, loaded, lengths))
        if "teacher_top_ids" in filled:  # the step reads the teacher's top k, not its prompt
            filled = {k: v for k, v in filled.items() if k not in ("teacher_tokens", "teacher_index")}
        self.last_fill_s = time.perf_counter() - start
        return filled

    def _assemble(self, batch, loaded: list[dict], lengths) -> dict:
        """Pad the rows' features back into the batch's shapes."""
        dtype = np.dtype(jnp.dtype(self.cfg.compute_dtype))
        b, t = batch["tokens"].shape
        _, n, length = batch["chunk_tokens"].shape
        embed = loaded[0]["decoder_states"].shape[-1]
        out = {"decoder_states": np.zeros((b, t, embed), dtype)}
        if "chunk_states" in loaded[0]:
            out["chunk_states"] = np.zeros((b, n, length, embed), dtype)
        if "teacher_top_ids" in loaded[0]:
            a, k = batch["answer_positions"].shape[1], loaded[0]["teacher_top_ids"].shape[-1]
            out["teacher_top_ids"] = np.zeros((b, a, k), np.int32)
            out["teacher_top_logprobs"] = np.full((b, a, k), -1e9, np.float32)  # padding: p = 0, and no 0 * inf
        for i, (row, (decoder, chunks)) in enumerate(zip(loaded, lengths)):
            out["decoder_states"][i, :decoder] = row["decoder_states"].astype(dtype)
            if "chunk_states" in out:
                at = 0
                for j, c in enumerate(chunks):
                    out["chunk_states"][i, j, :c] = row["chunk_states"][at:at + c].astype(dtype)
                    at += c
            if "teacher_top_ids" in out:
                count = len(row["teacher_top_ids"])
                out["teacher_top_ids"][i, :count] = row["teacher_top_ids"]
                out["teacher_top_logprobs"][i, :count] = row["teacher_top_logprobs"]
        return out

"""PICache tiers below the device pool: host memory, then disk (tensorstore), keyed by fingerprint + chunk ids.

An entry is a chunk's token ids plus a dict of named arrays with the token axis second (`k`, `v` [E, L, K, D],
and whatever else the pool keeps per page, such as int8 scales), so a quantized PICache is stored the same way.

- Device -> host: the pool evicts an idle entry; `PICacheStore.spill` keeps its arrays in host memory (LRU,
  bounded by `host_bytes`) instead of dropping them.
- Disk: every entry the server encodes is written through to disk in the background, so a restarted server
  (or `python -m comb_jax.serving.encode_corpus`) finds it. A hit on host or disk is promoted back into the pool.
  `persist` returns a future that completes when the entry is durable: `POST /v1/documents` answers only then.
- Disk layout: ROOT/<fingerprint[:24]>/<key>/ with meta.json (ids, shapes, dtypes, sha256 checksum) and one
  zarr array per name. A write goes to a `.tmp-<pid>-...` directory, every file and directory in it is fsynced,
  and it is renamed into place (then the parent is fsynced), so a process killed mid-write leaves only a temp
  directory, never a half entry, and an entry that is there survives a power cut; a read recomputes the checksum.
  A damaged entry (bad meta.json, arrays or checksum) is logged once and removed, so it is encoded and written
  again on its next use.
- Keys hash the store fingerprint (encoder weights, tokenizer, pool dtype and array layout) with the ids;
  a hit also compares the ids themselves. An entry under another fingerprint is never read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import threading
import uuid
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor, wait
from functools import partial
from pathlib import Path

import jax
import numpy as np

from comb_jax.errors import UsageError
from comb_jax.serving.pool import entry_key  # the one key of an entry in every tier

log = logging.getLogger(__name__)

STORE_FORMAT = 1
TMP_PREFIX = ".tmp-"


# ---------------------------------------------------------------------------------------------------------
# Identity


def store_fingerprint(pool_fingerprint: str, layout: dict[str, tuple[str, tuple[int, ...]]]) -> str:
    """sha256 over the pool's fingerprint (encoder weights + tokenizer) and each array's dtype and shape per page,
    so a float32 store is never read by a bfloat16 or int8 server."""
    text = json.dumps({"format": STORE_FORMAT, "pool": pool_fingerprint,
                       "layout": {k: [d, list(s)] for k, (d, s) in sorted(layout.items())}}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def checksum(ids, arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256(np.asarray(ids, np.int64).tobytes())
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.name}:{a.shape}".encode())
        h.update(a.view(np.uint8).tobytes())
    return h.hexdigest()


def nbytes(arrays: dict[str, np.ndarray]) -> int:
    return sum(a.nbytes for a in arrays.values())


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)  # a directory too: fsync on its fd makes its entries durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path):
    """fsync every file and directory under `root`, deepest first, so renaming `root` publishes durable bytes."""
    for dirpath, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            _fsync(os.path.join(dirpath, name))
        _fsync(dirpath)


def done_future(result=None) -> Future:
    fut: Future = Future()
    fut.set_result(result)
    return fut


def check_store_dir(root) -> Path | None:
    """The store directory, created if need be and checked writable (UsageError, one line, otherwise);
    None for no store ('none' or empty)."""

    if root is None or str(root).strip().lower() in ("", "none"):
        return None
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f"{TMP_PREFIX}{os.getpid()}-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"--store-dir {root} cannot be used: {e.strerror or e}") from None
    return root


class StoreWriteError(OSError):
    """An entry could not be made durable (disk full, read-only, gone): the entry still serves from memory."""


# ---------------------------------------------------------------------------------------------------------
# Device pool <-> per-token arrays (fixed page counts: one compile each, whatever the chunk length)


def _leaf_name(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def pool_arrays(pool) -> dict[str, jax.Array]:
    """The pool's page arrays by name, each [E, pages, page_tokens, ...]: "k" and "v", or their leaves when the
    pool stores a pytree per side (an int8 PICache: "k.values", "k.scale", ...)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path({"k": pool.k, "v": pool.v})
    return {_leaf_name(path): leaf for path, leaf in leaves}


def set_pool_arrays(pool, arrays: dict[str, jax.Array]):
    """Put arrays named as by `pool_arrays` back into the pool's k and v (same structure)."""
    paths, treedef = jax.tree_util.tree_flatten_with_path({"k": pool.k, "v": pool.v})
    tree = jax.tree_util.tree_unflatten(treedef, [arrays[_leaf_name(path)] for path, _ in paths])
    pool.k, pool.v = tree["k"], tree["v"]


def pool_layout(pool) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {name: (a.dtype.name, tuple(a.shape[2:])) for name, a in pool_arrays(pool).items()}


@jax.jit
def gather_pages(arrays, pages):
    """arrays: name -> [E, P_pool, pt, ...]; pages [P] -> name -> [E, P, pt, ...]."""
    return jax.tree.map(lambda a: a[:, pages], arrays)


@partial(jax.jit, donate_argnums=(0,))
def scatter_pages(arrays, pages, values):
    """Write values (name -> [E, P, pt, ...]) into `pages` [P] of the (donated) pool arrays; ids out of range are
    dropped (padding)."""
    return jax.tree.map(lambda a, v: a.at[:, pages].set(v.astype(a.dtype), mode="drop"), arrays, values)


def max_entry_pages(pool) -> int:
    return math.ceil(pool.serve.max_chunk_tokens / pool.serve.page_tokens)


def read_entry(pool, entry) -> dict[str, np.ndarray]:
    """A written pool entry -> name -> [E, L, ...] host arrays (its tokens only)."""
    width = max_entry_pages(pool)
    pages = np.zeros((width,), np.int32)
    pages[:len(entry.pages)] = entry.pages
    out = {}
    for name, a in gather_pages(pool_arrays(pool), pages).items():
        a = np.asarray(a)
        a = a.reshape(a.shape[0], a.shape[1] * a.shape[2], *a.shape[3:])
        out[name] = a[:, :entry.length]
    return out


def write_entry(pool, entry, arrays: dict[str, np.ndarray]):
    """Host arrays (name -> [E, L, ...]) -> the pages `entry` reserved in the pool."""
    width, pt = max_entry_pages(pool), pool.serve.page_tokens
    pages = np.full((width,), pool.num_pages, np.int32)  # out of range: dropped
    pages[:len(entry.pages)] = entry.pages
    current = pool_arrays(pool)
    values = {}
    for name, target in current.items():
        a = arrays[name]
        if a.shape[1] != entry.length or a.shape[2:] != target.shape[3:] or a.shape[0] != target.shape[0]:
            raise ValueError(f"stored array {name!r} has shape {a.shape}, the pool needs "
                             f"{(target.shape[0], entry.length, *target.shape[3:])}")
        padded = np.zeros((a.shape[0], width * pt, *a.shape[2:]), a.dtype)
        padded[:, :entry.length] = a
        values[name] = padded.reshape(a.shape[0], width, pt, *a.shape[2:])
    set_pool_arrays(pool, scatter_pages(current, pages, values))


# ---------------------------------------------------------------------------------------------------------
# Tiers


class HostTier:
    """Entries in host memory, least recently used first out once `capacity_bytes` is exceeded."""

    def __init__(self, capacity_bytes: int):
        self.capacity = capacity_bytes
        self.entries: OrderedDict[str, tuple[tuple[int, ...], dict[str, np.ndarray]]] = OrderedDict()
        self.bytes = 0

    def put(self, key: str, ids, arrays) -> list[tuple[str, tuple[int, ...], dict]]:
        """Keep an entry; returns the entries pushed out to make room (oldest first)."""
        self.pop(key)
        self.entries[key] = (tuple(ids), arrays)
        self.bytes += nbytes(arrays)
        out = []
        while self.bytes > self.capacity and self.entries:
            old_key, (old_ids, old_arrays) = self.entries.popitem(last=False)
            self.bytes -= nbytes(old_arrays)
            out.append((old_key, old_ids, old_arrays))
        return out

    def get(self, key: str, ids):
        found = self.entries.get(key)
        if found is None or found[0] != tuple(ids):  # ids compared, never the hash alone
            return None
        return found[1]

    def pop(self, key: str):
        found = self.entries.pop(key, None)
        if found is not None:
            self.bytes -= nbytes(found[1])
        return found


def meta_problem(meta, fingerprint: str) -> str | None:
    """Why a decoded meta.json cannot be an entry of this store (None: it can)."""
    if not isinstance(meta, dict):
        return "meta.json is not an object"
    if meta.get("fingerprint") != fingerprint:
        return "meta.json names another fingerprint"
    ids, arrays = meta.get("ids"), meta.get("arrays")
    if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
        return "meta.json has no token ids"
    if not isinstance(arrays, dict) or not all(isinstance(a, dict) for a in arrays.values()):
        return "meta.json has no arrays"
    if not isinstance(meta.get("checksum"), str):
        return "meta.json has no checksum"
    return None


class DiskTier:
    """One directory per entry under ROOT/<fingerprint[:24]>/, written atomically (temp dir + rename)."""

    def __init__(self, root: str | Path, fingerprint: str):
        self.fingerprint = fingerprint
        self.dir = Path(root) / fingerprint[:24]
        self.dir.mkdir(parents=True, exist_ok=True)
        self.remove_stale_temps()

    def path(self, key: str) -> Path:
        return self.dir / key

    def keys(self) -> list[str]:
        return sorted(p.name for p in self.dir.iterdir() if not p.name.startswith(".") and p.is_dir())

    def has(self, key: str) -> bool:
        return (self.path(key) / "meta.json").is_file()

    def remove_stale_temps(self):
        """Delete temp directories of writers that are gone (killed mid-write): they were never entries."""
        for p in self.dir.glob(TMP_PREFIX + "*"):
            try:
                pid = int(p.name[len(TMP_PREFIX):].split("-")[0])
                if pid != os.getpid():
                    os.kill(pid, 0)  # raises if the writer no longer exists
                    continue
            except (ValueError, ProcessLookupError):
                pass
            except PermissionError:  # alive, another user's
                continue
            shutil.rmtree(p, ignore_errors=True)

    def write(self, key: str, ids, arrays: dict[str, np.ndarray]) -> bool:
        """Write an entry unless it is there already. Returns True if this call wrote it."""
        import tensorstore as ts

        final = self.path(key)
        if self.has(key):
            return False
        tmp = self.dir / f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            for name, a in arrays.items():
                spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(tmp / name)}}
                store = ts.open(spec, create=True, dtype=ts.dtype(a.dtype.name), shape=a.shape).result()
                store.write(a).result()
            meta = {"format": STORE_FORMAT, "fingerprint": self.fingerprint, "ids": [int(i) for i in ids],
                    "arrays": {n: {"dtype": a.dtype.name, "shape": list(a.shape)} for n, a in arrays.items()},
                    "checksum": checksum(ids, arrays)}
            (tmp / "meta.json").write_text(json.dumps(meta))
            fsync_tree(tmp)
            os.rename(tmp, final)  # atomic: the entry appears whole or not at all
            _fsync(self.dir)  # and the rename itself survives a crash
            return True
        except OSError:
            if final.is_dir() and self.has(key):  # another writer won the race
                return False
            raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def read_meta(self, key: str) -> dict | None:
        """The entry's meta.json, or None when there is no entry; a damaged one is dropped (logged once)."""
        try:
            meta = json.loads((self.path(key) / "meta.json").read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            if not self.path(key).is_dir():
                return None  # removed meanwhile (another process dropped it)
            self.drop(key, f"unreadable meta.json: {type(e).__name__}: {e}")
            return None
        problem = meta_problem(meta, self.fingerprint)
        if problem is not None:
            self.drop(key, problem)
            return None
        return meta

    def drop(self, key: str, why: str):
        """Remove a damaged entry so its next use encodes and writes it afresh (a warning, once per damage)."""
        log.warning("PICache store: dropping damaged entry %s (%s); it is encoded again on its next use", key, why)
        shutil.rmtree(self.path(key), ignore_errors=True)

    def read(self, key: str, ids) -> dict[str, np.ndarray] | None:
        """The entry's arrays, or None when absent, for other ids or another fingerprint, or corrupt (then it is
        removed, so the chunk is encoded afresh)."""
        import tensorstore as ts

        meta = self.read_meta(key)
        if meta is None or meta.get("ids") != [int(i) for i in ids]:
            return None
        try:
            arrays = {}
            for name, info in meta["arrays"].items():
                spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(self.path(key) / name)}}
                arrays[name] = np.asarray(ts.open(spec, open=True).result().read().result())
                if arrays[name].dtype.name != info["dtype"] or list(arrays[name].shape) != info["shape"]:
                    raise ValueError(f"array {name} does not match meta.json")
            if checksum(ids, arrays) != meta["checksum"]:
                raise ValueError("checksum mismatch")
        except Exception as e:  # a damaged entry is a miss, never served
            self.drop(key, f"{type(e).__name__}: {e}")
            return None
        return arrays

    def delete(self, key: str):
        shutil.rmtree(self.path(key), ignore_errors=True)


class PICacheStore:
    """Host and disk tiers for one fingerprint. `root=None`: host memory only (nothing outlives the process).

    Not thread-safe for callers: one thread (the scheduler) calls it; disk writes run on a background writer.
    """

    def __init__(self, fingerprint: str, root: str | Path | None = None, host_bytes: int = 1 << 30):
        self.fingerprint = fingerprint
        self.host = HostTier(host_bytes)
        self.disk = DiskTier(root, fingerprint) if root is not None else None
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="picache-writer")
        self.pending: dict[str, Future] = {}
        self.lock = threading.Lock()
        self.write_errors = 0

    def key(self, ids) -> str:
        return entry_key(self.fingerprint, ids)

    def get(self, ids) -> tuple[dict[str, np.ndarray], str] | None:
        """(arrays, tier) from host ("host", moved out of it: the caller promotes it) or disk ("disk"), or None."""
        key = self.key(ids)
        arrays = self.host.get(key, ids)
        if arrays is not None:
            self.host.pop(key)
            return arrays, "host"
        if self.disk is not None:
            self._wait(key)
            arrays = self.disk.read(key, ids)
            if arrays is not None:
                return arrays, "disk"
        return None

    def spill(self, ids, arrays):
        """An entry leaving the device pool: keep it in host memory; entries pushed out of host are on disk."""
        for _key, old_ids, old_arrays in self.host.put(self.key(ids), ids, arrays):
            self.persist(old_ids, old_arrays)  # normally written already: then this is a no-op

    def persist(self, ids, arrays) -> Future:
        """Write an entry to disk in the background. The future completes when the entry is durable (at once
        without a disk tier or when it is there) and raises StoreWriteError when it cannot be written."""
        known = self.durable(ids)
        if known is not None:
            return known
        key = self.key(ids)
        with self.lock:  # another thread may have started the same write since
            if key not in self.pending:
                self.pending[key] = self.writer.submit(self._write, key, tuple(ids), arrays)
            return self.pending[key]

    def durable(self, ids) -> Future | None:
        """A future for the entry's durability (pending write or done), or None when it is on no disk and no
        write is pending (never written, or the write failed): persist it again."""
        if self.disk is None:
            return done_future()
        key = self.key(ids)
        with self.lock:
            if key in self.pending:
                return self.pending[key]
        return done_future() if self.disk.has(key) else None

    def _write(self, key, ids, arrays):
        try:
            self.disk.write(key, ids, arrays)
        except Exception as e:  # a full or read-only disk costs the entry its disk copy, not the server
            self.write_errors += 1
            log.warning("PICache store: could not write entry %s: %s", key, e)
            raise StoreWriteError(f"entry {key[:12]} could not be written: {type(e).__name__}: {e}") from e
        finally:
            with self.lock:
                self.pending.pop(key, None)

    def _wait(self, key):
        with self.lock:
            fut = self.pending.get(key)
        if fut is not None:
            wait([fut])  # a failed write is a miss here, not an error

    def tier(self, ids) -> str | None:
        key = self.key(ids)
        if self.host.get(key, ids) is not None:
            return "host"
        if self.disk is not None and (self.disk.has(key) or key in self.pending):
            return "disk"
        return None

    def disk_entries(self) -> list[tuple[str, list[int]]]:
        """(key, ids) of every complete entry on disk under this fingerprint."""
        if self.disk is None:
            return []
        out = []
        for key in self.disk.keys():
            meta = self.disk.read_meta(key)
            if meta is not None:
                out.append((key, meta["ids"]))
        return out

    def flush(self):
        """Wait for every background write (failures were logged and counted in `write_errors`)."""
        with self.lock:
            futures = list(self.pending.values())
        wait(futures)

    def close(self):
        self.flush()
        self.writer.shutdown(wait=True)

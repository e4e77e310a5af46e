"""A content fingerprint of a parameter tree that every process computes from what it holds.

Each element contributes mix(its global flat index, its bits) to a sum modulo 2^64 per array; a process adds up
the shards it owns (one replica of each) and the processes' sums are added together. The result depends on the
values, their positions, shapes and dtypes, not on how the arrays are sharded or over how many processes: a
backbone read whole by one process and one read in slices across a pod have the same fingerprint.
"""

from __future__ import annotations

import hashlib
import math

import jax
import numpy as np

from comb_jax import distributed
from comb_jax.model.layout import flatten_names

_BLOCK = 1 << 22  # elements mixed at once


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _bits(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.view(np.dtype(f"u{a.dtype.itemsize}")).astype(np.uint64) if a.dtype.itemsize <= 8 else a


def block_checksum(values: np.ndarray, offsets: tuple[int, ...], shape: tuple[int, ...]) -> int:
    """Sum mod 2^64 of mix(flat index in `shape`, bits) over `values`, a block of an array of `shape` whose first
    element sits at `offsets`."""
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    k = 0  # iterate over the first k axes so that each piece holds at most _BLOCK elements
    while k < values.ndim and math.prod(values.shape[k:]) > _BLOCK:
        k += 1
    inner = np.uint64(0)  # flat index of each element of a piece, relative to the piece's first element
    for d in range(k, values.ndim):
        along = (np.arange(values.shape[d], dtype=np.uint64) + np.uint64(offsets[d])) * np.uint64(strides[d])
        inner = inner + along.reshape([-1] + [1] * (values.ndim - d - 1))
    total = np.uint64(0)
    with np.errstate(over="ignore"):
        for lead in np.ndindex(*values.shape[:k]):
            base = np.uint64(sum((offsets[d] + i) * strides[d] for d, i in enumerate(lead)))
            index = (inner + base) * np.uint64(0x9E3779B97F4A7C15)
            total += np.sum(_splitmix64(_bits(values[lead]) ^ _splitmix64(index)), dtype=np.uint64)
    return int(total)


def _local_checksum(leaf) -> int:
    if isinstance(leaf, jax.Array):
        total = 0
        for shard in leaf.addressable_shards:
            if shard.replica_id == 0:  # each element counted once over all processes
                offsets = tuple(s.indices(n)[0] for s, n in zip(shard.index, leaf.shape))
                total += block_checksum(np.asarray(shard.data), offsets, leaf.shape)
        return total % (1 << 64)
    if distributed.process_index() != 0:  # a host copy that every process has: counted on one
        return 0
    arr = np.asarray(leaf)
    return block_checksum(arr, (0,) * arr.ndim, arr.shape)


def tree_fingerprint(tree) -> str:
    """sha256 over (name, shape, dtype, content checksum) of every array, the same on every process."""
    leaves = sorted(flatten_names(tree).items())
    local = [_local_checksum(leaf) for _, leaf in leaves]  # gathered as JSON: JAX would narrow uint64 to 32 bits
    sums = [sum(column) % (1 << 64) for column in zip(*distributed.allgather_json(local))]
    h = hashlib.sha256()
    for (name, leaf), checksum in zip(leaves, sums):
        h.update(f"{name}:{tuple(leaf.shape)}:{np.dtype(leaf.dtype).name}:{checksum:016x}\n".encode())
    return h.hexdigest()

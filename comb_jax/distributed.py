"""Several hosts, one program: `jax.distributed` set up once, and the few helpers a multi-process run needs.

Every host runs the same command. `initialize` joins them: explicit `--coordinator HOST:PORT --num-processes N
--process-id I` (CPU and bare GPU clusters), or the environment (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
`JAX_PROCESS_ID`), or what jax detects by itself (a Cloud TPU pod slice, SLURM, Open MPI, Kubernetes). With none of
these it does nothing: a one-process run is unchanged. It must run before anything touches a device.

`is_primary()` names the one process that writes host files (metrics, progress bars, caches, exports);
`barrier(name)` waits for every process; `broadcast(value)` hands the primary's value to all of them;
`allgather(array)` stacks one small host array per process; `allgather_json(value)` lists one JSON value per process.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _detected() -> bool:
    """Whether jax would find a cluster by itself (TPU pod slice, SLURM with several tasks, Open MPI, k8s)."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return True
    return bool(os.environ.get("TPU_WORKER_HOSTNAMES", "").count(","))  # a multi-host Cloud TPU slice


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               timeout_s: int = 300) -> bool:
    """Join the other processes of this run (see the module docstring). Returns whether jax.distributed runs.

    On the CPU the processes talk through gloo. Calling it again (or after jax.distributed.initialize) is a no-op.
    """
    if jax.distributed.is_initialized():
        return True
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    explicit = (coordinator, num_processes, process_id)
    if any(v is not None for v in explicit) and None in explicit:
        raise ValueError("a multi-process run needs all of --coordinator HOST:PORT, --num-processes N and "
                         f"--process-id I (got {coordinator!r}, {num_processes!r}, {process_id!r})")
    if num_processes == 1 or (coordinator is None and not _detected()):
        return False
    if coordinator is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id {process_id} is not in [0, {num_processes})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id,
                               initialization_timeout=timeout_s)
    return True


def add_arguments(parser) -> None:
    """The multi-host flags, the same in every command line (train.py, python -m comb_jax.eval / .export)."""
    pod = parser.add_argument_group("multi-host (run the same command on every host; TPU pods, SLURM and the "
                                    "JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables are "
                                    "detected without flags)")
    pod.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address, the same on every host")
    pod.add_argument("--num-processes", type=int, metavar="N", help="how many processes (hosts) take part")
    pod.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0 .. N-1")


def initialize_from(args, prog: str) -> bool:
    """`initialize` with the flags of `add_arguments`; an inconsistent set is a usage error: one line
    (`PROG: error: ...`) and exit status 2, as the command lines report theirs."""
    try:
        return initialize(args.coordinator, args.num_processes, args.process_id)
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from e


def process_count() -> int:
    return jax.process_count()


def process_index() -> int:
    return jax.process_index()


def is_primary() -> bool:
    """The process that writes host files: process 0."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier of this `name` (nothing to wait for in one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def broadcast(value):
    """The primary's `value` (a pytree of numbers or arrays) on every process."""
    if jax.process_count() == 1:
        return value
    return multihost_utils.broadcast_one_to_all(value)


def allgather(value) -> np.ndarray:
    """[process_count, *shape]: every process's small host array `value`, stacked in process order."""
    value = np.asarray(value)
    if jax.process_count() == 1:
        return value[None]
    return np.asarray(multihost_utils.process_allgather(value))


def host_copy(tree):
    """Numpy copies of a tree of global arrays, whole on every process (every process must call it)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def allgather_json(value) -> list:
    """Every process's JSON-able `value` (e.g. a data iterator state), in process order."""
    if jax.process_count() == 1:
        return [value]
    data = np.frombuffer(json.dumps(value, sort_keys=True).encode(), np.uint8)
    sizes = allgather(np.asarray(len(data), np.int64))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:len(data)] = data
    return [json.loads(bytes(row[:n]).decode()) for row, n in zip(allgather(padded), sizes.tolist())]


__all__ = ["add_arguments", "initialize", "initialize_from", "process_count", "process_index", "is_primary",
           "barrier", "broadcast", "allgather", "host_copy", "allgather_json"]

"""Sharding: logical axis names -> mesh axes, declared once in a rules table.

Parameters carry logical axes in `layout.py`; activations and caches name theirs where they are built.
A mesh axis is dropped for a dimension it does not divide (for example SmolLM2's 3 KV heads on a 2-way
tensor axis): that dimension is replicated instead of failing.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from comb_jax.config import MeshConfig
from comb_jax.model.layout import Param, is_param

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes); absent or None means replicated.
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "layers": None,
    "norm": None,
    "seq": None,
    "pages": None,
    "page_tokens": None,
}


def _ici_sizes(mesh_cfg: MeshConfig, count: int) -> list[int]:
    """(data, fsdp, tensor) over `count` devices, -1 resolved."""
    sizes = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {mesh_cfg}")
    if -1 in sizes:
        if count % known:
            raise ValueError(f"{count} devices do not divide into mesh {mesh_cfg}")
        sizes[sizes.index(-1)] = count // known
    return sizes


def _slices(devices) -> int:
    """How many TPU slices the devices span (1 where the platform has no slices)."""
    return len({getattr(d, "slice_index", 0) for d in devices})


def device_grid(mesh_cfg: MeshConfig, devices) -> np.ndarray:
    """The devices arranged as the (data, fsdp, tensor) mesh: a plain reshape in one slice, a hybrid ICI x DCN
    mesh over several (`MeshConfig`; `jax.experimental.mesh_utils.create_hybrid_device_mesh`, by TPU slice, or by
    process where devices have no slices)."""
    dcn = [mesh_cfg.dcn_data, mesh_cfg.dcn_fsdp, 1]
    slices = _slices(devices)
    if math.prod(dcn) == 1 and slices > 1:  # multislice without dcn_*: the slices split the data axis
        dcn[0] = slices
    granules = math.prod(dcn)
    if granules == 1:
        sizes = _ici_sizes(mesh_cfg, len(devices))
        if math.prod(sizes) > len(devices):
            raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, have "
                             f"{len(devices)}")
        return np.array(devices[: math.prod(sizes)], dtype=object).reshape(sizes)
    by_process = slices == 1
    count = len({d.process_index for d in devices}) if by_process else slices
    if count != granules:
        raise ValueError(f"mesh dcn_data x dcn_fsdp = {dcn[0]} x {dcn[1]} needs {granules} "
                         f"{'processes' if by_process else 'slices'}, have {count}")
    ici = _ici_sizes(mesh_cfg, len(devices) // granules)
    if math.prod(ici) * granules != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, ici))} x dcn {dcn} uses {math.prod(ici) * granules} of the "
                         f"{len(devices)} devices: a hybrid mesh must use them all")
    return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=by_process,
                                                allow_split_physical_axes=True)


def make_mesh(mesh_cfg: MeshConfig, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: every process's devices); see `device_grid`.

    Devices are ordered by process, so the last (tensor) axis stays inside one host and each process holds a
    contiguous block of batch rows. Over several processes the mesh must use every device (it would otherwise leave
    some process without work and hang it) and the tensor axis must divide one host's devices.
    """
    whole_system = devices is None
    devices = list(devices if devices is not None else jax.devices())
    if whole_system:
        devices.sort(key=lambda d: (d.process_index, d.id))
    grid = device_grid(mesh_cfg, devices)
    sizes = list(grid.shape)
    if whole_system and jax.process_count() > 1:
        if grid.size != len(devices):
            raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} uses {grid.size} of the {len(devices)} "
                             f"devices of {jax.process_count()} processes: a multi-process mesh must use them all")
        if jax.local_device_count() % sizes[2]:
            raise ValueError(f"mesh tensor={sizes[2]} must divide one host's {jax.local_device_count()} devices: "
                             "the tensor axis stays inside a host")
    return Mesh(grid, MESH_AXES)


def partition_spec(shape, axes, mesh: Mesh, rules=RULES) -> PartitionSpec:
    """PartitionSpec for an array of `shape` with logical `axes`; each mesh axis used at most once."""
    used: set[str] = set()
    spec = []
    for dim, name in zip(shape, axes):
        target = rules.get(name) if name is not None else None
        names = (target,) if isinstance(target, str) else tuple(target or ())
        names = tuple(a for a in names if a in mesh.shape and mesh.shape[a] > 1 and a not in used)
        size = math.prod(mesh.shape[a] for a in names)
        if not names or dim % size:
            spec.append(None)
            continue
        used.update(names)
        spec.append(names[0] if len(names) == 1 else names)
    while spec and spec[-1] is None:  # canonical form: no trailing replicated dims
        spec.pop()
    return PartitionSpec(*spec)


def logical_sharding(shape, axes, mesh: Mesh, rules=RULES) -> NamedSharding:
    return NamedSharding(mesh, partition_spec(shape, axes, mesh, rules))


def param_shardings(layout, mesh: Mesh, rules=RULES):
    """NamedSharding tree matching a layout (or any subtree of it)."""
    return jax.tree.map(lambda p: logical_sharding(p.shape, p.axes, mesh, rules), layout, is_leaf=is_param)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def shard_params(params, layout, mesh: Mesh):
    """Place a host/param tree onto the mesh following its layout."""
    return jax.device_put(params, param_shardings(layout, mesh))


__all__ = ["Param", "RULES", "device_grid", "make_mesh", "partition_spec", "logical_sharding", "param_shardings",
           "shard_params", "replicated"]

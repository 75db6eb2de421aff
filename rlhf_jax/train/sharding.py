"""Device meshes and sharding rules for the training steps.

One mesh with two axes, ``("data", "fsdp")``:

- a batch is split over both axes together along its first (batch) axis,
  so every device gets ``B / (data * fsdp)`` rows;
- parameters (and, with the same rule, optimizer moments, which have the
  parameters' shapes) are either replicated on every device, or, with FSDP,
  split along their largest axis that the ``fsdp`` size divides, and
  replicated over ``data``.

The jitted steps themselves carry no sharding code: their inputs are placed
with `NamedSharding`s from here, and `jax.jit` is given the same shardings
as `out_shardings` so the state keeps its layout from step to step (XLA's
SPMD partitioner inserts the all-gathers and reduce-scatters). With a
1 x 1 mesh, or no mesh at all, the same code runs on one device.

Example:

    mesh = make_mesh(data=2, fsdp=2)
    state_sh = param_shardings(state, mesh, fsdp=True)
    state = jax.device_put(state, state_sh)
    step = jax.jit(step_fn, out_shardings=(state_sh, replicated(mesh)))
    state, metrics = step(state, shard_batch(batch, mesh))
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["DATA_AXIS", "FSDP_AXIS", "BATCH_AXES", "make_mesh", "param_shardings",
           "batch_sharding", "shard_batch", "replicated"]

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)


def make_mesh(*, data: int | None = None, fsdp: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `Mesh` of shape ``(data, fsdp)`` with axis names ``("data", "fsdp")``.

    Args:
      data: size of the data-parallel axis; None = all devices not used by
        ``fsdp`` (``len(devices) // fsdp``).
      fsdp: size of the parameter-sharding axis.
      devices: the devices to use (default `jax.devices()`); the first
        ``data * fsdp`` of them form the mesh.

    Returns:
      The mesh.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("`devices` is empty")
    if not isinstance(fsdp, int) or fsdp < 1:
        raise ValueError(f"`fsdp` must be a positive int, got {fsdp!r}")
    if data is None:
        if len(devices) % fsdp:
            raise ValueError(f"`fsdp`={fsdp} does not divide the {len(devices)} devices; give `data`")
        data = len(devices) // fsdp
    if not isinstance(data, int) or data < 1:
        raise ValueError(f"`data` must be a positive int or None, got {data!r}")
    if data * fsdp > len(devices):
        raise ValueError(
            f"a {data} x {fsdp} mesh (`data` x `fsdp`) needs {data * fsdp} devices, "
            f"only {len(devices)} are available")
    grid = np.asarray(devices[: data * fsdp], dtype=object).reshape(data, fsdp)
    return Mesh(grid, BATCH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding that keeps a full copy on every device of `mesh`."""
    return NamedSharding(mesh, PartitionSpec())


def _fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int) -> PartitionSpec:
    if fsdp_size <= 1 or len(shape) == 0 or int(np.prod(shape)) < min_size:
        return PartitionSpec()
    candidates = [(size, axis) for axis, size in enumerate(shape) if size % fsdp_size == 0]
    if not candidates:
        return PartitionSpec()
    # the largest divisible axis; on a tie the earlier one (stable across runs)
    _, axis = max(candidates, key=lambda c: (c[0], -c[1]))
    spec = [None] * len(shape)
    spec[axis] = FSDP_AXIS
    return PartitionSpec(*spec)


def param_shardings(params: Any, mesh: Mesh, *, fsdp: bool, min_size: int = 0) -> Any:
    """A `NamedSharding` for every leaf of `params` (or of a whole train state).

    Args:
      params: a pytree of arrays (or `ShapeDtypeStruct`s). Applied to a train
        state, optimizer moments get the same layout as their parameters
        because the rule depends only on a leaf's shape and dtype.
      mesh: a mesh from `make_mesh`.
      fsdp: False = replicate every leaf; True = split each floating-point
        leaf along its largest axis divisible by the ``fsdp`` axis size
        (leaves with no such axis, integer leaves such as step counters and
        PRNG keys, and leaves smaller than `min_size` elements stay
        replicated).
      min_size: leaves with fewer elements are replicated even with FSDP.

    Returns:
      A pytree of `NamedSharding` with the structure of `params`.
    """
    if FSDP_AXIS not in mesh.axis_names:
        raise ValueError(f"`mesh` must have an axis named {FSDP_AXIS!r}, got {mesh.axis_names}")
    fsdp_size = mesh.shape[FSDP_AXIS] if fsdp else 1

    def rule(leaf):
        dtype = getattr(leaf, "dtype", None)
        shape = tuple(np.shape(leaf))
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            return NamedSharding(mesh, PartitionSpec())
        return NamedSharding(mesh, _fsdp_spec(shape, fsdp_size, min_size))

    return jax.tree.map(rule, params)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """The sharding of a batch array of rank `ndim`: axis 0 over ("data", "fsdp")."""
    if ndim < 1:
        raise ValueError(f"a batch array needs a batch axis, got rank {ndim}")
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def shard_batch(batch: Mapping[str, Any] | Any, mesh: Mesh) -> Any:
    """Place every array of `batch` with its first axis split over the mesh.

    Args:
      batch: a dict (or any pytree) of arrays sharing the batch size `B`.
      mesh: a mesh from `make_mesh`; `B` must be divisible by its device count.

    Returns:
      The same pytree of `jax.Array`s, sharded.
    """
    n = mesh.shape[DATA_AXIS] * mesh.shape[FSDP_AXIS]
    leaves_with_paths = jax.tree_util.tree_leaves_with_path(batch)
    for path, leaf in leaves_with_paths:
        shape = np.shape(leaf)
        name = jax.tree_util.keystr(path) or "batch"
        if len(shape) == 0:
            raise ValueError(f"`batch{name}` is a scalar; every batch array needs a batch axis")
        if shape[0] % n:
            raise ValueError(
                f"`batch{name}` has batch size {shape[0]}, which the {n} devices of the "
                f"mesh ({mesh.shape[DATA_AXIS]} data x {mesh.shape[FSDP_AXIS]} fsdp) do not divide")
    return jax.tree.map(lambda x: jax.device_put(x, batch_sharding(mesh, np.ndim(x))), batch)

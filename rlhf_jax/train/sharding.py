"""Device meshes and sharding rules for the training steps.

One mesh with three axes, ``("data", "fsdp", "tensor")``:

- a batch is split over ``data`` and ``fsdp`` together along its first (batch)
  axis, so every device gets ``B / (data * fsdp)`` rows (replicated over
  ``tensor``);
- parameters (and, with the same rule, optimizer moments, which have the
  parameters' shapes and paths) follow rules by parameter path
  (:data:`TENSOR_RULES`): with ``tensor > 1`` the Llama/GPT-2 projections are
  split Megatron-style (the column-parallel q/k/v, gate/up, embedding and LM
  head on their output axis, the row-parallel o/down projections on their
  input axis), and with FSDP each floating-point leaf is further split along
  its largest remaining axis that the ``fsdp`` size divides. Per-layer
  parameters carry a leading stacked layer axis ``[L, ...]`` (the layers are
  one scanned block): it is never split, so each scan step reads its layer's
  shards.

The jitted steps themselves carry no sharding code: their inputs are placed
with `NamedSharding`s from here, and `jax.jit` is given the same shardings
as `out_shardings` so the state keeps its layout from step to step (XLA's
SPMD partitioner inserts the all-gathers and reduce-scatters). With a
1 x 1 x 1 mesh, or no mesh at all, the same code runs on one device.

Example:

    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    state_sh = param_shardings(state, mesh, fsdp=True)
    state = jax.device_put(state, state_sh)
    step = jax.jit(step_fn, out_shardings=(state_sh, replicated(mesh)))
    state, metrics = step(state, shard_batch(batch, mesh))
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["DATA_AXIS", "FSDP_AXIS", "TENSOR_AXIS", "BATCH_AXES", "MESH_AXES", "TENSOR_RULES",
           "make_mesh", "param_shardings", "param_spec", "tree_paths", "batch_sharding", "shard_batch",
           "replicated", "mesh_batch_size", "place", "constrain_rows"]

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
TENSOR_AXIS = "tensor"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)
MESH_AXES = (DATA_AXIS, FSDP_AXIS, TENSOR_AXIS)

# Tensor-parallel rules: (regex searched in the "/"-joined parameter path, which trailing axis
# is split over "tensor"). The index counts from the end, so a stacked layer axis in front does
# not move it. Kernels are stored [in, out].
TENSOR_RULES: tuple[tuple[str, int], ...] = (
    # Llama family (Llama, Qwen2, Mistral)
    (r"embed_tokens/embedding$", -2),                      # [V, D]: vocabulary
    (r"self_attn/(q|k|v)_proj/kernel$", -1),               # [D, H*Dh]: heads
    (r"self_attn/(q|k|v)_proj/bias$", -1),
    (r"self_attn/o_proj/kernel$", -2),                     # [H*Dh, D]: heads
    (r"mlp/(gate|up)_proj/kernel$", -1),                   # [D, F]
    (r"mlp/(gate|up)_proj/bias$", -1),
    (r"mlp/down_proj/kernel$", -2),                        # [F, D]
    (r"(^|/)lm_head/kernel$", -1),                         # [D, V]
    # GPT-2
    (r"wte/embedding$", -2),
    (r"attn/c_attn/kernel$", -1),
    (r"attn/c_attn/bias$", -1),
    (r"attn/c_proj/kernel$", -2),
    (r"mlp/c_fc/kernel$", -1),
    (r"mlp/c_fc/bias$", -1),
    (r"mlp/c_proj/kernel$", -2),
)
_TENSOR_RULES = tuple((re.compile(rx), axis) for rx, axis in TENSOR_RULES)
# Per-layer parameters of the scanned block carry a leading layer axis.
_STACKED = re.compile(r"(^|/)trunk/(layers|h)/")


def make_mesh(*, data: int | None = None, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `Mesh` of shape ``(data, fsdp, tensor)`` with axis names ``("data", "fsdp", "tensor")``.

    Args:
      data: size of the data-parallel axis; None = all devices not used by
        ``fsdp * tensor`` (``len(devices) // (fsdp * tensor)``).
      fsdp: size of the parameter-sharding axis.
      tensor: size of the tensor-parallel axis (1 = none).
      devices: the devices to use (default `jax.devices()`, every process's); the first
        ``data * fsdp * tensor`` of them form the mesh.

    Returns:
      The mesh.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("`devices` is empty")
    for name, value in (("fsdp", fsdp), ("tensor", tensor)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive int, got {value!r}")
    inner = fsdp * tensor
    if data is None:
        if len(devices) % inner:
            raise ValueError(f"`fsdp` x `tensor` = {inner} does not divide the {len(devices)} devices; give `data`")
        data = len(devices) // inner
    if not isinstance(data, int) or data < 1:
        raise ValueError(f"`data` must be a positive int or None, got {data!r}")
    if data * inner > len(devices):
        raise ValueError(
            f"a {data} x {fsdp} x {tensor} mesh (`data` x `fsdp` x `tensor`) needs {data * inner} "
            f"devices, only {len(devices)} are available")
    grid = np.asarray(devices[: data * inner], dtype=object).reshape(data, fsdp, tensor)
    return Mesh(grid, MESH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding that keeps a full copy on every device of `mesh`."""
    return NamedSharding(mesh, PartitionSpec())


def mesh_batch_size(mesh: Mesh) -> int:
    """How many ways a batch is split on `mesh` (``data * fsdp``)."""
    return int(mesh.shape[DATA_AXIS] * mesh.shape.get(FSDP_AXIS, 1))


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def tree_paths(tree, is_leaf=None) -> list[tuple[str, Any]]:
    """``[(path, leaf)]`` with paths joined by "/" (dict keys, attribute names, indices)."""
    flat = jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_leaf)
    return [("/".join(_key_name(k) for k in path), leaf) for path, leaf in flat]


def param_spec(path: str, shape: tuple[int, ...], *, fsdp_size: int = 1, tensor_size: int = 1,
               min_size: int = 0) -> PartitionSpec:
    """The `PartitionSpec` of one floating-point leaf by its path and shape.

    A leaf under ``trunk/layers/`` (``trunk/h/`` for GPT-2) has a stacked layer axis 0 that is
    never split. The tensor-parallel rule of its path (:data:`TENSOR_RULES`) splits one axis
    over ``tensor`` when ``tensor_size`` divides it; then FSDP splits the largest remaining
    axis that ``fsdp_size`` divides (the earlier one on a tie). Leaves with fewer than
    ``min_size`` elements stay replicated.
    """
    ndim = len(shape)
    spec: list = [None] * ndim
    if ndim == 0 or int(np.prod(shape)) < max(min_size, 1):
        return PartitionSpec()
    first = 1 if (_STACKED.search(path) and ndim >= 2) else 0
    if tensor_size > 1:
        for regex, axis in _TENSOR_RULES:
            if regex.search(path):
                axis = ndim + axis
                if axis >= first and shape[axis] % tensor_size == 0:
                    spec[axis] = TENSOR_AXIS
                break
    if fsdp_size > 1:
        candidates = [(shape[a], a) for a in range(first, ndim)
                      if spec[a] is None and shape[a] % fsdp_size == 0]
        if candidates:
            _, axis = max(candidates, key=lambda c: (c[0], -c[1]))
            spec[axis] = FSDP_AXIS
    if all(a is None for a in spec):
        return PartitionSpec()
    return PartitionSpec(*spec)


def param_shardings(params: Any, mesh: Mesh, *, fsdp: bool, min_size: int = 0) -> Any:
    """A `NamedSharding` for every leaf of `params` (or of a whole train state).

    Args:
      params: a pytree of arrays (or `ShapeDtypeStruct`s). Applied to a train
        state, optimizer moments get the same layout as their parameters
        because the rule depends only on a leaf's path ending, shape and dtype.
      mesh: a mesh from `make_mesh` (a mesh without a "tensor" axis works too).
      fsdp: False = no FSDP split; True = split each floating-point leaf along its
        largest axis divisible by the ``fsdp`` axis size (see `param_spec`).
        Tensor-parallel splits apply whenever the mesh's "tensor" axis is > 1.
        Integer leaves (step counters, PRNG keys), leaves with no divisible axis
        and leaves smaller than `min_size` elements stay replicated.
      min_size: leaves with fewer elements are replicated.

    Returns:
      A pytree of `NamedSharding` with the structure of `params`.
    """
    if FSDP_AXIS not in mesh.axis_names:
        raise ValueError(f"`mesh` must have an axis named {FSDP_AXIS!r}, got {mesh.axis_names}")
    fsdp_size = mesh.shape[FSDP_AXIS] if fsdp else 1
    tensor_size = mesh.shape.get(TENSOR_AXIS, 1)
    leaves = tree_paths(params)
    specs = []
    for path, leaf in leaves:
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            specs.append(NamedSharding(mesh, PartitionSpec()))
            continue
        spec = param_spec(path, tuple(np.shape(leaf)), fsdp_size=fsdp_size, tensor_size=tensor_size,
                          min_size=min_size)
        specs.append(NamedSharding(mesh, spec))
    return jax.tree.unflatten(jax.tree.structure(params), specs)


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
    n = mesh_batch_size(mesh)
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
    return jax.tree.map(lambda x: place(x, batch_sharding(mesh, np.ndim(x))), batch)


def place(x, sharding):
    """`x` (a host array, or a `jax.Array`) laid out with `sharding`.

    A host array goes through `jax.make_array_from_callback`, so each process copies
    only the slices of its own devices (every process holds the same host array, as in
    a multi-host data loader that reads the same global batch); a device array is moved
    with `jax.device_put`.
    """
    if isinstance(x, jax.Array):
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def constrain_rows(tree, *, axis: int = 0, mesh=None):
    """Inside `jit`: every array of `tree` with its row axis `axis` split over ("data", "fsdp").

    For row gathers inside a step (a minibatch `x[perm_idx]`, a `lax.map` over row chunks),
    whose output sharding XLA's SPMD partitioner cannot infer: without the constraint it
    replicates the gathered rows and so every device computes the whole minibatch. The mesh
    is `mesh`, else the context mesh (`jax.set_mesh(mesh)` around the call); with neither, or
    a batch split of 1, or an axis the split does not divide, the array is returned as it is
    (the single-device program is unchanged).
    """
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            return tree
    if not all(name in mesh.axis_names for name in BATCH_AXES):
        return tree
    n = int(np.prod([mesh.shape[name] for name in BATCH_AXES]))
    if n == 1:
        return tree

    def constrain(x):
        if x is None or np.ndim(x) <= axis or np.shape(x)[axis] % n:
            return x
        spec = PartitionSpec(*([None] * axis), BATCH_AXES)
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    return jax.tree.map(constrain, tree)

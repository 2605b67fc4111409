"""Where logical axis names meet devices: meshes, sharding rules, global batches, hosts.

Parameters and key activations are declared with logical axis names where they are
created (`("embed", "mlp")` for a kernel, `("batch", "length", "embed")` for the residual
stream). A rule set maps logical names to the mesh axes `data`, `fsdp` and `tensor`; names
without a rule are replicated. Three presets:

  data_parallel  batch over data x fsdp; every parameter replicated.
  fsdp           and every parameter's `embed` axis over fsdp (ZeRO-3: parameters,
                 gradients and optimizer state are split; XLA gathers them per layer).
  fsdp_tensor    and heads / kv_heads / mlp / vocab over tensor (Megatron-style tensor
                 parallelism inside each layer, FSDP across).

A rule whose mesh axis has size 1 does nothing, so one preset serves many mesh shapes:
`fsdp` on a mesh `data=-1` is pure data parallelism. The config names them:

  config.mesh = dict(data=-1, fsdp=1, tensor=1)   # -1: the devices left over
  config.sharding = "fsdp"                        # or [("embed", "fsdp"), ...]
"""

import contextlib
import functools
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

_DATA_PARALLEL: Rules = (("batch", BATCH_AXES),)
_FSDP: Rules = _DATA_PARALLEL + (("embed", "fsdp"),)
_TENSOR: Rules = (("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"),
                  ("vocab", "tensor"))
PRESETS: dict[str, Rules] = {
    "data_parallel": _DATA_PARALLEL,
    "fsdp": _FSDP,
    "fsdp_tensor": _FSDP + _TENSOR,
}


def rules(spec: str | Sequence) -> Rules:
  """A preset's name, or explicit `[(logical_name, mesh_axis or tuple or None), ...]`."""
  if isinstance(spec, str):
    if spec not in PRESETS:
      raise ValueError(f"Unknown sharding preset {spec!r}; choose one of {sorted(PRESETS)} "
                       "or give a list of (logical axis, mesh axes) rules.")
    return PRESETS[spec]
  out = []
  for rule in spec:
    logical, mesh_axes = rule
    unknown = [a for a in _axes(mesh_axes) if a not in MESH_AXES]
    if unknown:
      raise ValueError(f"Sharding rule {tuple(rule)} names mesh axes {unknown}; the mesh "
                       f"axes are {MESH_AXES}.")
    out.append((logical, mesh_axes if isinstance(mesh_axes, str) or mesh_axes is None
                else tuple(mesh_axes)))
  return tuple(out)


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """`{data, fsdp, tensor}` sizes, at most one of them -1 (the devices left over), as the
  mesh shape over `num_devices`."""
  unknown = sorted(set(sizes) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"config.mesh has unknown axes {unknown}; the mesh axes are {MESH_AXES}.")
  shape = [int(sizes.get(axis, 1)) for axis in MESH_AXES]
  fill = [i for i, s in enumerate(shape) if s == -1]
  if len(fill) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"config.mesh={dict(sizes)}: sizes must be positive, with at most one "
                     "-1 (filled with the remaining devices).")
  known = math.prod(s for s in shape if s != -1)
  if fill:
    if num_devices % known:
      raise ValueError(f"config.mesh={dict(sizes)}: {num_devices} devices are not divisible "
                       f"by the fixed axes' {known}.")
    shape[fill[0]] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ValueError(f"config.mesh={dict(sizes)} needs {math.prod(shape)} devices, but "
                     f"{num_devices} are available; set one axis to -1 to fill.")
  return tuple(shape)


def make_mesh(sizes: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
  """The `("data", "fsdp", "tensor")` mesh over `devices` (default: all), laid out by
  `jax.make_mesh` so the tensor axis is the fastest-connected."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(sizes, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def _fits(mesh: Mesh, spec: PartitionSpec, shape: Sequence[int]) -> PartitionSpec:
  """`spec` with the mesh axes dropped from any dimension they do not divide evenly."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
    out.append(axes if dim % _size(mesh, axes) == 0 else None)
  return PartitionSpec(*out)


def logical_sharding(mesh: Mesh, rule_set: Rules, axes: Sequence[str | None],
                     shape: Sequence[int]) -> NamedSharding:
  """The sharding of an array of `shape` whose dimensions are named `axes`. A dimension
  the mesh axes do not divide is replicated instead (e.g. 2 KV heads on 4 tensor ranks)."""
  spec = nn.logical_to_mesh_axes(tuple(axes), rule_set)
  return NamedSharding(mesh, _fits(mesh, spec, shape))


def tree_shardings(boxed: Any, mesh: Mesh, rule_set: Rules) -> Any:
  """Shardings of a (possibly abstract) tree of `nn.Partitioned` boxes or plain arrays;
  plain leaves are replicated."""
  def leaf(x):
    if isinstance(x, nn.Partitioned):
      return logical_sharding(mesh, rule_set, x.names, x.value.shape)
    return NamedSharding(mesh, PartitionSpec())
  return jax.tree_util.tree_map(leaf, boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def batch_sharding(mesh: Mesh, rule_set: Rules) -> NamedSharding:
  """Batches are split along their leading (example) axis as the `batch` rule says."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes(("batch",), rule_set))


def global_batch(local: Any, sharding: NamedSharding) -> Any:
  """This process's rows of a batch (numpy, leading axis = examples) -> global arrays.

  Each process holds `global_batch / process_count` rows, those of its own devices."""
  divisor = _size(sharding.mesh, sharding.spec[0])
  def put(x):
    x = np.asarray(x)
    rows = x.shape[0] * jax.process_count()
    if rows % divisor:
      raise ValueError(f"A global batch of {rows} examples cannot be split over the "
                       f"{divisor} devices of the batch axes {sharding.spec[0]}; make "
                       "data.batch_size a multiple of that.")
    return jax.make_array_from_process_local_data(sharding, x)
  return jax.tree_util.tree_map(put, local)


def place(tree: Any, shardings: Any) -> Any:
  """Puts each leaf on its sharding: device arrays are resharded, host (numpy) arrays are
  sliced so that each process supplies only its own devices' shards."""
  def put(x, sh):
    if isinstance(x, jax.Array):
      return jax.device_put(x, sh)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sh, lambda index: x[index])
  return jax.tree_util.tree_map(put, tree, shardings)


def _axes(entry) -> tuple[str, ...]:
  """The mesh axes of one PartitionSpec entry (a name, a tuple of names, or None)."""
  return (entry,) if isinstance(entry, str) else tuple(entry or ())


def _size(mesh: Mesh, entry) -> int:
  """How many devices one PartitionSpec entry splits a dimension over."""
  return math.prod(mesh.shape[a] for a in _axes(entry))


@contextlib.contextmanager
def rules_in_scope(mesh: Mesh, rule_set: Rules):
  """Makes `nn.with_logical_constraint` inside traced code resolve against `mesh`."""
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rule_set):
    yield


def with_rules(fn: Callable, mesh: Mesh, rule_set: Rules) -> Callable:
  """`fn` traced with the logical rules in scope, wherever it is jitted or lowered."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with rules_in_scope(mesh, rule_set):
      return fn(*args, **kwargs)
  return wrapped


# ---------------------------------------------------------------------------------------
# Several processes (hosts): `jax.distributed`, configured by the launch scripts.
# ---------------------------------------------------------------------------------------
def initialize_distributed() -> None:
  """Starts `jax.distributed` when the environment asks for it.

  MMJAX_COORDINATOR_ADDRESS, MMJAX_NUM_PROCESSES, MMJAX_PROCESS_ID: explicit (e.g. N
    processes on one machine, `launch/local.sh`).
  MMJAX_DISTRIBUTED=auto: let JAX detect the cluster (Cloud TPU VM pods, SLURM, Open MPI).
  Neither: one process, nothing to do.
  """
  address = os.environ.get("MMJAX_COORDINATOR_ADDRESS")
  if address:
    missing = [v for v in ("MMJAX_NUM_PROCESSES", "MMJAX_PROCESS_ID") if v not in os.environ]
    if missing:
      raise ValueError(f"MMJAX_COORDINATOR_ADDRESS is set but {missing} are not; set all "
                       "three (see launch/local.sh).")
    jax.distributed.initialize(address, int(os.environ["MMJAX_NUM_PROCESSES"]),
                               int(os.environ["MMJAX_PROCESS_ID"]))
  elif os.environ.get("MMJAX_DISTRIBUTED") == "auto":
    jax.distributed.initialize()
  else:
    return
  logging.info("Process %d of %d; %d local and %d global devices.", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())

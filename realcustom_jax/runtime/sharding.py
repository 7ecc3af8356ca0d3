"""Device mesh and parameter / batch shardings for training.

One mesh with two axes:
  'data': pure data parallelism; parameters are replicated along it.
  'fsdp': data parallelism that also shards parameters and optimizer state (each leaf
    along its largest dimension divisible by the axis size; the rest replicated).
The batch is split over both axes, so the global batch must be a multiple of
data * fsdp = the number of devices.

Multi-process runs: each process loads its own slice of the batch; `shard_batch`
assembles the global array with `jax.make_array_from_process_local_data`. Starting the
processes and watching them is `distributed`'s.
"""
from typing import Any, Mapping, Optional, Sequence

import jax
from jax.experimental import mesh_utils
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

DATA_AXIS = 'data'
FSDP_AXIS = 'fsdp'
MESH_AXES = (DATA_AXIS, FSDP_AXIS)
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)  # the batch dimension is split over both


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, int]:
  """Resolves (data, fsdp) from the config; one of them may be -1 (inferred).

  Raises:
    ValueError: both -1, a non-positive size, or a product that is not the device count.
  """
  sizes = [int(mesh_config[DATA_AXIS]), int(mesh_config[FSDP_AXIS])]
  if sizes.count(-1) > 1:
    raise ValueError(f'at most one of config.mesh.data / config.mesh.fsdp may be -1, '
                     f'got {tuple(sizes)}')
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f'config.mesh sizes must be positive or -1, got {tuple(sizes)}')
  if -1 in sizes:
    known = int(np.prod([s for s in sizes if s != -1]))
    if num_devices % known:
      raise ValueError(f'{num_devices} devices do not split into a mesh with '
                       f'(data, fsdp)={tuple(sizes)}')
    sizes[sizes.index(-1)] = num_devices // known
  if sizes[0] * sizes[1] != num_devices:
    raise ValueError(f'mesh (data, fsdp)={tuple(sizes)} needs {sizes[0] * sizes[1]} '
                     f'devices, but {num_devices} are available')
  return sizes[0], sizes[1]


def create_mesh(mesh_config: Mapping[str, int],
                devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """Builds the ('data', 'fsdp') mesh over `devices` (default: all devices).

  Uses `jax.sharding.Mesh` (Auto axes), not `jax.make_mesh`, whose Explicit default
  would change how un-annotated Linen code is sharded.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  if len(devices) == jax.device_count():
    # Topology-aware order (ICI rings on TPU, NVLink on GPU).
    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  else:
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def param_spec(shape: Sequence[int], fsdp_size: int) -> P:
  """Shards the largest dimension divisible by `fsdp_size` over 'fsdp'; else replicates."""
  if fsdp_size <= 1 or not shape:
    return P()
  candidates = [i for i, d in enumerate(shape) if d % fsdp_size == 0]
  if not candidates:
    return P()
  dim = max(candidates, key=lambda i: (shape[i], -i))
  spec = [None] * len(shape)
  spec[dim] = FSDP_AXIS
  return P(*spec)


def param_shardings(tree: Any, mesh: Mesh) -> Any:
  """NamedShardings for a tree of arrays or ShapeDtypeStructs (params, optimizer state)."""
  fsdp = mesh.shape[FSDP_AXIS]
  return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(np.shape(x), fsdp)), tree)


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape[DATA_AXIS] * mesh.shape[FSDP_AXIS]


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
  """Raises ValueError unless the global batch splits evenly over the mesh."""
  size = data_parallel_size(mesh)
  if global_batch_size <= 0 or global_batch_size % size:
    raise ValueError(f'global batch size {global_batch_size} must be a positive multiple '
                     f'of the data-parallel size {size} (mesh {dict(mesh.shape)})')


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Splits dimension 0 over ('data', 'fsdp'); the rest stays whole."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def batch_shardings(batch: Mapping[str, Any], mesh: Mesh) -> dict:
  return {k: batch_sharding(mesh, np.ndim(v)) for k, v in batch.items()}


def shard_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict:
  """Turns this process's slice of the batch into global arrays sharded over the mesh.

  Args:
    local_batch: dict of per-process arrays, each (B / process_count, ...).
    mesh: the training mesh.

  Returns:
    dict of global jax.Arrays, each (B, ...), sharded along dim 0.

  Raises:
    ValueError: the global batch is not a multiple of the data-parallel size.
  """
  out = {}
  for key, value in local_batch.items():
    value = np.asarray(value)
    global_batch = value.shape[0] * jax.process_count()
    check_batch_size(global_batch, mesh)
    out[key] = jax.make_array_from_process_local_data(
        batch_sharding(mesh, value.ndim), value, (global_batch,) + value.shape[1:])
  return out


def device_put_tree(tree: Any, shardings: Any) -> Any:
  """Places a host (or single-device) tree with the given shardings."""
  return jax.tree.map(lambda x, s: jax.device_put(x, s), tree, shardings)

"""Device mesh and shardings for the training loop: data parallel or FSDP over one mesh axis.

One mesh axis, ``'data'``, over the job's devices. The batch is always split along it. Data
parallel replicates params and optimizer state; FSDP shards each param's largest axis that
the device count divides (params smaller than ``min_size`` elements, and params with no such
axis, stay replicated) and gives the optimizer state the same shardings through
``optax.tree_map_params``: the latent weights and momenta mirror the params, the thresholds
and scalars are replicated. ``jax.jit`` then inserts the all-gathers and reduce-scatters.

The mesh axis is ``AxisType.Auto``: the compiler propagates shardings (explicit axes reject
some sharded convolutions in Flax linen).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D mesh ``('data',)`` over the first ``num_devices`` devices (default: all)."""
  devices = jax.devices()
  n = len(devices) if num_devices is None else int(num_devices)
  return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices[:n])


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the mesh."""
  return NamedSharding(mesh, P(DATA_AXIS))


def fsdp_spec(shape: Sequence[int], num_shards: int, min_size: int = 0) -> P:
  """Shards the largest axis divisible by ``num_shards`` (the last such on ties); else P()."""
  if num_shards <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  candidates = [(size, axis) for axis, size in enumerate(shape) if size % num_shards == 0]
  if not candidates:
    return P()
  _, axis = max(candidates)
  spec = [None] * len(shape)
  spec[axis] = DATA_AXIS
  return P(*spec)


def param_shardings(abstract_params: Any, mesh: Mesh, fsdp: bool, min_size: int = 0) -> Any:
  """One ``NamedSharding`` per param: replicated, or :func:`fsdp_spec` when ``fsdp``."""
  n = mesh.shape[DATA_AXIS]

  def sharding(leaf):
    spec = fsdp_spec(leaf.shape, n, min_size) if fsdp else P()
    return NamedSharding(mesh, spec)

  return jax.tree.map(sharding, abstract_params)


def optimizer_state_shardings(
  tx: optax.GradientTransformation, abstract_opt_state: Any, params_shardings: Any, mesh: Mesh
) -> Any:
  """The params' shardings on state leaves that mirror params, replicated elsewhere.

  The result is a pytree prefix of the state (``jax.jit`` shardings may be): subtrees that are
  not in the params' structure, such as the thresholds tree, get one replicated sharding.
  """
  return optax.tree_map_params(
    tx,
    lambda _, s: s,
    abstract_opt_state,
    params_shardings,
    transform_non_params=lambda _: replicated(mesh),
  )


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows of a global batch -> global arrays split over the mesh."""
  sharding = batch_sharding(mesh)
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
    for k, v in local_batch.items()
  }


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """``ShapeDtypeStruct`` leaves carrying ``shardings`` (a restore target).

  ``shardings`` may be a pytree prefix of ``abstract``, as ``jax.jit`` accepts: one sharding
  then applies to a whole subtree (:func:`optimizer_state_shardings` gives one for the
  thresholds tree).
  """

  def expand(sharding, subtree):
    return jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), subtree
    )

  return jax.tree.map(expand, shardings, abstract)

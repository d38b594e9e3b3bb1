"""Which optimizer-state leaves carry the params' metadata: ``nnx`` Variables and mesh shardings.

``nnx.Optimizer`` hands ``init`` a tree of ``nnx`` Variables; a tree built with its structure
gives every leaf the kernel's Variable type and metadata (its sharding), which is wrong for a
threshold (a scalar or a channel vector) and turns a missing leaf into a Variable holding
None. The chain builds such trees from :func:`plain` values and gives metadata back only to
leaves that mirror a param (:func:`with_param_metadata`).
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import AxisType


def is_variable(x: Any) -> bool:
  """An ``nnx`` Variable (``nnx.Optimizer`` hands ``init`` a tree of them)."""
  return hasattr(x, "get_value") and hasattr(x, "get_metadata")


def plain(tree: Any) -> Any:
  """``tree`` with every ``nnx`` Variable replaced by its value (and its metadata dropped)."""
  return jax.tree.map(lambda x: x.get_value() if is_variable(x) else x, tree, is_leaf=is_variable)


def with_param_metadata(tree: Any, params: Any) -> Any:
  """Gives each leaf of ``tree`` that mirrors a param Variable (its key path ends with the
  param's, same shape) that Variable's type and metadata, e.g. its sharding."""
  flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_variable)[0]
  variables = {tuple(path): v for path, v in flat if is_variable(v)}
  if not variables:
    return tree
  lengths = sorted({len(k) for k in variables})

  def wrap(path, leaf):
    for n in lengths:
      v = variables.get(tuple(path[-n:]))
      if v is not None and getattr(leaf, "shape", None) == v.get_value().shape:
        return v.replace(leaf)
    return leaf

  return jax.tree_util.tree_map_with_path(wrap, tree)


def with_sharding_of(values: Any, like: Any) -> Any:
  """On an explicit mesh a sharding is part of a value's type, and a per-channel threshold
  gradient (a sum over a kernel) comes out sharded like the kernel's channels: it gets its
  threshold's sharding back, so that thresholds and their optimizer state keep the sharding
  they were created with (replicated)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or AxisType.Explicit not in mesh.axis_types:
    return values
  leaves, treedef = jax.tree.flatten(like)
  out = [
    v if v is None else jax.sharding.reshard(v, jax.typeof(ref).sharding.spec)
    for v, ref in zip(treedef.flatten_up_to(values), leaves, strict=True)
  ]
  return treedef.unflatten(out)

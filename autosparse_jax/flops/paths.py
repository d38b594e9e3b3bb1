"""Param paths: '/'-joined key paths and the lookups that accept either ``params/...`` form."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax


def _key_name(key: Any) -> str:
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return str(key.name)
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _path_string(path: Sequence[Any]) -> str:
  names = [_key_name(k) for k in path]
  if len(names) > 1 and names[-1] == "value" and isinstance(path[-1], jax.tree_util.GetAttrKey):
    names = names[:-1]
  return "/".join(names)


def _leaves_by_path(tree: Any) -> dict[str, Any]:
  return {_path_string(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _alternatives(path: str) -> tuple[str, ...]:
  """``path`` and its form in the other tree (with / without the 'params/' collection)."""
  if path.startswith("params/"):
    return (path, path[len("params/") :])
  return (path, "params/" + path)


def _lookup(table: Mapping[str, Any], path: str) -> Any:
  for p in _alternatives(path):
    if p in table:
      return table[p]
  raise KeyError(path)


# --------------------------------------------------------------------------- dense MACs

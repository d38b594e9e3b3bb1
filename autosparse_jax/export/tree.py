"""Flatten a nested-mapping variables tree to (path, leaf) pairs and rebuild it exactly.

A path is the tuple of keys from the root (``('params', 'fc1', 'kernel')``); keys are ``str``
or ``int`` (an NNX pure dict of a list has int keys) so that they round-trip through JSON.
Mappings are rebuilt as ``dict`` in their original key order; empty mappings (a model without
``batch_stats``) are kept as nodes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

Key = str | int
Path = tuple[Key, ...]

#: The stand-in for an empty mapping in a flattened tree.
EMPTY = "empty"


def path_string(path: Path) -> str:
  """``('params', 'fc1', 'kernel')`` -> ``'params/fc1/kernel'``."""
  return "/".join(str(k) for k in path)


def flatten(tree: Mapping[Key, Any]) -> list[tuple[Path, Any]]:
  """``[(path, leaf), ...]`` in depth-first key order; an empty mapping gives ``(path, EMPTY)``.

  Raises:
    TypeError: a key that is not str/int, or a node that is neither a mapping nor an array.
  """
  out: list[tuple[Path, Any]] = []

  def visit(node: Any, path: Path) -> None:
    if isinstance(node, Mapping):
      if not node and path:
        out.append((path, EMPTY))
      for key, child in node.items():
        if not isinstance(key, str | int) or isinstance(key, bool):
          raise TypeError(
            f"key {key!r} at {path_string(path) or '<root>'}: only str and int keys are accepted"
          )
        visit(child, (*path, key))
    elif hasattr(node, "shape") and hasattr(node, "dtype"):
      out.append((path, node))
    else:
      raise TypeError(
        f"{path_string(path) or '<root>'} is a {type(node).__name__}; accepted: nested "
        "mappings (dict, FrozenDict, an NNX pure dict) of arrays"
      )

  if not isinstance(tree, Mapping):
    raise TypeError(f"the variables must be a mapping, got {type(tree).__name__}")
  visit(tree, ())
  return out


def unflatten(pairs: list[tuple[Path, Any]]) -> dict[Key, Any]:
  """The nested dicts of :func:`flatten`'s pairs (leaves as given, ``EMPTY`` as ``{}``)."""
  root: dict[Key, Any] = {}
  for path, leaf in pairs:
    node = root
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = {} if isinstance(leaf, str) and leaf == EMPTY else leaf
  return root


def as_numpy(leaf: Any) -> np.ndarray:
  """A host numpy copy of an array leaf (jax arrays are fetched; dtype kept)."""
  return np.asarray(leaf)

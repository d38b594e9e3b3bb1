"""Which leaves of a parameter tree are pruned.

A leaf is addressed by its '/'-joined key path: ``{'params': {'conv1': {'kernel': w}}}`` has
the path ``'params/conv1/kernel'``; NamedTuple fields and sequence indices join the same way,
and an ``nnx`` Variable's trailing ``value`` attribute is dropped (``'linear/kernel'``).

Only real floating-point leaves with ``ndim >= 2`` and at least one entry (dense and conv
kernels) are ever pruned: biases, norm scales, integer tables and empty arrays are never
candidates, whatever a rule says. A complex kernel that a rule selects is refused. A regex (in
:func:`kernels` or a rule list) that matches no path of the tree is an error: it is almost
always a path written for another tree (``params/conv_init`` on ``variables["params"]``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

Selector = Callable[[str, Any], bool]
Rule = tuple[str, bool]
Prunable = Selector | Sequence[Rule] | None

MIN_PRUNABLE_NDIM = 2


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_string(path: Sequence[Any]) -> str:
  """'/'-joined names of a jax key path (DictKey, GetAttrKey, SequenceKey, ...)."""
  names = [_key_name(k) for k in path]
  if len(names) > 1 and names[-1] == "value" and isinstance(path[-1], jax.tree_util.GetAttrKey):
    names = names[:-1]
  return "/".join(names)


def leaf_paths(tree: Any) -> list[str]:
  """Key-path strings of the leaves of ``tree``, in ``jax.tree.leaves`` order."""
  return [path_string(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def is_kernel(leaf: Any) -> bool:
  """A kernel: a real floating-point array with ndim >= 2 (pruned only if it has entries)."""
  dtype = getattr(leaf, "dtype", None)
  return (
    getattr(leaf, "ndim", 0) >= MIN_PRUNABLE_NDIM
    and dtype is not None
    and jnp.issubdtype(dtype, jnp.floating)
  )


def _as_patterns(arg: str | Sequence[str] | None, name: str) -> tuple[re.Pattern, ...]:
  if arg is None:
    return ()
  if isinstance(arg, str):
    arg = (arg,)
  try:
    return tuple(re.compile(p) for p in arg)
  except (TypeError, re.error) as e:
    raise ValueError(
      f"{name}: expected a regex string or a sequence of them, got {arg!r} ({e})"
    ) from None


def kernels(
  include: str | Sequence[str] | None = None, exclude: str | Sequence[str] | None = None
) -> Selector:
  """Selects kernels (leaves with ndim >= 2) by regexes over their '/'-joined paths.

  A leaf is selected when no ``exclude`` pattern matches its path (``re.search``) and, if
  ``include`` is given, at least one ``include`` pattern does. ``kernels()`` selects every
  kernel, the default of :func:`autosparse_jax.optax_chain`.
  """
  inc = _as_patterns(include, "include")
  exc = _as_patterns(exclude, "exclude")

  def select(path: str, leaf: Any) -> bool:
    if any(p.search(path) for p in exc):
      return False
    return not inc or any(p.search(path) for p in inc)

  return _RegexSelector(select, (("include", p) for p in inc), (("exclude", p) for p in exc))


class _RegexSelector:
  """A selector made of regexes, which :func:`check_patterns` verifies against a tree."""

  def __init__(self, select: Selector, *groups):
    self._select = select
    self.patterns: tuple[tuple[str, re.Pattern], ...] = tuple(p for g in groups for p in g)

  def __call__(self, path: str, leaf: Any) -> bool:
    return self._select(path, leaf)


def check_patterns(selector: Selector, paths: Sequence[str]) -> None:
  """Raises if a regex of ``selector`` (from :func:`kernels` or a rule list) matches none of
  ``paths``: such a rule selects or excludes nothing, silently."""
  for arg, pattern in getattr(selector, "patterns", ()):
    if not any(pattern.search(p) for p in paths):
      examples = ", ".join(repr(p) for p in paths[:4]) + (", ..." if len(paths) > 4 else "")
      raise ValueError(
        f"prunable: the {arg} pattern {pattern.pattern!r} matches no parameter path; the "
        f"paths look like {examples or 'nothing (no leaves)'}"
      )


def _from_rules(rules: Sequence[Rule]) -> Selector:
  compiled = []
  for rule in rules:
    if not (isinstance(rule, tuple | list) and len(rule) == 2 and isinstance(rule[1], bool)):
      raise ValueError(
        f"prunable: a rule list holds (regex, bool) pairs, first match wins; got {rule!r}"
      )
    compiled.append((_as_patterns(rule[0], "prunable")[0], rule[1]))

  def select(path: str, leaf: Any) -> bool:
    for pattern, decision in compiled:
      if pattern.search(path):
        return decision
    return False

  return _RegexSelector(select, (("rule", p) for p, _ in compiled))


def as_selector(prunable: Prunable) -> Selector:
  """Normalises the ``prunable`` argument: None (every kernel), rules or a callable."""
  if prunable is None:
    return kernels()
  if callable(prunable):
    return prunable
  if isinstance(prunable, Sequence) and not isinstance(prunable, str):
    return _from_rules(prunable)
  raise ValueError(
    "prunable: expected None (every kernel with ndim >= 2), a list of (regex, bool) rules "
    f"or a callable (path, leaf) -> bool; got {prunable!r}"
  )


def select_leaves(params: Any, prunable: Prunable) -> list[bool]:
  """One flag per leaf of ``params`` (``jax.tree.leaves`` order): is it pruned?

  Raises:
    ValueError: if the selection picks no leaf, a regex of it matches no path, or it selects
      a complex kernel.
  """
  selector = as_selector(prunable)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  check_patterns(selector, [path_string(p) for p, _ in flat])
  flags = []
  for path, leaf in flat:
    name = path_string(path)
    dtype = getattr(leaf, "dtype", None)
    if (
      dtype is not None
      and jnp.issubdtype(dtype, jnp.complexfloating)
      and getattr(leaf, "ndim", 0) >= MIN_PRUNABLE_NDIM
      and selector(name, leaf)
    ):
      raise ValueError(
        f"params: {name!r} is a complex kernel ({dtype}); sparse training prunes real "
        "floating-point kernels only: exclude it with prunable=kernels(exclude=...)"
      )
    flags.append(bool(is_kernel(leaf) and leaf.size > 0 and selector(name, leaf)))
  if not any(flags):
    candidates = [path_string(p) for p, x in flat if is_kernel(x) and x.size > 0]
    raise ValueError(
      "prunable: the selection picks no leaf to prune. Kernels (real floating-point, "
      f"ndim >= 2, not empty) in these params: {candidates or 'none'}"
    )
  return flags

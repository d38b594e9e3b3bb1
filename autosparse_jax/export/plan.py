"""Which layers of a model run from their sparse form: layer discovery, model check, policy.

A layer runs sparse only if it is a ``flax.linen.Dense`` (or a subclass: the projections of
transformer blocks built from ``nn.Dense`` qualify), its kernel is stored as CSR, and the
:class:`Policy` says the sparse product wins for its size, sparsity and batch. Everything else
(convolutions, ``DenseGeneral``, embeddings, small or dense layers) runs the ordinary dense
path, with the reason recorded in its :class:`Decision`.

Layers are found by tracing the model once (``jax.eval_shape``, nothing computed) with
``nn.intercept_methods`` and recording the class of every module called at each path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from autosparse_jax.export import format as format_lib
from autosparse_jax.export import tree as tree_lib

ModulePath = tuple[str, ...]


class Policy(NamedTuple):
  """Run ``y = x @ W`` from the sparse form when the kernel's sparsity is at least
  ``min_sparsity``, it has at least ``min_size`` weights, and the batch (rows of ``x`` that
  reach the layer: batch x sequence length in a transformer) is within
  ``[min_batch, max_batch]`` (``max_batch`` None: no upper bound)."""

  min_sparsity: float
  min_size: int
  min_batch: int = 1
  max_batch: int | None = None


class Decision(NamedTuple):
  """How one kernel runs: ``sparse`` or not, and why."""

  path: str  # the module path, '/'-joined ('fc1', 'Block_0/mlp/Dense_0')
  layer: str  # the module's class name
  shape: tuple[int, ...]
  sparsity: float
  sparse: bool
  reason: str


def module_classes(model: nn.Module, variables: Any, example: Any, **kwargs: Any) -> dict:
  """``{module path: class}`` of every module method ``__call__`` the model makes on
  ``example`` (abstractly traced)."""
  seen: dict[ModulePath, type] = {}

  def record(next_fun, args, kw, context):
    if context.method_name == "__call__":
      seen[tuple(context.module.path)] = type(context.module)
    return next_fun(*args, **kw)

  def run(v, x):
    with nn.intercept_methods(record):
      return model.apply(v, x, **kwargs)

  jax.eval_shape(run, variables, example)
  return seen


def _shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  return {
    tree_lib.path_string(path): (tuple(x.shape), np.dtype(x.dtype).name)
    for path, x in tree_lib.flatten(tree)
    if not (isinstance(x, str) and x == tree_lib.EMPTY)
  }


def check_model(
  exported: format_lib.SparseFile, model: nn.Module, input_shape: tuple[int, ...]
) -> None:
  """Raises ValueError (one line: what differs) unless ``exported`` holds ``model``'s
  variables: the same class (when the file names one) and the same paths, shapes and dtypes
  as ``model.init`` on an input of ``(1, *input_shape)``."""
  stored_class = (exported.model or {}).get("class")
  if stored_class is not None and stored_class != type(model).__name__:
    name = (exported.model or {}).get("name")
    raise ValueError(
      f"the file holds the variables of a {stored_class}"
      + (f" ({name!r})" if name else "")
      + f", not of a {type(model).__name__}"
    )
  example = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  expected = _shapes(jax.eval_shape(model.init, jax.random.key(0), example))
  stored = {
    tree_lib.path_string(leaf.path): (leaf.shape, leaf.dtype.name)
    for leaf in exported.leaves
    if leaf.storage != "empty"
  }
  stored = {
    k: v for k, v in stored.items() if k.split("/")[0] in {p.split("/")[0] for p in expected}
  }
  if stored != expected:
    missing = sorted(set(expected) - set(stored))
    extra = sorted(set(stored) - set(expected))
    differ = sorted(k for k in set(expected) & set(stored) if expected[k] != stored[k])
    what = (
      f"missing {missing[:3]}"
      if missing
      else f"unexpected {extra[:3]}"
      if extra
      else f"{differ[0]} is {stored[differ[0]]} in the file, the model has {expected[differ[0]]}"
    )
    raise ValueError(f"the file does not hold this {type(model).__name__}'s variables: {what}")


def input_shape_of(exported: format_lib.SparseFile, input_shape: tuple[int, ...] | None):
  """``input_shape`` if given, else the one the file records.

  Raises:
    ValueError: neither is known.
  """
  if input_shape is not None:
    return tuple(input_shape)
  stored = (exported.model or {}).get("input_shape")
  if stored is None:
    raise ValueError("the file records no input_shape: pass input_shape=(...) (one example)")
  return tuple(stored)


def decide(
  exported: format_lib.SparseFile,
  classes: dict[ModulePath, type],
  batch_size: int,
  policy: Policy,
  sparse_name: str,
) -> list[Decision]:
  """A :class:`Decision` for every kernel (a ``params`` leaf named ``kernel`` of ndim >= 2)."""
  out = []
  for leaf in exported.leaves:
    if leaf.path[0] != "params" or leaf.path[-1] != "kernel" or len(leaf.shape) < 2:
      continue
    module = tuple(leaf.path[1:-1])
    cls = classes.get(module)
    name = "unused" if cls is None else cls.__name__
    reason = None
    if cls is None or not issubclass(cls, nn.Dense):
      reason = f"{name} layers run dense (only nn.Dense has a sparse path)"
    elif leaf.storage != "csr":
      reason = f"stored dense ({leaf.note or f'{leaf.sparsity:.1%} sparse'})"
    elif leaf.sparsity < policy.min_sparsity:
      reason = f"{leaf.sparsity:.1%} sparse < {policy.min_sparsity:.0%}: dense is faster"
    elif leaf.size < policy.min_size:
      reason = f"{leaf.size:,} weights < {policy.min_size:,}: dense is faster"
    elif batch_size < policy.min_batch:
      reason = f"batch {batch_size} < {policy.min_batch}: {sparse_name} loses at small batch"
    elif policy.max_batch is not None and batch_size > policy.max_batch:
      reason = f"batch {batch_size} > {policy.max_batch}: dense is faster"
    out.append(
      Decision(
        path="/".join(str(k) for k in module),
        layer=name,
        shape=leaf.shape,
        sparsity=leaf.sparsity,
        sparse=reason is None,
        reason=reason or f"{leaf.sparsity:.1%} sparse, {leaf.size:,} weights: {sparse_name}",
      )
    )
  return out


def dense_variables(exported: format_lib.SparseFile, sparse_modules: set[ModulePath]) -> dict:
  """The variables tree without the kernels and biases of ``sparse_modules`` (those run from
  the sparse operands); every other leaf dense."""
  pairs = []
  for leaf in exported.leaves:
    if leaf.path[0] == "params" and tuple(leaf.path[1:-1]) in sparse_modules:
      continue
    pairs.append((leaf.path, tree_lib.EMPTY if leaf.storage == "empty" else leaf.dense()))
  return tree_lib.unflatten(pairs)


def bias_of(exported: format_lib.SparseFile, module: ModulePath) -> np.ndarray | None:
  try:
    return exported.leaf(("params", *module, "bias")).dense()
  except KeyError:
    return None


@contextlib.contextmanager
def sparse_dense_layers(
  operands: dict[str, Any], compute: Callable[[nn.Dense, jax.Array, Any], jax.Array]
) -> Iterator[None]:
  """Within the context, ``nn.Dense.__call__`` of a module whose '/'-joined path is a key of
  ``operands`` returns ``compute(module, inputs, operands[path])``; every other call runs as
  usual."""

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "__call__" and isinstance(module, nn.Dense):
      key = "/".join(module.path)
      if key in operands:
        (inputs,) = args
        return compute(module, inputs, operands[key])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(intercept):
    yield


def format_decisions(decisions: list[Decision]) -> list[str]:
  """One line per kernel: path, class, shape, sparsity, path taken, reason."""
  return [
    f"{d.path:<24} {d.layer:<10} {'x'.join(map(str, d.shape)):<14} {d.sparsity:7.1%}  "
    f"{'sparse' if d.sparse else 'dense ':<6}  {d.reason}"
    for d in decisions
  ]

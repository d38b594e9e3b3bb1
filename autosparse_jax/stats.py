"""Sparsity statistics from the actual zeros of the params, and a flat logging summary."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from autosparse_jax import counting
from autosparse_jax.chain import SparseTrainingState
from autosparse_jax.controller import ControllerState
from autosparse_jax.selection import Prunable, as_selector, check_patterns, is_kernel, path_string


class Sparsity(NamedTuple):
  """Fraction of exact zeros: over all selected kernels together, and per kernel."""

  total: jax.Array
  layers: dict[str, jax.Array]
  zeros: jax.Array
  size: int


def _value(x: Any) -> Any:
  # nnx Variables (e.g. in nnx.Optimizer's state) wrap their array.
  return x.get_value() if hasattr(x, "get_value") else x


def sparsity(params: Any, prunable: Prunable = None) -> Sparsity:
  """Zeros per kernel (real floating-point leaves with ndim >= 2, optionally narrowed by
  ``prunable``) and in total.

  ``total = sum_l zeros_l / sum_l size_l``. A kernel with no entries (a ``(0, 4)`` shape) is
  reported with sparsity 0 and adds nothing to the total. Works inside ``jax.jit``.
  """
  select = as_selector(prunable)
  flat = [(path_string(p), _value(x)) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]]
  check_patterns(select, [name for name, _ in flat])
  layers, zeros, size = {}, jnp.zeros((), jnp.int32), 0
  for name, leaf in flat:
    if not (is_kernel(leaf) and select(name, leaf)):
      continue
    n = counting.count(leaf == 0)
    layers[name] = n / max(leaf.size, 1)
    zeros, size = zeros + n, size + leaf.size
  if not layers:
    raise ValueError(
      "params: no kernel (real floating-point leaf with ndim >= 2) is selected, nothing to measure"
    )
  return Sparsity(zeros / max(size, 1), layers, zeros, size)


def find_state(opt_state: Any) -> SparseTrainingState | None:
  """The :class:`SparseTrainingState` inside any nesting of optimizer states, or None."""
  is_state = lambda x: isinstance(x, SparseTrainingState)  # noqa: E731
  for node in jax.tree.leaves(opt_state, is_leaf=is_state):
    if is_state(node):
      return node
  return None


def summary(params: Any, opt_state: Any = None, prunable: Prunable = None) -> dict[str, Any]:
  """A flat dict of scalars for logging.

  Keys: ``sparsity/total``, ``sparsity/<path>`` per kernel; and when ``opt_state`` holds an
  :func:`autosparse_jax.optax_chain` state: ``alpha`` (the last ``alpha_t``), ``step``,
  ``layers_at_ceiling`` (layers held at ``max_layer_sparsity``),
  ``tau/<path>`` (``sigmoid(s)``, the mean over channels for per-channel thresholds) and, with
  a sparsity or FLOP target, ``controller/target`` and ``controller/actual`` (the ramp's value
  and the measurement at the last step: sparsity, or the FLOP ratio).
  """
  stats = sparsity(params, prunable)
  out: dict[str, Any] = {"sparsity/total": stats.total}
  out.update({f"sparsity/{k}": v for k, v in stats.layers.items()})
  state = find_state(opt_state) if opt_state is not None else None
  if state is not None:
    out["alpha"] = _value(state.annealing.alpha)
    out["step"] = _value(state.annealing.step)
    out["layers_at_ceiling"] = _value(state.layers_at_ceiling)
    if isinstance(state.controller, ControllerState):
      out["controller/target"] = _value(state.controller.target)
      out["controller/actual"] = _value(state.controller.actual)
    for path, s in jax.tree_util.tree_flatten_with_path(state.latent.thresholds)[0]:
      out[f"tau/{path_string(path)}"] = jnp.mean(jax.nn.sigmoid(_value(s)))
  return out

"""Sparse cost: per-layer density, inference MACs and training MACs (conventions in
:mod:`autosparse_jax.flops`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from autosparse_jax.flops.paths import _alternatives, _leaves_by_path, _lookup


def _nonzero_fraction(leaf: Any) -> float:
  size = int(np.prod(np.shape(leaf)))
  if size == 0:
    return 0.0
  if isinstance(leaf, np.ndarray):
    nnz = int(np.count_nonzero(leaf))
  else:
    nnz = int(jnp.count_nonzero(leaf))
  return nnz / size


def layer_density(params: Any, paths: Iterable[str] | None = None) -> dict[str, float]:
  """Density ``d_l = nnz(W_l) / size(W_l) = 1 - sparsity_l`` per leaf, from the actual zeros.

  Args:
    params: a params tree (concrete arrays).
    paths: which leaves, e.g. the keys of :func:`count_macs`'s result (with or without a
      leading 'params/'); by default every leaf.

  Returns:
    ``{path: density}`` keyed by the given paths.
  """
  table = _leaves_by_path(params)
  paths = list(table) if paths is None else list(paths)
  out = {}
  for path in paths:
    try:
      leaf = _lookup(table, path)
    except KeyError:
      raise ValueError(
        f"no leaf at path {path!r} in params; its leaves include {sorted(table)[:8]} ..."
      ) from None
    out[path] = _nonzero_fraction(leaf)
  return out


def inference_macs(
  dense_macs: Mapping[str, int],
  params: Any,
  *,
  extra_macs: Mapping[str, int] | None = None,
) -> dict[str, Any]:
  """Inference MACs of a sparse model: ``sum_l (1 - s_l) * M_l + sum(extra_macs)``.

  Args:
    dense_macs: ``{path: M_l}``, dense MACs per layer (from :func:`count_macs`).
    params: the (sparse) params; ``s_l`` is measured from the zeros of the leaf at each path
      (paths with or without a leading 'params/' match either tree).
    extra_macs: costs charged in full to both sparse and dense totals, e.g.
      ``{'avg_pool': global_avg_pool_macs((7, 7, 2048))}`` for STR's ResNet-50 table.

  Returns:
    ``{'per_layer': {path: MACs}, 'density': {path: d_l}, 'total': MACs,
    'dense_total': MACs, 'ratio': total / dense_total}`` (MACs as floats; per_layer includes
    the extras).
  """
  density = layer_density(params, dense_macs)
  per_layer: dict[str, float] = {k: density[k] * m for k, m in dense_macs.items()}
  extras = dict(extra_macs or {})
  per_layer.update({k: float(v) for k, v in extras.items()})
  total = sum(per_layer.values())
  dense_total = sum(dense_macs.values()) + sum(extras.values())
  return {
    "per_layer": per_layer,
    "density": density,
    "total": total,
    "dense_total": dense_total,
    "ratio": total / dense_total if dense_total else float("nan"),
  }


# --------------------------------------------------------------------------- training MACs

Density = float | Mapping[str, float]


def _density_of(density: Density, path: str, name: str) -> float:
  if not isinstance(density, Mapping):
    d = float(density)
  else:
    try:
      d = float(_lookup(density, path))
    except KeyError:
      return 1.0
  if not 0.0 <= d <= 1.0:
    raise ValueError(f"{name} must be in [0, 1], got {d} for {path!r}")
  return d


def _check_keys(dense_macs: Mapping[str, int], density: Density, name: str) -> None:
  if isinstance(density, Mapping) and density:
    known = {a for k in dense_macs for a in _alternatives(k)}
    if not any(k in known for k in density):
      raise ValueError(
        f"none of the paths of {name} ({sorted(density)[:4]} ...) is a layer of "
        f"dense_macs ({sorted(dense_macs)[:4]} ...)"
      )


def _step_macs(
  dense_macs: Mapping[str, int], forward_density: Density, weight_grad_density: Density
) -> float:
  _check_keys(dense_macs, forward_density, "forward_density")
  _check_keys(dense_macs, weight_grad_density, "weight_grad_density")
  total = 0.0
  for path, m in dense_macs.items():
    d_fwd = _density_of(forward_density, path, "forward_density")
    d_wg = _density_of(weight_grad_density, path, "weight_grad_density")
    total += m * (2.0 * d_fwd + d_wg)
  return total


def training_macs_per_step(
  dense_macs: Mapping[str, int],
  forward_density: Density,
  weight_grad_density: Density,
) -> int:
  """Training MACs of one step for ONE example: ``sum_l M_l * (2 d^fwd_l + d^wg_l)``.

  Forward and activation gradient run at the forward density ``d^fwd_l``; the weight gradient
  at ``d^wg_l`` (1.0 while GA's alpha_t > 0, the forward density once alpha_t = 0 or for STR,
  ``1 - backward_sparsity`` for TopKAST). Dense training is ``3 * sum_l M_l``. Multiply by
  the batch size for a step's total.

  Args:
    dense_macs: ``{path: M_l}`` from :func:`count_macs`.
    forward_density: ``{path: d^fwd_l}`` (e.g. :func:`layer_density` of the params) or one
      float for every layer. Layers missing from a mapping count as dense (1.0).
    weight_grad_density: ``{path: d^wg_l}`` or one float, likewise.

  Raises:
    ValueError: a density outside [0, 1], or a mapping none of whose paths is a layer.
  """
  return round(_step_macs(dense_macs, forward_density, weight_grad_density))


class TrainingCostRecord(NamedTuple):
  """Densities in force for ``steps`` consecutive training steps (one history entry)."""

  forward_density: Density
  weight_grad_density: Density
  steps: int = 1


def training_cost_ratio(
  dense_macs: Mapping[str, int],
  history: Sequence[TrainingCostRecord | Mapping[str, Any]],
) -> float:
  """Training cost of a recorded run relative to dense training of the same length.

  ``ratio = sum_r n_r * C(r) / (sum_r n_r * 3 * sum_l M_l)`` with ``C(r)`` from
  :func:`training_macs_per_step` and ``n_r`` the steps record r covers (RigL's convention:
  averaged over the whole run). A value of 0.45 means the run cost 45% of dense training.

  Args:
    dense_macs: ``{path: M_l}`` from :func:`count_macs`.
    history: per-step or per-interval records: :class:`TrainingCostRecord`s or mappings with
      keys ``forward_density``, ``weight_grad_density`` and optionally ``steps`` (default 1).

  Raises:
    ValueError: an empty history, a negative step count, or bad densities.
  """
  dense_step = 3.0 * sum(dense_macs.values())
  total_cost = 0.0
  total_steps = 0
  for rec in history:
    if isinstance(rec, Mapping):
      rec = TrainingCostRecord(
        rec["forward_density"], rec["weight_grad_density"], rec.get("steps", 1)
      )
    if rec.steps < 0:
      raise ValueError(f"steps must be >= 0, got {rec.steps}")
    total_cost += rec.steps * _step_macs(dense_macs, rec.forward_density, rec.weight_grad_density)
    total_steps += rec.steps
  if total_steps == 0 or dense_step == 0:
    raise ValueError("history must cover at least one step of a model with MACs")
  return total_cost / (total_steps * dense_step)


# --------------------------------------------------------------------------- runs (logging)

GA_METHODS = ("autosparse", "topkast_ga", "rigl_ga", "mest_ga")
"""Methods whose weight gradient is dense while gradient annealing's ``alpha_t > 0``."""
DENSE_GRADIENT_ON_UPDATE = ("rigl", "rigl_ga")
"""Methods that grow by the dense gradient on their mask-update steps (RigL)."""


def weight_grad_density(
  method: str,
  forward_density: Mapping[str, float],
  *,
  alpha: float | None = None,
  backward_sparsity: float | None = None,
  update_every: int | None = None,
) -> Density:
  """The weight-gradient density ``d^wg_l`` of a training method (see the module docstring).

  * ``'dense'``: 1.0;
  * GA methods (``'autosparse'``, ``'topkast_ga'``, ``'rigl_ga'``, ``'mest_ga'``) while
    ``alpha > 0``: 1.0 (masked weights get ``alpha_t * g``; TopKAST+GA's default backward set
    is every weight);
  * ``'topkast'``, ``'topkast_pp'``: ``1 - backward_sparsity`` on every layer of
    ``forward_density`` (the prunable ones; the others count as dense);
  * ``'rigl'`` (and ``'rigl_ga'`` once ``alpha = 0``): ``d_l + (1 - d_l) / update_every``, the
    dense gradient one step in ``update_every`` (RigL's own accounting);
  * otherwise (``'str'``, ``'gmp'``, ``'set'``, ``'mest'``: random growth, MEST's score uses
    the sparse gradient; GA methods once ``alpha = 0``): ``forward_density``.
  """
  if method == "dense":
    return 1.0
  if method in GA_METHODS and alpha is not None and alpha > 0:
    return 1.0
  if method in ("topkast", "topkast_pp"):
    if backward_sparsity is None:
      raise ValueError(f"method {method!r} needs its backward_sparsity")
    return {k: 1.0 - float(backward_sparsity) for k in forward_density}
  if method in DENSE_GRADIENT_ON_UPDATE:
    if not update_every or update_every < 1:
      raise ValueError(f"method {method!r} needs its update_every (>= 1), got {update_every}")
    return {k: d + (1.0 - d) / update_every for k, d in forward_density.items()}
  return dict(forward_density)


def densities_from_record(record: Mapping[str, Any]) -> dict[str, float]:
  """``{path: 1 - s_l}`` from a logged record's ``sparsity/<path>`` keys (``sparsity/total``
  is left out)."""
  return {
    k.removeprefix("sparsity/"): 1.0 - float(v)
    for k, v in record.items()
    if k.startswith("sparsity/") and k != "sparsity/total"
  }


def inference_ratio_from_density(
  dense_macs: Mapping[str, int], forward_density: Mapping[str, float]
) -> float:
  """``sum_l d_l M_l / sum_l M_l``; layers missing from ``forward_density`` count as dense."""
  dense_total = float(sum(dense_macs.values()))
  if not dense_total:
    return float("nan")
  sparse = sum(m * _density_of(forward_density, p, "density") for p, m in dense_macs.items())
  return sparse / dense_total


class RunningTrainingCost:
  """The training-cost ratio of a run so far, updated at each log step (cheap: per-layer
  densities the logging already measured, no work per train step).

  Each :meth:`update` at global step ``s`` charges the steps since the previous update (or since
  step 0) at the densities measured at ``s``; :attr:`ratio` is then
  ``sum_r n_r C(r) / (sum_r n_r * 3 * sum_l M_l)`` (:func:`training_cost_ratio`). A resumed run
  replays the logged records through :meth:`update` (:meth:`replay`), so its values equal the
  uninterrupted run's.
  """

  def __init__(
    self,
    dense_macs: Mapping[str, int],
    method: str,
    backward_sparsity: float | None = None,
    update_every: int | None = None,
  ):
    self.dense_macs = dict(dense_macs)
    self.method = method
    self.backward_sparsity = backward_sparsity
    self.update_every = update_every
    self.cost = 0.0  # sum_r n_r * C(r), MACs per example
    self.steps = 0
    self.last_step = 0

  def update(
    self, step: int, forward_density: Mapping[str, float], alpha: float | None = None
  ) -> float:
    """Charges steps ``(last_step, step]``; returns the ratio so far."""
    n = int(step) - self.last_step
    if n < 0:
      raise ValueError(f"step {step} is before the last update's step {self.last_step}")
    if self.method == "dense":
      fwd: Density = 1.0
    else:
      fwd = forward_density
    wg = weight_grad_density(
      self.method,
      forward_density,
      alpha=alpha,
      backward_sparsity=self.backward_sparsity,
      update_every=self.update_every,
    )
    self.cost += n * _step_macs(self.dense_macs, fwd, wg)
    self.steps += n
    self.last_step = int(step)
    return self.ratio

  def update_from_record(self, record: Mapping[str, Any]) -> float:
    """:meth:`update` from a logged record (``step``, ``sparsity/<path>``, ``alpha``)."""
    alpha = record.get("alpha")
    return self.update(int(record["step"]), densities_from_record(record), alpha)

  def replay(self, records: Iterable[Mapping[str, Any]], up_to_step: int | None = None) -> None:
    """:meth:`update_from_record` for each logged training record (one with
    ``sparsity/total``) at a step ``<= up_to_step``, in order."""
    for r in records:
      if "sparsity/total" not in r or (up_to_step is not None and r["step"] > up_to_step):
        continue
      self.update_from_record(r)

  @property
  def ratio(self) -> float:
    dense_step = 3.0 * sum(self.dense_macs.values())
    if not self.steps or not dense_step:
      return float("nan")
    return self.cost / (self.steps * dense_step)

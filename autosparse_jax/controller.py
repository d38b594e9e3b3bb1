"""Automatic sparsity targets: a controller that steers all thresholds to a requested overall
sparsity (or FLOP ratio) while the thresholds keep learning the per-layer distribution.

Control law, once per step ``t``, measured on the params the step's gradient was taken at:

    e_t   = target_t - actual_t                      (sparsity; for a FLOP target:
                                                      e_t = flop_density_t - target_density_t)
    s_l  += gain * e_t        for every layer (and channel) l

``target_t`` follows a ramp from 0 to the target (``target_t = target * ramp(t)``; for FLOPs
the density goes from 1 to ``target_flops_ratio``) and then holds. The shared shift is an
integral controller: it accumulates until the measured sparsity meets the ramp, so it absorbs
whatever else moves the thresholds (the loss gradient, weight decay), and a steady error is
driven to zero once the ramp flattens. Adding the same shift to every ``s_l`` scales every
``tau_l = sigmoid(s_l)`` by about the same factor, so the *relative* thresholds, which the loss
gradient learns layer by layer, decide where the sparsity goes: it is not forced uniform.

Limits: the ramp must be slow enough for the weights to adapt (a ramp over a few hundred
steps at least); while it rises, sparsity lags the ramp by about ``slope / (gain * dS/ds)``;
a per-layer distribution that the loss makes very uneven can make single layers very sparse
(see the sparsity ceiling in the training system).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from autosparse_jax.schedules import Schedule
from autosparse_jax.selection import path_string

RAMP_SHAPES = ("cubic", "linear")


class ControllerState(NamedTuple):
  step: jax.Array  # steps taken (not `count`: tree_get(state, "count") finds the base's)
  target: jax.Array  # the ramp's target at the last step (sparsity, or FLOP ratio)
  actual: jax.Array  # the measured value at the last step (same unit as target)
  shift: jax.Array  # total shift added to every threshold so far
  integral: jax.Array  # sum of the errors so far


def ramp(begin_step: int, end_step: int, shape: str = "cubic") -> Schedule:
  """Progress from 0 (before ``begin_step``) to 1 (from ``end_step``).

  ``cubic``: ``1 - (1 - p)^3`` with ``p = (t - begin) / (end - begin)``, Zhu & Gupta's shape,
  fast early while the network has many redundant weights; ``linear``: ``p``.
  """
  if shape not in RAMP_SHAPES:
    raise ValueError(f"shape: expected one of {RAMP_SHAPES}, got {shape!r}")
  if begin_step < 0 or end_step <= begin_step:
    raise ValueError(
      f"begin_step, end_step: need 0 <= begin_step < end_step, got {begin_step}, {end_step}"
    )

  def schedule(step):
    p = jnp.clip((jnp.asarray(step, jnp.float32) - begin_step) / (end_step - begin_step), 0, 1)
    return 1.0 - (1.0 - p) ** 3 if shape == "cubic" else p

  return schedule


def sparsity_controller(
  *,
  target_sparsity: float | None = None,
  target_flops_ratio: float | None = None,
  dense_macs: Mapping[str, int] | None = None,
  target_ramp: Callable[[jax.Array], jax.Array],
  gain: float = 5.0,
  integral_gain: float = 0.1,
) -> optax.GradientTransformation:
  """Adds ``gain * e_t`` to the update of every threshold (see the module docstring).

  ``update(threshold_updates, state, params)`` takes the threshold updates (``None`` at
  leaves without a threshold) and the effective params the step was taken at.

  Args:
    target_sparsity: overall fraction of zeros over the thresholded kernels, in [0, 1).
    target_flops_ratio: alternatively, the requested ratio of sparse to dense MACs in (0, 1],
      e.g. 1/7; needs ``dense_macs``.
    dense_macs: dense multiply-accumulates per layer, keyed by '/'-joined param path (as
      :func:`autosparse_jax.flops.count_macs` gives them). Layers in it that are not pruned
      count at full density.
    target_ramp: progress ``step -> [0, 1]``, e.g. :func:`ramp`.
    gain: shift of ``s`` per step per unit of error.
  """
  if (target_sparsity is None) == (target_flops_ratio is None):
    raise ValueError(
      "target_sparsity, target_flops_ratio: give exactly one of them, got "
      f"{target_sparsity!r} and {target_flops_ratio!r}"
    )
  if target_sparsity is not None and not 0.0 <= target_sparsity < 1.0:
    raise ValueError(f"target_sparsity: must be in [0, 1), got {target_sparsity}")
  if target_flops_ratio is not None:
    if not 0.0 < target_flops_ratio <= 1.0:
      raise ValueError(f"target_flops_ratio: must be in (0, 1], got {target_flops_ratio}")
    if not dense_macs:
      raise ValueError("dense_macs: a FLOP target needs the dense MACs of each layer by path")
  if not callable(target_ramp):
    raise ValueError(f"target_ramp: expected a callable step -> [0, 1], got {target_ramp!r}")
  if gain <= 0:
    raise ValueError(f"gain: must be > 0, got {gain}")

  def init(params):
    del params
    # One buffer per field: a state whose leaves share a buffer cannot be donated to jit.
    zeros = (jnp.zeros((), jnp.float32) for _ in range(4))
    return ControllerState(jnp.zeros((), jnp.int32), *zeros)

  def measure(threshold_updates, params):
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    treedef = jax.tree.structure(params)
    has_threshold = [u is not None for u in treedef.flatten_up_to(threshold_updates)]
    zeros = {}
    for (path, p), pruned in zip(flat, has_threshold, strict=True):
      if pruned:
        zeros[path_string(path)] = (jnp.sum(p == 0, dtype=jnp.float32), p.size)
    if target_sparsity is not None:
      total = sum(size for _, size in zeros.values())
      return sum(z for z, _ in zeros.values()) / total
    missing = sorted(set(zeros) - set(dense_macs))
    if missing:
      raise ValueError(f"dense_macs: no MAC count for the pruned layers {missing}")
    total = float(sum(dense_macs.values()))
    sparse = sum(
      macs * (1.0 - zeros[name][0] / zeros[name][1]) if name in zeros else float(macs)
      for name, macs in dense_macs.items()
    )
    return sparse / total

  def update(threshold_updates, state, params=None):
    if params is None:
      raise ValueError("params: the controller measures sparsity on the current params")
    progress = jnp.asarray(target_ramp(state.step), jnp.float32)
    actual = measure(threshold_updates, params)
    if target_sparsity is not None:
      target = target_sparsity * progress
      error = target - actual
    else:
      target = 1.0 - (1.0 - target_flops_ratio) * progress
      error = actual - target
    # Integrate only once the ramp holds: during the rise the error is mostly tracking lag,
    # and integrating it overshoots, which pruning makes costly (pruned weights decay and
    # do not come back when the threshold falls again).
    integral = state.integral + jnp.where(progress >= 1.0, error, 0.0)
    delta = gain * (error + integral_gain * integral)
    shifted = jax.tree.map(lambda u: u + delta.astype(u.dtype), threshold_updates)
    new_state = ControllerState(
      optax.safe_increment(state.step), target, actual, state.shift + delta, integral
    )
    return shifted, new_state

  return optax.GradientTransformation(init, update)

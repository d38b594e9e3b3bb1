"""Sparse-training methods: what the chain's mask and annealing stages are.

The method interface (:class:`Method`) is one call: ``method.components(prunable)`` returns
:class:`Components`, the stages :func:`autosparse_jax.optax_chain` runs. Any object with that
method is accepted, so a new method lives in the user's own file; the built-ins (here,
:mod:`autosparse_jax.dst`, :mod:`autosparse_jax.powerprop`) use the same interface. A mask
stage is a :class:`autosparse_jax.MaskStage`:

* ``init(latent) -> state``; ``latent`` is :class:`autosparse_jax.LatentParams` (dense
  weights ``W``, thresholds ``s``). An empty ``latent.weights`` is ``optax.tree_map_params``'
  placeholder: return a state of scalars then.
* ``update(grads, state, latent) -> (MaskedGradients, state)``: ``grads = dL/dW_eff`` (dense,
  the params' structure) becomes the weight gradient before annealing, the forward mask ``M``
  per pruned leaf (``None`` elsewhere) and the threshold gradients (``None`` without them).
* ``sparsify(latent, state, step) -> (W_eff, state)``: the effective weights of the model at
  ``step`` (``None`` at leaves the method does not prune).

Then ``annealing`` (usually :func:`autosparse_jax.gradient_annealing`) maps the masked
gradients to latent gradients, and the base optimizer steps. Optional hooks:
``latent_init(params) -> weights`` (a reparameterisation, e.g. Powerprop),
``entering(old_state, new_state, weights) -> weights`` (the new latent weights of entries that
join the forward set, before ``sparsify``; e.g. RigL+GA caps them, see
:func:`autosparse_jax.dynamic.cap_grown`) and ``regrown(old_state, new_state) -> tree`` (per
pruned leaf, the entries whose latent weight and base-optimizer moments restart at zero after
the update, e.g. RigL's grown connections). A method whose masks change only on some steps
also gives ``rewired(old_state, new_state) -> bool``; the chain then runs ``entering`` and
``regrown`` under ``jax.lax.cond`` on it, so the other steps pay none of their passes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax.numpy as jnp
import optax

from autosparse_jax import controller, schedules, stages
from autosparse_jax.budgets import Budget, as_budget
from autosparse_jax.selection import Prunable


class Components(NamedTuple):
  """The pieces a method contributes to the chain."""

  stage: stages.MaskStage
  annealing: optax.GradientTransformation
  threshold_init: float | None  # None: the method has no learnable thresholds
  granularity: str
  threshold_optimizer: optax.GradientTransformation | None  # None: the base optimizer
  threshold_weight_decay: float | None = None  # added to dL/ds before the threshold optimizer
  controller: optax.GradientTransformation | None = None  # steers the thresholds to a target
  max_layer_sparsity: float | None = None  # a layer this sparse: its thresholds stop rising
  latent_init: Callable[[Any], Any] | None = None  # params -> latent weights; None: a copy
  regrown: Callable[[Any, Any], Any] | None = None  # (old, new mask state) -> entries to reset
  entering: Callable[[Any, Any, Any], Any] | None = None  # (old, new mask state, W) -> W
  # (old, new mask state) -> bool scalar: the masks may have changed; entering and regrown run
  # only then. None: on every step.
  rewired: Callable[[Any, Any], Any] | None = None


def _layer_budget(budget: Budget | str) -> Budget | None:
  """None for the plain uniform budget: every layer rounds its own count, as before budgets."""
  budget = as_budget(budget)
  return None if budget == Budget() else budget


@runtime_checkable
class Method(Protocol):
  """What :func:`autosparse_jax.optax_chain` asks of a method (see the module docstring)."""

  def components(self, prunable: Prunable) -> Components:
    """The chain's stages for the leaves ``prunable`` selects."""


@dataclasses.dataclass(frozen=True)
class AutoSparse:
  """Learnable soft thresholds (STR) with Gradient Annealing (Kundu et al., 2023).

  ``W_eff = sign(W) * max(|W| - sigmoid(s), 0)``; pruned weights receive ``alpha_t`` of their
  gradient. See :func:`autosparse_jax.stages.threshold_mask` and
  :func:`autosparse_jax.stages.gradient_annealing` for the equations.

  Attributes:
    alpha: ``alpha_t``: a float in [0, 1] (constant) or a schedule ``step -> alpha``, e.g.
      :func:`autosparse_jax.sigmoid_cosine_decay`.
    threshold_init: initial ``s``. It sets when pruning starts: ``tau = sigmoid(s)`` must grow
      to the weights' magnitude (STR: -3200 for ResNet50, so that weight decay takes ~20
      epochs to pull it up; the AutoSparse re-implementation: -5).
    granularity: ``"layer"`` (one threshold per kernel) or ``"channel"`` (one per output
      channel, the last kernel axis).
    ga_on_threshold: also feed the masked weights' gradient, scaled by ``alpha_t``, into the
      threshold gradient.
    threshold_weight_decay: extra decoupled weight decay on ``s`` (added to its gradient before
      the threshold optimizer), for a base optimizer without decay or decay kept in the loss.
    threshold_optimizer: optimizer for the thresholds; default: the base optimizer (its own
      state), so that its weight decay pulls ``s`` up as in STR.
    target_sparsity: ask for this overall sparsity (over the pruned kernels): a controller in
      the optimizer state shifts all thresholds together so that sparsity follows
      ``target_sparsity * target_ramp(t)`` (see :mod:`autosparse_jax.controller`).
    target_flops_ratio: alternatively, ask for this ratio of sparse to dense MACs (e.g. 1/7);
      needs ``dense_macs`` (per-layer dense MACs by param path, from
      :func:`autosparse_jax.flops.count_macs` or by hand).
    target_ramp: progress ``step -> [0, 1]`` of the target, e.g.
      ``autosparse.ramp(0, T // 2)`` (cubic); required with a target.
    controller_gain: shift of ``s`` per step per unit of sparsity error.
    max_layer_sparsity: a layer whose sparsity reaches this is held there: its thresholds may
      fall but no longer rise (``SparseTrainingState.layers_at_ceiling`` counts such layers).
      None disables the guard.
  """

  alpha: schedules.ScalarOrSchedule
  threshold_init: float = -5.0
  granularity: str = "layer"
  ga_on_threshold: bool = False
  threshold_weight_decay: float | None = None
  threshold_optimizer: optax.GradientTransformation | None = None
  target_sparsity: float | None = None
  target_flops_ratio: float | None = None
  dense_macs: Mapping[str, int] | None = None
  target_ramp: schedules.Schedule | None = None
  controller_gain: float = 5.0
  max_layer_sparsity: float | None = 0.999

  def __post_init__(self):
    schedules.as_schedule(self.alpha)  # validates a constant
    self._controller()  # validates the target
    if self.max_layer_sparsity is not None and not 0.0 < self.max_layer_sparsity <= 1.0:
      raise ValueError(
        f"max_layer_sparsity: must be in (0, 1] or None, got {self.max_layer_sparsity}"
      )
    if self.granularity not in stages.GRANULARITIES:
      raise ValueError(
        f"granularity: expected one of {stages.GRANULARITIES}, got {self.granularity!r}"
      )
    if not math.isfinite(self.threshold_init):
      raise ValueError(f"threshold_init: must be a finite number, got {self.threshold_init}")
    if self.threshold_weight_decay is not None and self.threshold_weight_decay < 0:
      raise ValueError(
        f"threshold_weight_decay: must be >= 0 or None, got {self.threshold_weight_decay}"
      )

  def _controller(self) -> optax.GradientTransformation | None:
    if self.target_sparsity is None and self.target_flops_ratio is None:
      return None
    if self.target_ramp is None:
      raise ValueError(
        "target_ramp: a sparsity or FLOP target needs a ramp, e.g. autosparse.ramp(0, T // 2)"
      )
    return controller.sparsity_controller(
      target_sparsity=self.target_sparsity,
      target_flops_ratio=self.target_flops_ratio,
      dense_macs=self.dense_macs,
      target_ramp=self.target_ramp,
      gain=self.controller_gain,
    )

  def components(self, prunable: Prunable) -> Components:
    del prunable  # the chain gives thresholds exactly to the selected leaves
    return Components(
      stages.threshold_mask(),
      stages.gradient_annealing(self.alpha, ga_on_threshold=self.ga_on_threshold),
      self.threshold_init,
      self.granularity,
      self.threshold_optimizer,
      self.threshold_weight_decay,
      self._controller(),
      self.max_layer_sparsity,
    )


def STR(  # noqa: N802 -- the method's name
  threshold_init: float = -5.0,
  granularity: str = "layer",
  threshold_weight_decay: float | None = None,
  threshold_optimizer: optax.GradientTransformation | None = None,
  **options,
) -> AutoSparse:
  """Soft Threshold Reparameterization (Kusupati et al., 2020): AutoSparse with alpha = 0.

  ``options`` are AutoSparse's target and guard arguments (``target_sparsity``,
  ``target_flops_ratio``, ``dense_macs``, ``target_ramp``, ``controller_gain``,
  ``max_layer_sparsity``).
  """
  return AutoSparse(
    alpha=0.0,
    threshold_init=threshold_init,
    granularity=granularity,
    threshold_weight_decay=threshold_weight_decay,
    threshold_optimizer=threshold_optimizer,
    **options,
  )


@dataclasses.dataclass(frozen=True)
class TopKAST:
  """Top-K Always Sparse Training (Jayakumar et al., 2020), optionally with GA.

  TopKAST + GA is GA on every weight outside the forward set ``A``: with ``alpha`` and no
  ``backward_sparsity`` the backward set is every weight (dense backward while
  ``alpha_t > 0``), and each weight outside ``A`` gets ``alpha_t`` of its gradient. Measured
  on LeNet-300-100 at 95% this beats GA on ``B \\ A`` only (pass ``backward_sparsity``
  for that variant); ``backward_sparsity=0, alpha=1.0`` is the straight-through control (the
  same dense backward without annealing).

  Attributes:
    forward_sparsity: overall fraction of the pruned weights that are zero in ``W_eff``.
    backward_sparsity: fraction that gets no gradient (<= forward_sparsity); default: equal
      to ``forward_sparsity``, or 0 (every weight) with ``alpha``.
    alpha: None for plain TopKAST (full gradient on ``B \\ A``); a float or schedule for
      TopKAST + GA (``alpha_t`` times the gradient on ``B \\ A``).
    penalty: TopKAST's L2 coefficient (L2 on ``A``, scaled by 1/density on ``B \\ A``).
    budget: how the sparsities are spread over layers: ``"uniform"``, ``"erk"`` or a
      :class:`autosparse_jax.budgets.Budget`.
  """

  forward_sparsity: float
  backward_sparsity: float | None = None
  alpha: schedules.ScalarOrSchedule | None = None
  penalty: float = 0.0
  budget: Budget | str = "uniform"

  def __post_init__(self):
    self._stage(None)  # validates the sparsities and the penalty
    if self.alpha is not None:
      schedules.as_schedule(self.alpha)

  def _stage(self, prunable: Prunable) -> stages.MaskStage:
    backward = self.backward_sparsity
    if backward is None and self.alpha is not None:
      backward = 0.0  # GA outside A: every weight is in the backward set
    return stages.topk_mask(
      self.forward_sparsity,
      backward,
      penalty=self.penalty,
      prunable=prunable,
      budget=_layer_budget(self.budget),
    )

  def components(self, prunable: Prunable) -> Components:
    alpha = 1.0 if self.alpha is None else self.alpha
    return Components(self._stage(prunable), stages.gradient_annealing(alpha), None, "layer", None)


@dataclasses.dataclass(frozen=True)
class GradualMagnitude:
  """Gradual magnitude pruning (Zhu & Gupta, 2017) with the cubic schedule

  ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0))^3`` for ``t0 <= t <= t1``, masks
  recomputed every ``frequency`` steps; ``s_t = 0`` before ``t0`` and ``s_f`` after ``t1``.
  ``budget`` spreads ``s_f`` over layers (``"uniform"``, ``"erk"``); each layer's sparsity
  follows ``s_l s_t / s_f``.
  """

  target_sparsity: float
  begin_step: int
  end_step: int
  frequency: int = 100
  initial_sparsity: float = 0.0
  budget: Budget | str = "uniform"

  def __post_init__(self):
    for name in ("target_sparsity", "initial_sparsity"):
      stages._check_sparsity(getattr(self, name), name)
    if self.initial_sparsity > self.target_sparsity:
      raise ValueError(
        f"initial_sparsity: must be <= target_sparsity ({self.target_sparsity}), "
        f"got {self.initial_sparsity}"
      )
    self.components(None)  # validates the steps

  def sparsity(self, step) -> jnp.ndarray:
    """The cubic schedule ``s_t``."""
    t0, t1 = self.begin_step, self.end_step
    progress = jnp.clip((jnp.asarray(step, jnp.float32) - t0) / max(t1 - t0, 1), 0.0, 1.0)
    s = self.target_sparsity + (self.initial_sparsity - self.target_sparsity) * (1 - progress) ** 3
    return jnp.where(step < t0, 0.0, s)

  def components(self, prunable: Prunable) -> Components:
    stage = stages.magnitude_mask(
      self.sparsity,
      begin_step=self.begin_step,
      end_step=self.end_step,
      frequency=self.frequency,
      prunable=prunable,
      budget=_layer_budget(self.budget),
      final_sparsity=self.target_sparsity,
    )
    return Components(stage, stages.gradient_annealing(0.0), None, "layer", None)


@dataclasses.dataclass(frozen=True)
class Dense:
  """No pruning: ``optax_chain(base, Dense())`` is ``base`` itself, for dense baselines."""

"""Dynamic sparse training methods: RigL, SET and MEST, each optionally with GA.

All three hold each layer at an exact budget (:mod:`autosparse_jax.budgets`) with a hard mask
and rewire it every ``update_every`` steps through :func:`autosparse_jax.dynamic.prune_and_grow`.

* RigL (Evci et al., 2020): drop the ``floor(f(t) n_active)`` smallest ``|W|`` of each layer,
  grow as many inactive weights with the largest dense gradient ``|dL/dW_eff|``, with
  ``f(t) = drop0 (1 + cos(pi t / T_end)) / 2`` (or ``drop0``, constant) and no update after
  ``T_end``.
* SET (Mocanu et al., 2018): the same drop; grow at random.
* MEST (Yuan et al., 2021, ``prune_utils/retrain.py`` ``update_mask``): prune each layer by
  ``|W| + lambda |g M|`` (the sparse gradient) to the lower bound, then grow random zero
  positions up to the budget. The elastic mutation ratio ``m_t = m_0 max(0, 1 - t / T_end)``
  is a fraction of each layer's budget ``k_l`` (its active weights): EM prunes to
  ``k_l - m_t k_l`` weights and grows back to ``k_l``; EM&S (``soft_bound=True``) prunes to
  ``k_l`` and grows to ``k_l + m_t k_l`` (above the budget). MEST's scripts give the bounds as
  sparsities (prune to 0.92 for 90%, 0.96 for 95%): 20% of the budget at either sparsity, the
  default ``m_0 = 0.2``; a fraction of the layer's size instead would prune the whole budget
  at 95% with the 0.05 of its ResNet-32 scripts.
  Updates go on until the first update step at or after ``T_end``, where ``m_t = 0``: the
  mask ends exactly at the budget.

Without GA (``alpha=None``) inactive weights get no gradient, and a weight that is grown or
dropped restarts at zero, in the latent weights and in every moment of the base optimizer.
With GA (``alpha`` a float or schedule) inactive weights keep training at ``alpha_t`` of their
gradient (:func:`autosparse_jax.gradient_annealing`), so a grown weight enters with the latent
value and moments GA gave it, its magnitude capped at the smallest one its layer kept
(:func:`autosparse_jax.dynamic.cap_grown`); nothing is reset.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from autosparse_jax import dynamic, schedules, stages
from autosparse_jax.budgets import Budget, as_budget
from autosparse_jax.methods import Components
from autosparse_jax.selection import Prunable

DROP_SCHEDULES = ("cosine", "constant")


def _components(method, prunable: Prunable, drop_score, grow_score, last_step: int) -> Components:
  """The chain's components of a drop-and-grow method: the :func:`dynamic.prune_and_grow`
  stage, rewired from ``begin_step`` every ``update_every`` steps up to ``last_step``. Without
  GA grown and dropped weights restart at zero; with GA they keep their latent values, a grown
  one capped (:func:`dynamic.cap_grown`). Both only on rewiring steps."""
  stage = dynamic.prune_and_grow(
    sparsity=method.sparsity,
    budget=as_budget(method.budget),
    counts=method._counts,
    drop_score=drop_score,
    grow_score=grow_score,
    begin_step=method.begin_step,
    every=method.update_every,
    last_step=last_step,
    seed=method.seed,
    prunable=prunable,
  )
  ga = method.alpha is not None
  return Components(
    stage,
    stages.gradient_annealing(method.alpha if ga else 0.0),
    None,
    "layer",
    None,
    regrown=None if ga else dynamic.changed,
    entering=dynamic.cap_grown if ga else None,
    rewired=dynamic.rewired(method.begin_step, method.update_every, last_step),
  )


def _check_common(method) -> None:
  stages._check_sparsity(method.sparsity, "sparsity")
  as_budget(method.budget)
  if method.end_step < method.begin_step or method.begin_step < 0:
    raise ValueError(
      f"begin_step, end_step: need 0 <= begin_step <= end_step, got {method.begin_step}, "
      f"{method.end_step}"
    )
  if method.update_every < 1:
    raise ValueError(f"update_every: must be a positive number of steps, got {method.update_every}")
  if method.alpha is not None:
    schedules.as_schedule(method.alpha)


@dataclasses.dataclass(frozen=True)
class RigL:
  """Rigging the Lottery (Evci et al., 2020); see the module docstring.

  Attributes:
    sparsity: overall sparsity of the pruned kernels, spread by ``budget``.
    end_step: ``T_end``, the last step that may rewire (RigL: 75% of training).
    update_every: steps between mask updates (RigL: 100).
    drop_fraction: ``drop0`` (RigL: 0.3).
    drop_schedule: ``"cosine"`` (``f(t)`` above) or ``"constant"`` (``drop0``).
    begin_step: first step that may rewire.
    budget: ``"uniform"``, ``"erk"`` or a :class:`autosparse_jax.budgets.Budget`.
    alpha: None (RigL) or GA's ``alpha_t`` for the inactive weights (RigL+GA).
    seed: seed of the random initial masks.
  """

  sparsity: float
  end_step: int
  update_every: int = 100
  drop_fraction: float = 0.3
  drop_schedule: str = "cosine"
  begin_step: int = 0
  budget: Budget | str = "uniform"
  alpha: schedules.ScalarOrSchedule | None = None
  seed: int = 0

  def __post_init__(self):
    _check_common(self)
    if not 0.0 <= self.drop_fraction <= 1.0:
      raise ValueError(f"drop_fraction: must be in [0, 1], got {self.drop_fraction}")
    if self.drop_schedule not in DROP_SCHEDULES:
      raise ValueError(
        f"drop_schedule: expected one of {DROP_SCHEDULES}, got {self.drop_schedule!r}"
      )

  def drop_fraction_at(self, step) -> jnp.ndarray:
    """``f(t)``: the fraction of each layer's active weights dropped at an update step."""
    if self.drop_schedule == "constant":
      return jnp.asarray(self.drop_fraction, jnp.float32)
    return dynamic.cosine_drop_fraction(self.drop_fraction, self.end_step)(step)

  def _counts(self, step, n_active, k, size):
    del k, size
    n_drop = jnp.floor(self.drop_fraction_at(step) * n_active).astype(jnp.int32)
    return n_active - n_drop, n_active

  _grow_score = staticmethod(dynamic.gradient_score)

  def components(self, prunable: Prunable) -> Components:
    return _components(
      self, prunable, dynamic.magnitude_score, self._grow_score, last_step=self.end_step
    )


@dataclasses.dataclass(frozen=True)
class SET(RigL):
  """Sparse Evolutionary Training (Mocanu et al., 2018): RigL's drop, random grow."""

  _grow_score = staticmethod(dynamic.random_score)


@dataclasses.dataclass(frozen=True)
class MEST:
  """Memory-Economic Sparse Training (Yuan et al., 2021); see the module docstring.

  Attributes:
    sparsity: the budget's overall sparsity.
    end_step: ``T_end``: the mutation ratio reaches 0 there (the window of elastic mutation).
    update_every: steps between mask updates (MEST: every 5 epochs).
    mutation: ``m_0``, the initial mutation ratio, a fraction of each layer's budget (MEST's
      ResNet-32 scripts prune 90% layers to 0.92 and 95% layers to 0.96: 0.2 of the budget).
    soft_bound: EM&S: grow above the budget, prune back to it.
    score_lambda: ``lambda`` of the prune score ``|W| + lambda |g M|`` (MEST's default 0).
    begin_step, budget, alpha, seed: as for :class:`RigL`.
  """

  sparsity: float
  end_step: int
  update_every: int = 100
  mutation: float = 0.2
  soft_bound: bool = False
  score_lambda: float = 0.0
  begin_step: int = 0
  budget: Budget | str = "uniform"
  alpha: schedules.ScalarOrSchedule | None = None
  seed: int = 0

  def __post_init__(self):
    _check_common(self)
    if not 0.0 <= self.mutation < 1.0:
      raise ValueError(f"mutation: must be in [0, 1), got {self.mutation}")
    if self.score_lambda < 0:
      raise ValueError(f"score_lambda: must be >= 0, got {self.score_lambda}")

  def mutation_at(self, step) -> jnp.ndarray:
    """``m_t = m_0 max(0, 1 - t / T_end)``."""
    t = jnp.asarray(step, jnp.float32)
    return self.mutation * jnp.clip(1.0 - t / max(self.end_step, 1), 0.0, 1.0)

  def _counts(self, step, n_active, k, size):
    m = jnp.round(self.mutation_at(step) * k).astype(jnp.int32)
    if self.soft_bound:  # prune to the budget, grow above it
      return jnp.minimum(k, n_active), jnp.minimum(k + m, size)
    return jnp.clip(k - m, 0, n_active), jnp.asarray(k, jnp.int32)

  def _drop_score(self, w, g, m, key):
    del key
    score = jnp.abs(w.astype(jnp.float32))
    if self.score_lambda:
      score = score + self.score_lambda * jnp.abs(jnp.where(m, g, 0).astype(jnp.float32))
    return score

  def components(self, prunable: Prunable) -> Components:
    # The last update is the first update step at or after T_end, where m_t = 0.
    steps_to_end = max(self.end_step - self.begin_step, 0)
    last = self.begin_step + -(-steps_to_end // self.update_every) * self.update_every
    return _components(self, prunable, self._drop_score, dynamic.random_score, last_step=last)

"""Gradient-annealing schedules ``step -> alpha_t``.

Any callable ``step -> scalar`` works where a schedule is accepted (optax schedules included);
a plain float means a constant. Every decay here takes ``zero_at``: from that step on
``alpha_t = 0``, which makes the end of training exactly STR (the pruned weights stop
receiving gradient, so the mask settles).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Schedule = Callable[[jnp.ndarray], jnp.ndarray]
ScalarOrSchedule = float | Schedule


def _check(alpha0: float, decay_steps: int | None, zero_at: int | None) -> None:
  if not 0.0 <= alpha0 <= 1.0:
    raise ValueError(f"alpha0: must be in [0, 1], got {alpha0}")
  if decay_steps is not None and decay_steps <= 0:
    raise ValueError(f"decay_steps: must be a positive number of steps, got {decay_steps}")
  if zero_at is not None and zero_at < 0:
    raise ValueError(f"zero_at: must be a step >= 0, got {zero_at}")


def _decay(alpha0: float, decay_steps: int, zero_at: int | None, shape: Callable) -> Schedule:
  _check(alpha0, decay_steps, zero_at)
  zero_at = decay_steps if zero_at is None else zero_at

  def schedule(step):
    t = jnp.clip(jnp.asarray(step, jnp.float32) / decay_steps, 0.0, 1.0)
    return jnp.where(step >= zero_at, 0.0, alpha0 * shape(t))

  return schedule


def sigmoid_cosine_decay(alpha0: float, decay_steps: int, zero_at: int | None = None) -> Schedule:
  """The AutoSparse paper's non-linear annealing.

  ``alpha_t = alpha0 * max((1 + cos(pi t / T)) / 2, 1 - sigmoid(-6 + 12 t / T))`` for
  ``t < zero_at`` and 0 from ``zero_at`` on (default ``zero_at = T = decay_steps``).
  It stays near ``alpha0`` for the first third of training, then falls faster than cosine.
  """

  def shape(t):
    # 1 - sigmoid(-6 + 12 t), written as sigmoid(6 - 12 t) to avoid cancellation near t = 1.
    return jnp.maximum((1.0 + jnp.cos(jnp.pi * t)) / 2.0, jax.nn.sigmoid(6.0 - 12.0 * t))

  return _decay(alpha0, decay_steps, zero_at, shape)


def cosine_decay(alpha0: float, decay_steps: int, zero_at: int | None = None) -> Schedule:
  """``alpha_t = alpha0 * (1 + cos(pi min(t, T) / T)) / 2``, 0 from ``zero_at`` (default T)."""
  return _decay(alpha0, decay_steps, zero_at, lambda t: (1.0 + jnp.cos(jnp.pi * t)) / 2.0)


def linear_decay(alpha0: float, decay_steps: int, zero_at: int | None = None) -> Schedule:
  """``alpha_t = alpha0 * (1 - min(t, T) / T)``, 0 from ``zero_at`` (default T)."""
  return _decay(alpha0, decay_steps, zero_at, lambda t: 1.0 - t)


def constant(alpha: float, zero_at: int | None = None) -> Schedule:
  """``alpha_t = alpha`` until ``zero_at`` (never, by default), then 0."""
  _check(alpha, None, zero_at)

  def schedule(step):
    value = jnp.asarray(alpha, jnp.float32)
    return value if zero_at is None else jnp.where(step >= zero_at, 0.0, value)

  return schedule


def as_schedule(alpha: ScalarOrSchedule, name: str = "alpha") -> Schedule:
  """A float becomes :func:`constant`; a callable is used as it is."""
  if callable(alpha):
    return alpha
  try:
    value = float(alpha)
  except (TypeError, ValueError):
    raise ValueError(
      f"{name}: expected a float in [0, 1] or a callable step -> alpha, got {alpha!r}"
    ) from None
  if not 0.0 <= value <= 1.0:
    raise ValueError(f"{name}: must be in [0, 1], got {value}")
  return constant(value)

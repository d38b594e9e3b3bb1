"""Alpha schedules against their formulas, evaluated by hand."""

import math

import jax
import numpy as np
import optax
import pytest

import autosparse_jax as autosparse


def sigmoid(x):
  return 1 / (1 + math.exp(-x))


def test_sigmoid_cosine_decay_key_points():
  T, a0 = 1000, 0.5
  sched = autosparse.sigmoid_cosine_decay(a0, T)
  assert float(sched(0)) == pytest.approx(a0 * max(1.0, 1 - sigmoid(-6)), rel=1e-6)
  assert float(sched(T // 2)) == pytest.approx(0.5 * a0, rel=1e-6)  # both terms are 1/2
  assert float(sched(T)) == 0.0  # zero_at defaults to T
  assert float(sched(T + 10)) == 0.0


def test_sigmoid_cosine_decay_matches_published_ratios():
  # docs/recipes.md: alpha_t / alpha0 at t/T = 0.1, 0.3, 0.5, 0.7, 0.9.
  T = 1000
  sched = autosparse.sigmoid_cosine_decay(1.0, T)
  got = [float(sched(int(f * T))) for f in (0.1, 0.3, 0.5, 0.7, 0.9)]
  np.testing.assert_allclose(got, [0.992, 0.917, 0.5, 0.206, 0.024], atol=6e-4)


def test_zero_at_holds_the_final_value_then_zeroes():
  T, a0 = 100, 0.8
  sched = autosparse.sigmoid_cosine_decay(a0, T, zero_at=150)
  tail = a0 * (1 - sigmoid(6.0))  # the cosine term is 0 at t = T
  assert float(sched(T)) == pytest.approx(tail, rel=1e-5)
  assert float(sched(149)) == pytest.approx(tail, rel=1e-5)
  assert float(sched(150)) == 0.0
  early = autosparse.sigmoid_cosine_decay(a0, T, zero_at=90)
  assert float(early(89)) > 0 and float(early(90)) == 0.0


@pytest.mark.parametrize("t", [0, 25, 50, 99])
def test_cosine_linear_constant(t):
  T, a0 = 100, 0.4
  assert float(autosparse.cosine_decay(a0, T)(t)) == pytest.approx(
    a0 * (1 + math.cos(math.pi * t / T)) / 2, rel=1e-6, abs=1e-7
  )
  assert float(autosparse.linear_decay(a0, T)(t)) == pytest.approx(a0 * (1 - t / T), rel=1e-6)
  assert float(autosparse.constant(a0)(t)) == pytest.approx(a0)
  assert float(autosparse.constant(a0, zero_at=50)(t)) == (pytest.approx(a0) if t < 50 else 0.0)


def test_schedules_trace_under_jit():
  sched = autosparse.sigmoid_cosine_decay(0.5, 10)
  np.testing.assert_allclose(jax.jit(sched)(3), sched(3), rtol=1e-6)


def test_any_optax_schedule_is_accepted_as_alpha():
  method = autosparse.AutoSparse(alpha=optax.linear_schedule(1.0, 0.0, 10))
  tx = autosparse.optax_chain(optax.sgd(0.1), method)
  assert tx is not None


@pytest.mark.parametrize(
  "make, arg",
  [
    (lambda: autosparse.sigmoid_cosine_decay(1.5, 10), "alpha0"),
    (lambda: autosparse.cosine_decay(0.5, 0), "decay_steps"),
    (lambda: autosparse.linear_decay(0.5, 10, zero_at=-1), "zero_at"),
    (lambda: autosparse.AutoSparse(alpha=-0.1), "alpha"),
    (lambda: autosparse.AutoSparse(alpha="fast"), "alpha"),
  ],
)
def test_bad_schedule_arguments_name_the_argument(make, arg):
  with pytest.raises(ValueError, match=arg):
    make()

"""Automatic sparsity and FLOP targets: the controller's law by hand, and real runs that end
on target with a learned (non-uniform) per-layer distribution."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from digits_mlp import STEPS, train

import autosparse_jax as autosparse
from autosparse_jax import controller, flops


def test_ramp_shapes():
  cubic = autosparse.ramp(10, 30)
  assert float(cubic(0)) == 0.0 and float(cubic(10)) == 0.0 and float(cubic(30)) == 1.0
  assert float(cubic(20)) == pytest.approx(1 - 0.5**3)
  assert float(autosparse.ramp(10, 30, "linear")(15)) == pytest.approx(0.25)
  assert float(cubic(99)) == 1.0


def test_control_law_by_hand():
  params = {"a": {"kernel": jnp.array([[0.0, 1.0], [0.0, 2.0]])}, "b": {"bias": jnp.ones(2)}}
  thr_updates = {"a": {"kernel": jnp.float32(0.01)}, "b": {"bias": None}}
  ctl = controller.sparsity_controller(
    target_sparsity=0.8, target_ramp=lambda t: 1.0, gain=2.0, integral_gain=0.5
  )
  state = ctl.init(params)
  out, state = ctl.update(thr_updates, state, params)
  # actual = 2 zeros / 4 = 0.5; error = 0.8 - 0.5 = 0.3; integral = 0.3
  # delta = 2 * (0.3 + 0.5 * 0.3) = 0.9
  assert float(out["a"]["kernel"]) == pytest.approx(0.01 + 0.9)
  assert out["b"]["bias"] is None
  assert float(state.actual) == 0.5 and float(state.target) == pytest.approx(0.8)
  out, state = ctl.update(thr_updates, state, params)  # integral = 0.6: delta = 2 * (0.3 + 0.3)
  assert float(out["a"]["kernel"]) == pytest.approx(0.01 + 1.2)


def test_flop_measure_by_hand():
  params = {"a": {"kernel": jnp.array([[0.0, 1.0], [0.0, 2.0]])}, "c": {"kernel": jnp.ones((2, 2))}}
  thr_updates = {"a": {"kernel": jnp.float32(0.0)}, "c": {"kernel": None}}
  macs = {"a/kernel": 100, "c/kernel": 300}  # c is not pruned: counts at full density
  ctl = controller.sparsity_controller(
    target_flops_ratio=0.5, dense_macs=macs, target_ramp=lambda t: 1.0, gain=1.0
  )
  _, state = ctl.update(thr_updates, ctl.init(params), params)
  assert float(state.actual) == pytest.approx((100 * 0.5 + 300) / 400)


def run_target(target):
  method = autosparse.AutoSparse(
    alpha=autosparse.sigmoid_cosine_decay(0.5, STEPS),
    threshold_init=-5.0,
    target_sparsity=target,
    target_ramp=autosparse.ramp(0, STEPS // 2),
  )
  accuracy, params, state = train(method)
  return accuracy, params, state


@pytest.mark.parametrize("target", [0.5, 0.9])
def test_sparsity_target_is_met_with_learned_layer_budgets(target):
  accuracy, params, state = run_target(target)
  stats = autosparse.sparsity(params)
  assert abs(float(stats.total) - target) <= 0.01
  layers = np.array([float(v) for v in stats.layers.values()])
  assert layers.max() - layers.min() > 0.02, layers  # not forced uniform
  assert accuracy > 0.95
  summary = autosparse.summary(params, state)
  assert float(summary["controller/target"]) == pytest.approx(target)
  assert abs(float(summary["controller/actual"]) - target) <= 0.01


def conv_init(key):
  k = jax.random.split(key, 3)
  return {
    "conv0": {"kernel": jax.random.normal(k[0], (3, 3, 1, 16)) * np.sqrt(2 / 9)},
    "conv1": {"kernel": jax.random.normal(k[1], (3, 3, 16, 32)) * np.sqrt(2 / 144)},
    "head": {"kernel": jax.random.normal(k[2], (512, 10)) / np.sqrt(512), "bias": jnp.zeros(10)},
  }


def conv_apply(p, x):
  dn = ("NHWC", "HWIO", "NHWC")
  conv = jax.lax.conv_general_dilated
  x = jax.nn.relu(conv(x, p["conv0"]["kernel"], (1, 1), "SAME", dimension_numbers=dn))
  x = jax.nn.relu(conv(x, p["conv1"]["kernel"], (2, 2), "SAME", dimension_numbers=dn))
  return x.reshape(x.shape[0], -1) @ p["head"]["kernel"] + p["head"]["bias"]


def test_flop_target_on_a_conv_net():
  params = conv_init(jax.random.key(0))
  macs = flops.count_macs(conv_apply, params, jnp.zeros((1, 8, 8, 1)))
  assert macs == {
    "conv0/kernel": 64 * 9 * 16,
    "conv1/kernel": 16 * 9 * 16 * 32,
    "head/kernel": 5120,
  }
  ratio = 1 / 7
  method = autosparse.AutoSparse(
    alpha=autosparse.sigmoid_cosine_decay(0.5, STEPS),
    threshold_init=-5.0,
    target_flops_ratio=ratio,
    dense_macs=macs,
    target_ramp=autosparse.ramp(0, STEPS // 2),
  )
  accuracy, params, _ = train(
    method, apply_fn=conv_apply, params=params, images=lambda x: x.reshape(-1, 8, 8, 1)
  )
  got = flops.inference_macs(macs, params)["ratio"]
  assert abs(got - ratio) / ratio <= 0.02, got
  assert accuracy > 0.9


@pytest.mark.parametrize(
  "kwargs, arg",
  [
    (dict(target_sparsity=0.9), "target_ramp"),
    (dict(target_sparsity=1.0, target_ramp=lambda t: 1.0), "target_sparsity"),
    (dict(target_flops_ratio=0.1, target_ramp=lambda t: 1.0), "dense_macs"),
    (dict(target_flops_ratio=0.0, dense_macs={"a": 1}, target_ramp=lambda t: 1.0), "flops_ratio"),
    (
      dict(target_sparsity=0.5, target_flops_ratio=0.5, target_ramp=lambda t: 1.0),
      "target_sparsity, target_flops_ratio",
    ),
    (dict(target_sparsity=0.5, target_ramp=lambda t: 1.0, controller_gain=0.0), "gain"),
  ],
)
def test_bad_target_arguments_name_the_argument(kwargs, arg):
  with pytest.raises(ValueError, match=arg):
    autosparse.AutoSparse(alpha=0.5, **kwargs)


def test_missing_macs_for_a_pruned_layer_is_named():
  params = conv_init(jax.random.key(0))
  method = autosparse.STR(
    target_flops_ratio=0.5, dense_macs={"conv0/kernel": 1}, target_ramp=lambda t: 1.0
  )
  tx = autosparse.optax_chain(optax.sgd(0.1), method)
  with pytest.raises(ValueError, match="conv1/kernel"):
    tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)

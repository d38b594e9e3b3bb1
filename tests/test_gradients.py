"""The chain's gradients against independent oracles: jax.grad of the plain formula."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import mlp_apply, mlp_loss, mlp_params, record_gradients

import autosparse_jax as autosparse

KERNELS = ("dense0", "dense1")


def latent_loss(weights, thresholds, x, y):
  """The loss written directly in terms of sign(W) * relu(|W| - sigmoid(s))."""
  p = jax.tree.map(lambda w: w, weights)
  for name in KERNELS:
    w = weights["params"][name]["kernel"]
    s = thresholds[name]
    p["params"][name]["kernel"] = jnp.sign(w) * jax.nn.relu(jnp.abs(w) - jax.nn.sigmoid(s))
  return jnp.mean((mlp_apply(p, x) - y) ** 2)


def one_update(method, params, x, y):
  tx = autosparse.optax_chain(record_gradients(), method)
  state = tx.init(params)
  eff = jax.tree.map(lambda p: p, params)
  for name in KERNELS:  # the model runs with the effective weights
    s = state.latent.thresholds["params"][name]["kernel"]
    eff["params"][name]["kernel"] = autosparse.soft_threshold(params["params"][name]["kernel"], s)
  grads = jax.grad(mlp_loss)(eff, x, y)
  updates, new_state = tx.update(grads, state, eff)
  return state, new_state, grads, eff, updates


@pytest.mark.parametrize("granularity", ["layer", "channel"])
def test_str_gradients_equal_jax_grad_of_soft_threshold_loss(granularity, batch, count_path):
  x, y = batch
  params = mlp_params(jax.random.key(0))
  method = autosparse.STR(threshold_init=-1.5, granularity=granularity)  # tau = 0.18: some pruned
  state, new_state, _, _, _ = one_update(method, params, x, y)
  thresholds = {n: state.latent.thresholds["params"][n]["kernel"] for n in KERNELS}
  dw, ds = jax.grad(latent_loss, argnums=(0, 1))(params, thresholds, x, y)
  seen_w, seen_s = new_state.base, new_state.thresholds.inner
  for name in KERNELS:
    np.testing.assert_allclose(
      seen_w["params"][name]["kernel"], dw["params"][name]["kernel"], rtol=1e-6, atol=1e-7
    )
    np.testing.assert_allclose(seen_s["params"][name]["kernel"], ds[name], rtol=1e-5, atol=1e-7)
    n_out = params["params"][name]["kernel"].shape[-1]
    # A threshold has its kernel's ndim: (1, 1) per layer, (1, n_out) per channel.
    assert seen_s["params"][name]["kernel"].shape == (1, 1 if granularity == "layer" else n_out)
    # Biases are not pruned and get their plain gradient.
    np.testing.assert_allclose(
      seen_w["params"][name]["bias"], dw["params"][name]["bias"], rtol=1e-6, atol=1e-7
    )
  pruned = float(np.mean(np.abs(params["params"]["dense0"]["kernel"]) <= jax.nn.sigmoid(-1.5)))
  assert 0.1 < pruned < 0.9, "the test needs both pruned and kept weights"


@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_ga_weight_gradient_is_exactly_g_times_m_plus_alpha(alpha, batch):
  x, y = batch
  params = mlp_params(jax.random.key(1))
  method = autosparse.AutoSparse(alpha=alpha, threshold_init=-1.5)
  state, new_state, grads, _, _ = one_update(method, params, x, y)
  for name in KERNELS:
    w = np.asarray(params["params"][name]["kernel"])
    g = np.asarray(grads["params"][name]["kernel"])
    m = (np.abs(w) > np.asarray(jax.nn.sigmoid(jnp.float32(-1.5)))).astype(np.float32)
    expected = g * (m + np.float32(alpha) * (1 - m))
    np.testing.assert_array_equal(new_state.base["params"][name]["kernel"], expected)
  assert float(new_state.annealing.alpha) == pytest.approx(alpha)


def test_ga_on_threshold_adds_alpha_times_masked_contribution(batch):
  x, y = batch
  params = mlp_params(jax.random.key(2))
  alpha = 0.25
  _, plain, grads, _, _ = one_update(
    autosparse.AutoSparse(alpha, threshold_init=-1.5), params, x, y
  )
  _, with_ga, _, _, _ = one_update(
    autosparse.AutoSparse(alpha, threshold_init=-1.5, ga_on_threshold=True), params, x, y
  )
  tau = float(jax.nn.sigmoid(-1.5))
  for name in KERNELS:
    w = np.asarray(params["params"][name]["kernel"], np.float64)
    g = np.asarray(grads["params"][name]["kernel"], np.float64)
    masked = np.abs(w) <= tau
    extra = -tau * (1 - tau) * np.sum(np.sign(w) * g * masked)
    got = (
      with_ga.thresholds.inner["params"][name]["kernel"]
      - plain.thresholds.inner["params"][name]["kernel"]
    )
    np.testing.assert_allclose(got, alpha * extra, rtol=1e-4, atol=1e-7)


def test_params_after_update_are_soft_thresholded_latent_with_exact_zeros(batch):
  x, y = batch
  params = mlp_params(jax.random.key(3))
  tx = autosparse.optax_chain(optax.adam(0.05), autosparse.AutoSparse(0.5, threshold_init=-1.0))
  state = tx.init(params)
  for _ in range(3):
    grads = jax.grad(mlp_loss)(params, x, y)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  for name in KERNELS:
    w = np.asarray(state.latent.weights["params"][name]["kernel"])
    s = np.asarray(state.latent.thresholds["params"][name]["kernel"])
    tau = 1 / (1 + np.exp(-s))
    expected = np.sign(w) * np.maximum(np.abs(w) - tau, 0)
    got = np.asarray(params["params"][name]["kernel"])
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    assert np.all(got[expected == 0] == 0.0)  # exact zeros, not tiny values
    assert (expected == 0).mean() > 0.2
    # Non-pruned leaves: the latent copy is the params themselves.
    np.testing.assert_array_equal(
      state.latent.weights["params"][name]["bias"], params["params"][name]["bias"]
    )

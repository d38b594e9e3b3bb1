"""The open method interface, Powerprop and TopKAST+GA's backward set."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import mlp_loss, mlp_params, record_gradients
from digits_mlp import train
from user_method import StaticRandomMask

import autosparse_jax as autosparse
from autosparse_jax import powerprop


def test_a_method_from_the_users_own_file_trains():
  assert isinstance(StaticRandomMask(0.3), autosparse.Method)
  accuracy, params, _ = train(StaticRandomMask(0.3), steps=300)
  assert accuracy > 0.85  # a 70%-sparse MLP on digits; chance is 0.1
  for layer in params.values():
    density = np.count_nonzero(layer["kernel"]) / layer["kernel"].size
    assert 0.2 < density < 0.4


def test_an_object_without_components_is_refused_naming_the_interface():
  with pytest.raises(ValueError, match=r"components\(prunable\)"):
    autosparse.optax_chain(optax.sgd(0.1), object())


def test_powerprop_init_and_gradient_match_the_plain_formula(batch):
  x, y = batch
  a = 3.0
  u = mlp_params(jax.random.key(1))
  tx = autosparse.optax_chain(optax.sgd(1.0), autosparse.Powerprop(autosparse.TopKAST(0.5), a))
  state = jax.jit(tx.init)(u)
  v = state.latent.weights
  for p, q in zip(jax.tree.leaves(u), jax.tree.leaves(v), strict=True):
    if p.ndim >= 2:  # w = v |v|^(a-1) = u at the start
      np.testing.assert_allclose(q * np.abs(q) ** (a - 1), p, rtol=1e-5)
      np.testing.assert_allclose(q, np.sign(p) * np.abs(p) ** (1 / a), rtol=1e-6)

  masks = jax.tree.map(
    lambda q: None if q.ndim < 2 else np.abs(q) >= np.median(np.abs(q)), v
  )  # TopKAST's forward set: the larger half of |v| (no ties in random weights)

  def plain(v):
    w = jax.tree.map(
      lambda q, m: q if m is None else jnp.where(m, q * jnp.abs(q) ** (a - 1), 0), v, masks
    )
    return mlp_loss(w, x, y)

  params = jax.tree.map(
    lambda q, m: q if m is None else np.where(m, q * np.abs(q) ** (a - 1), 0), v, masks
  )
  updates, new = jax.jit(tx.update)(jax.grad(mlp_loss)(params, x, y), state, params)
  expected = jax.grad(plain)(v)
  got = jax.tree.map(lambda before, after: before - after, v, new.latent.weights)
  for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(g, e, rtol=2e-5, atol=1e-7)
  # and the model after the step is w(v') on the new forward set
  for p, q in zip(
    jax.tree.leaves(optax.apply_updates(params, updates)),
    jax.tree.leaves(new.latent.weights),
    strict=True,
  ):
    if p.ndim >= 2:
      kept = p != 0
      np.testing.assert_allclose(p[kept], (q * np.abs(q) ** (a - 1))[kept], rtol=1e-5)


def test_powerprop_power_inverts():
  u = jnp.array([-2.0, -0.5, 0.0, 0.3, 4.0])
  np.testing.assert_allclose(powerprop.power(powerprop.inverse_power(u, 2.5), 2.5), u, rtol=1e-6)


@pytest.mark.parametrize(
  "kwargs, in_b_not_a, outside_b, backward_density",
  [
    (dict(alpha=0.3), 0.3, None, 1.0),  # GA outside A: dense backward, alpha outside A
    (dict(alpha=1.0, backward_sparsity=0.0), 1.0, None, 1.0),  # straight-through control
    (dict(alpha=0.3, backward_sparsity=0.25), 0.3, 0.0, 0.75),  # GA on B \ A only
    (dict(), None, 0.0, 0.5),  # plain TopKAST: B = A
  ],
)
def test_topkast_ga_backward_sets(kwargs, in_b_not_a, outside_b, backward_density):
  params = mlp_params(jax.random.key(2), sizes=(6, 16, 4))
  tx = autosparse.optax_chain(record_gradients(), autosparse.TopKAST(0.5, **kwargs))
  state = tx.init(params)
  _, new = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), state, params)
  for k, w in params["params"].items():
    w = np.abs(np.asarray(w["kernel"]))
    g = np.asarray(new.base["params"][k]["kernel"])
    a = w >= np.quantile(w, 0.5, method="higher")  # the top half
    b = w >= np.quantile(w, 1 - backward_density, method="higher")
    assert a.sum() == w.size // 2 and b.sum() == round(backward_density * w.size)
    np.testing.assert_array_equal(g[a], 1.0)
    if in_b_not_a is not None:
      np.testing.assert_allclose(g[b & ~a], in_b_not_a)
    if outside_b is not None:
      np.testing.assert_array_equal(g[~b], outside_b)


def test_powerprop_on_a_layer_the_budget_keeps_dense(batch):
  x, y = batch
  a, lr = 2.0, 0.1
  budget = autosparse.Budget("uniform", dense_first_layer=True)
  method = autosparse.Powerprop(autosparse.RigL(0.3, end_step=10, budget=budget), a)
  tx = autosparse.optax_chain(optax.sgd(lr), method)
  u = mlp_params(jax.random.key(4))
  state = jax.jit(tx.init)(u)
  g = jax.grad(mlp_loss)(u, x, y)
  updates, new = jax.jit(tx.update)(g, state, u)
  first = optax.apply_updates(u, updates)["params"]["dense0"]["kernel"]
  v = np.asarray(state.latent.weights["params"]["dense0"]["kernel"])
  gk = np.asarray(g["params"]["dense0"]["kernel"])
  v_new = v - lr * gk * a * np.abs(v) ** (a - 1)  # plain SGD on v, every entry kept
  np.testing.assert_allclose(first, v_new * np.abs(v_new) ** (a - 1), rtol=1e-5, atol=1e-7)

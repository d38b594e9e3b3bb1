"""Step 0: training starts from the effective weights ``tx.effective_params(params, state)``."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import mlp_loss, mlp_params

import autosparse_jax as autosparse

KERNELS = ("dense0", "dense1")
METHODS = {
  "autosparse": autosparse.AutoSparse(0.5, threshold_init=-1.5),
  "str_channel": autosparse.STR(threshold_init=-1.5, granularity="channel"),
  "topkast": autosparse.TopKAST(0.75),
  "topkast_ga": autosparse.TopKAST(0.75, 0.5, alpha=0.5),
  "gmp": autosparse.GradualMagnitude(0.8, 0, 10, 5, initial_sparsity=0.5),
  "dense": autosparse.Dense(),
}


def kernel(tree, name):
  return np.asarray(tree["params"][name]["kernel"])


@pytest.mark.parametrize("name", list(METHODS))
def test_first_forward_runs_on_sparse_weights(name, batch):
  x, y = batch
  method = METHODS[name]
  dense = mlp_params(jax.random.key(0), sizes=(6, 40, 4))
  tx = autosparse.optax_chain(optax.sgd(0.1), method)
  state = tx.init(dense)
  params = jax.jit(tx.effective_params)(dense, state)
  assert jax.tree.structure(params) == jax.tree.structure(dense)
  for n in KERNELS:
    w, p = kernel(dense, n), kernel(params, n)
    if name in ("autosparse", "str_channel"):  # sign(W) * relu(|W| - sigmoid(s0))
      expected = np.sign(w) * np.maximum(np.abs(w) - 1 / (1 + np.exp(1.5)), 0)
      np.testing.assert_allclose(p, expected, rtol=1e-6, atol=1e-7)
      assert 0.1 < np.mean(p == 0) < 0.9
    elif name == "dense":
      np.testing.assert_array_equal(p, w)
    else:  # the top (1 - sparsity) of |W| kept, the rest exact zeros
      keep = {"topkast": 0.25, "topkast_ga": 0.25, "gmp": 0.5}[name]
      k = round(keep * w.size)
      assert np.count_nonzero(p) == k
      kept = np.abs(w) >= np.sort(np.abs(w).ravel())[-k]
      np.testing.assert_array_equal(p, np.where(kept, w, 0))
    np.testing.assert_array_equal(params["params"][n]["bias"], dense["params"][n]["bias"])
  # The first update, from the gradient at W_eff, keeps the same support (no dense detour).
  updates, state = tx.update(jax.grad(mlp_loss)(params, x, y), state, params)
  after = optax.apply_updates(params, updates)
  if name in ("topkast", "topkast_ga", "gmp"):
    for n in KERNELS:
      assert np.count_nonzero(kernel(after, n)) == np.count_nonzero(kernel(params, n))
  np.testing.assert_array_equal(
    kernel(tx.effective_params(after, state), "dense0"), kernel(after, "dense0")
  )


def test_effective_params_finds_the_state_inside_wrappers():
  params = mlp_params(jax.random.key(1))
  inner = autosparse.optax_chain(optax.sgd(0.1), METHODS["topkast"])
  for tx in (optax.chain(optax.clip_by_global_norm(1.0), inner), optax.MultiSteps(inner, 2)):
    p = inner.effective_params(params, tx.init(params))
    assert np.count_nonzero(kernel(p, "dense0")) == round(0.25 * 6 * 5)
  with pytest.raises(ValueError, match="opt_state"):
    inner.effective_params(params, optax.sgd(0.1).init(params))


def test_matches_str_reference_training_for_50_steps(batch, count_path):
  """STR (RAIVNLab/STR) trains (W, s) by SGD with momentum and weight decay on both, the model
  computing with sign(W) * relu(|W| - sigmoid(s)) from step 0. The reference differentiates
  that composition with jax.grad; the chain starts from tx.effective_params."""
  x, y = batch
  lr, momentum, wd, s0 = 0.1, 0.9, 5e-3, -2.0
  latent = mlp_params(jax.random.key(2), sizes=(6, 32, 4))
  thresholds = {n: jnp.asarray(s0) for n in KERNELS}

  def compose(latent, thresholds):
    p = jax.tree.map(lambda a: a, latent)
    for n in KERNELS:
      w = latent["params"][n]["kernel"]
      p["params"][n]["kernel"] = jnp.sign(w) * jax.nn.relu(
        jnp.abs(w) - jax.nn.sigmoid(thresholds[n])
      )
    return p

  ref_tx = optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr, momentum=momentum))
  ref_state = ref_tx.init((latent, thresholds))

  @jax.jit
  def ref_step(tree, ref_state):
    grads = jax.grad(lambda t: mlp_loss(compose(*t), x, y))(tree)
    updates, ref_state = ref_tx.update(grads, ref_state, tree)
    return optax.apply_updates(tree, updates), ref_state

  tx = autosparse.optax_chain(
    optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr, momentum=momentum)),
    autosparse.STR(threshold_init=s0, max_layer_sparsity=None),
  )
  state = tx.init(latent)
  params = tx.effective_params(latent, state)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(mlp_loss)(params, x, y), state, params)
    return optax.apply_updates(params, updates), state

  tree = (latent, thresholds)
  for _ in range(50):
    ref_params = compose(*tree)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6)
      assert np.array_equal(np.asarray(a) == 0, np.asarray(b) == 0)  # the same masks
    tree, ref_state = ref_step(tree, ref_state)
    params, state = step(params, state)
  assert 0.2 < float(autosparse.sparsity(params).total) < 0.95
  for n in KERNELS:
    s = autosparse.find_state(state).latent.thresholds["params"][n]["kernel"]
    np.testing.assert_allclose(s.reshape(()), tree[1][n], rtol=1e-5)

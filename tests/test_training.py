"""A short real training run: an MLP on scikit-learn's bundled digits (no download).

AutoSparse must end clearly sparse at dense-level accuracy, and a larger alpha0 must give a
lower sparsity than alpha0 = 0 (STR): the trade-off Gradient Annealing exists for.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import autosparse_jax as autosparse

STEPS = 600


@functools.cache
def digits():
  from sklearn.datasets import load_digits

  x, y = load_digits(return_X_y=True)
  perm = np.random.default_rng(0).permutation(len(x))
  x, y = (x[perm] / 16.0).astype(np.float32), y[perm]
  return x[:1400], y[:1400], x[1400:], y[1400:]


def init(key, sizes=(64, 256, 128, 10)):
  keys = jax.random.split(key, len(sizes) - 1)
  return {
    f"dense{i}": {
      "kernel": jax.random.normal(keys[i], (a, b)) * jnp.sqrt(2 / a),
      "bias": jnp.zeros(b),
    }
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))
  }


def apply(params, x):
  for i in range(3):
    x = x @ params[f"dense{i}"]["kernel"] + params[f"dense{i}"]["bias"]
    x = jax.nn.relu(x) if i < 2 else x
  return x


def train(method):
  xtr, ytr, xte, yte = digits()
  base = optax.chain(optax.add_decayed_weights(1e-3), optax.sgd(0.05, momentum=0.9))
  tx = autosparse.optax_chain(base, method)
  params = init(jax.random.key(0))
  state = tx.init(params)

  @jax.jit
  def step(params, state, x, y):
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(apply(p, x), y).mean()  # noqa: E731
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  rng = np.random.default_rng(0)
  for _ in range(STEPS):
    idx = rng.integers(0, len(xtr), 64)
    params, state = step(params, state, xtr[idx], ytr[idx])
  accuracy = float(np.mean(np.asarray(apply(params, xte)).argmax(-1) == yte))
  return accuracy, float(autosparse.sparsity(params).total)


def autosparse_method(alpha0):
  return autosparse.AutoSparse(
    alpha=autosparse.sigmoid_cosine_decay(alpha0, STEPS),
    threshold_init=-4.0,
    threshold_weight_decay=0.02,
  )


@pytest.fixture(scope="module")
def results():
  return {
    "dense": train(autosparse.Dense()),
    "str": train(autosparse_method(0.0)),
    "autosparse": train(autosparse_method(0.9)),
  }


def test_autosparse_is_sparse_at_dense_accuracy(results):
  dense_acc, _ = results["dense"]
  acc, sparsity = results["autosparse"]
  assert dense_acc > 0.95
  assert sparsity > 0.5
  assert acc >= dense_acc - 0.02


def test_larger_alpha0_gives_lower_sparsity(results):
  assert results["autosparse"][1] < results["str"][1] - 0.01

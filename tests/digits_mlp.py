"""A real, seconds-long training run: an MLP on scikit-learn's bundled digits (no download)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

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


def train(method, steps=STEPS, apply_fn=apply, params=None, images=lambda x: x):
  """SGD with momentum and decoupled weight decay; returns (test accuracy, params, state)."""
  xtr, ytr, xte, yte = digits()
  base = optax.chain(optax.add_decayed_weights(1e-3), optax.sgd(0.05, momentum=0.9))
  tx = autosparse.optax_chain(base, method)
  params = init(jax.random.key(0)) if params is None else params
  state = tx.init(params)

  @jax.jit
  def step(params, state, x, y):
    def loss(p):
      return optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, x), y).mean()

    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  rng = np.random.default_rng(0)
  for _ in range(steps):
    idx = rng.integers(0, len(xtr), 64)
    params, state = step(params, state, images(xtr[idx]), ytr[idx])
  accuracy = float(np.mean(np.asarray(apply_fn(params, images(xte))).argmax(-1) == yte))
  return accuracy, params, state

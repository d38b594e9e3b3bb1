"""Common optax patterns around or inside the chain: each works as documented in the README's
"Optax patterns" table, or is refused with a clear error."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import mlp_loss, mlp_params

import autosparse_jax as autosparse

STR = autosparse.STR(threshold_init=-1.5)


def thresholds(state):
  return autosparse.find_state(state).latent.thresholds["params"]


def test_schedule_free_base_is_refused():
  with pytest.raises(ValueError, match="schedule-free"):
    autosparse.optax_chain(optax.contrib.schedule_free_sgd(0.1), STR)
  wrapped = optax.chain(optax.clip(1.0), optax.contrib.schedule_free_adamw(0.1))
  tx = autosparse.optax_chain(wrapped, STR)  # found inside a combination at init
  with pytest.raises(ValueError, match="schedule-free"):
    tx.init(mlp_params(jax.random.key(0)))


def test_lookahead_as_base_is_refused():
  with pytest.raises(ValueError, match="lookahead"):
    autosparse.optax_chain(optax.lookahead(optax.sgd(0.1), 2, 0.5), STR)


def test_lookahead_around_the_chain_is_undone_as_documented(batch):
  # Not detectable from inside the chain; the README says what happens: the chain owns the
  # params, so the next update returns them to W_eff of its latent state.
  x, y = batch
  tx = autosparse.optax_chain(optax.sgd(0.1), STR)
  params = mlp_params(jax.random.key(1))
  state = tx.init(params)
  params = tx.effective_params(params, state)
  moved = jax.tree.map(lambda p: 0.5 * p, params)  # what a sync does to the fast weights
  updates, state = tx.update(jax.grad(mlp_loss)(moved, x, y), state, moved)
  after = optax.apply_updates(moved, updates)
  np.testing.assert_allclose(
    after["params"]["dense0"]["kernel"],
    tx.effective_params(after, state)["params"]["dense0"]["kernel"],
  )
  assert not np.allclose(
    after["params"]["dense0"]["kernel"], 0.5 * params["params"]["dense0"]["kernel"], atol=1e-3
  )


@pytest.mark.parametrize(
  "mask",
  [
    lambda p: jax.tree.map(lambda x: x.ndim > 1, p),
    lambda p: jax.tree_util.tree_map_with_path(
      lambda path, _: autosparse.selection.path_string(path).endswith("kernel"), p
    ),
  ],
  ids=["ndim", "path"],
)
def test_adamw_decay_mask_keeps_thresholds_with_their_kernels(mask):
  # STR's sparsity pressure: weight decay pulls s up. A mask written for the kernels keeps it.
  params = mlp_params(jax.random.key(2))
  zero = jax.tree.map(jnp.zeros_like, params)
  moves = {}
  for name, m in (("masked", mask), ("unmasked", None)):
    tx = autosparse.optax_chain(optax.adamw(0.1, weight_decay=0.5, mask=m), STR)
    state = tx.init(params)
    _, new = tx.update(zero, state, params)
    moves[name] = float(
      (thresholds(new)["dense0"]["kernel"] - thresholds(state)["dense0"]["kernel"]).squeeze()
    )
  # adamw with a zero gradient: s -= lr * wd * s, i.e. +0.075 for s = -1.5.
  assert moves["masked"] == pytest.approx(0.1 * 0.5 * 1.5, rel=1e-5)
  assert moves["masked"] == moves["unmasked"]
  bias_mask = lambda p: jax.tree.map(lambda x: x.ndim == 1, p)  # noqa: E731
  tx = autosparse.optax_chain(optax.adamw(0.1, weight_decay=0.5, mask=bias_mask), STR)
  state = tx.init(params)
  _, new = tx.update(zero, state, params)
  np.testing.assert_array_equal(
    thresholds(new)["dense0"]["kernel"], thresholds(state)["dense0"]["kernel"]
  )


def test_tree_get_and_tree_set_find_the_base_state_once(batch):
  x, y = batch
  params = mlp_params(jax.random.key(3))
  tx = autosparse.optax_chain(optax.adamw(0.01), STR)
  state = tx.init(params)
  for _ in range(2):
    updates, state = tx.update(jax.grad(mlp_loss)(params, x, y), state, params)
    params = optax.apply_updates(params, updates)
  assert int(optax.tree_utils.tree_get(state, "count")) == 2

  base = optax.inject_hyperparams(optax.adam)(learning_rate=0.05)
  tx = autosparse.optax_chain(base, STR)
  state = tx.init(params)
  assert float(optax.tree_utils.tree_get(state, "learning_rate")) == pytest.approx(0.05)
  state = optax.tree_utils.tree_set(state, learning_rate=jnp.asarray(0.0))
  s0 = thresholds(state)["dense0"]["kernel"]
  latent0 = autosparse.find_state(state).latent.weights
  _, state = tx.update(jax.grad(mlp_loss)(params, x, y), state, params)
  # A zero learning rate reaches the thresholds too: nothing moves.
  np.testing.assert_array_equal(thresholds(state)["dense0"]["kernel"], s0)
  for a, b in zip(
    jax.tree.leaves(autosparse.find_state(state).latent.weights),
    jax.tree.leaves(latent0),
    strict=True,
  ):
    np.testing.assert_array_equal(a, b)

"""RigL, SET, MEST, budgets and the reset of regrown weights, against hand-computed oracles."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import mlp_loss, mlp_params

import autosparse_jax as autosparse
from autosparse_jax import dynamic


def _kernels(tree):
  return {k: v["kernel"] for k, v in tree["params"].items()}


def _masks(state):
  return {k: np.asarray(v["kernel"]) for k, v in state.mask.masks["params"].items()}


def _run(method, steps, base=None, params=None, batch_seed=0):
  """Jitted training on the conftest MLP; yields (step, params, old state, new state)."""
  tx = autosparse.optax_chain(base or optax.sgd(0.1), method)
  params = mlp_params(jax.random.key(3), sizes=(6, 12, 8, 4)) if params is None else params
  state = jax.jit(tx.init)(params)
  x = jax.random.normal(jax.random.key(batch_seed), (16, 6))
  y = jax.random.normal(jax.random.key(batch_seed + 1), (16, 4))

  @jax.jit
  def step(params, state):
    updates, new = tx.update(jax.grad(mlp_loss)(params, x, y), state, params)
    return optax.apply_updates(params, updates), new

  for t in range(steps):
    new_params, new_state = step(params, state)
    yield t, new_params, state, new_state
    params, state = new_params, new_state


def test_erk_densities_match_a_hand_computation():
  shapes = [(10, 20), (20, 20), (20, 2)]
  # raw = sum/prod: 0.15, 0.1, 0.55; 320 of 640 kept. eps = 320 / 92 makes the last layer's
  # density 1.91 > 1, so it is dense; then eps = (320 - 40) / (30 + 40) = 4: 0.6 and 0.4.
  budget = autosparse.Budget("erk")
  np.testing.assert_allclose(budget.densities(shapes, 0.5), [0.6, 0.4, 1.0])
  assert budget.keep_counts(shapes, 0.5) == [120, 160, 40]
  assert autosparse.Budget("uniform").keep_counts(shapes, 0.5) == [100, 200, 20]
  # Dense first layer: the other two carry 320 - 200 = 120 of 440 uniformly (density 3/11).
  counts = autosparse.Budget("uniform", dense_first_layer=True).keep_counts(shapes, 0.5)
  assert counts[0] == 200 and sum(counts) == 320
  assert counts[1:] == [109, 11]  # 109.09 and 10.91: the larger remainder rounds up


@pytest.mark.parametrize("sparsity", [0.3, 0.8, 0.9, 0.97])
def test_budget_totals_are_exact(sparsity):
  shapes = [(3, 3, 3, 16), (3, 3, 16, 32), (800, 10), (7, 5)]
  for budget in ("uniform", "erk", autosparse.Budget("erk", dense_first_layer=True)):
    b = budget if isinstance(budget, autosparse.Budget) else autosparse.Budget(budget)
    if b.dense_first_layer and sparsity > 0.96:  # 432 first-layer weights > 392 kept
      with pytest.raises(ValueError, match="dense_first_layer"):
        b.keep_counts(shapes, sparsity)
      continue
    counts = b.keep_counts(shapes, sparsity)
    assert sum(counts) == round((1 - sparsity) * sum(int(np.prod(s)) for s in shapes))
    assert all(0 <= c <= int(np.prod(s)) for c, s in zip(counts, shapes, strict=True))


def test_drop_fraction_schedule():
  m = autosparse.RigL(0.9, end_step=1000, drop_fraction=0.3)
  assert float(m.drop_fraction_at(0)) == pytest.approx(0.3)
  assert float(m.drop_fraction_at(500)) == pytest.approx(0.15)
  assert float(m.drop_fraction_at(1000)) == pytest.approx(0.0, abs=1e-7)
  assert float(m.drop_fraction_at(2000)) == pytest.approx(0.0, abs=1e-7)
  c = autosparse.RigL(0.9, end_step=1000, drop_schedule="constant")
  assert float(c.drop_fraction_at(700)) == pytest.approx(0.3)


def test_rigl_drops_smallest_and_grows_top_gradient_on_a_hand_built_case():
  w = np.array([[0.9, -0.1, 0.5, 0.0], [0.3, -0.7, 0.05, 0.2]], np.float32)
  m = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)  # 5 active
  g = np.array([[0.0, 0.1, 0.2, 0.8], [0.3, 0.0, -0.6, 0.4]], np.float32)
  params = {"layer": {"kernel": jnp.asarray(w)}}
  method = autosparse.RigL(
    0.375, end_step=10, update_every=1, drop_fraction=0.5, drop_schedule="constant"
  )
  tx = autosparse.optax_chain(optax.sgd(0.0), method)
  state = jax.jit(tx.init)(params)
  state = state._replace(mask=state.mask._replace(masks={"layer": {"kernel": jnp.asarray(m)}}))
  updates, new = jax.jit(tx.update)({"layer": {"kernel": jnp.asarray(g)}}, state, params)
  # floor(0.5 * 5) = 2 dropped: the smallest active |w|, -0.1 and 0.3; the 3 kept are
  # 0.9, 0.5, -0.7. Grown: the 2 largest |g| not kept: 0.8 at (0,3) and -0.6 at (1,2).
  expected = np.array([[1, 0, 1, 1], [0, 1, 1, 0]], bool)
  np.testing.assert_array_equal(new.mask.masks["layer"]["kernel"], expected)
  eff = np.asarray(optax.apply_updates(params, updates)["layer"]["kernel"])
  want = np.where(expected, w, 0)
  want[1, 2] = 0.0  # grown weights start at zero (its latent 0.05 is reset)
  np.testing.assert_array_equal(eff, want)


@pytest.mark.parametrize(
  "cls, budget", [(autosparse.RigL, "erk"), (autosparse.SET, "uniform")], ids=["RigL", "SET"]
)
def test_exact_per_layer_counts_after_every_update(cls, budget):
  method = cls(0.75, end_step=30, update_every=2, budget=budget)
  b = autosparse.Budget(budget)
  changed = 0
  for t, params, old, new in _run(method, 10):
    shapes = [w.shape for w in _kernels(params).values()]
    for (k, m), n in zip(_masks(new).items(), b.keep_counts(shapes, 0.75), strict=True):
      assert m.sum() == n, (t, k)
      assert np.count_nonzero(np.asarray(_kernels(params)[k])[~m]) == 0
      grown = m & ~_masks(old)[k]  # (RigL: top |g|; SET: at random) start at exactly zero
      assert not np.asarray(_kernels(params)[k])[grown].any()
    changed += sum(int((m != _masks(old)[k]).sum()) for k, m in _masks(new).items())
    if t % 2:  # not an update step: the masks stand
      assert all((m == _masks(old)[k]).all() for k, m in _masks(new).items())
  assert changed > 0


@pytest.mark.parametrize("soft", [False, True])
def test_mest_bounds_per_update(soft):
  method = autosparse.MEST(0.75, end_step=8, update_every=2, mutation=0.2, soft_bound=soft)
  last = None
  for t, params, old, new in _run(method, 12):
    shapes = {k: w.shape for k, w in _kernels(params).items()}
    ks = dict(
      zip(shapes, autosparse.Budget().keep_counts(list(shapes.values()), 0.75), strict=True)
    )
    for k, m in _masks(new).items():
      n = int(np.prod(shapes[k]))
      before = _masks(old)[k]
      mut = int(round(float(method.mutation_at(t)) * ks[k]))  # a fraction of the budget
      if t % 2 or t > 8:
        np.testing.assert_array_equal(m, before)
        continue
      if soft:  # pruned to the budget, grown above it
        assert m.sum() == min(ks[k] + mut, n), (t, k)
        assert (m & before).sum() >= min(ks[k], before.sum())
      else:  # pruned to k - m_t, grown back to the budget
        assert m.sum() == ks[k], (t, k)
        assert (m & before).sum() >= ks[k] - mut
    last = new
  for k, m in _masks(last).items():  # the window is over: exactly the budget
    assert m.sum() == ks[k]


def test_mest_score_uses_the_sparse_gradient():
  w = np.array([[0.5, 0.4, 0.3, 0.0]], np.float32)
  m = np.array([[1, 1, 1, 0]], bool)
  g = np.array([[0.0, 0.0, 1.0, 9.0]], np.float32)
  method = autosparse.MEST(0.5, end_step=4, update_every=1, mutation=0.25, score_lambda=1.0)
  tx = autosparse.optax_chain(optax.sgd(0.0), method)
  params = {"l": {"kernel": jnp.asarray(w)}}
  state = jax.jit(tx.init)(params)
  state = state._replace(mask=state.mask._replace(masks={"l": {"kernel": jnp.asarray(m)}}))
  _, new = jax.jit(tx.update)({"l": {"kernel": jnp.asarray(g)}}, state, params)
  got = np.asarray(new.mask.masks["l"]["kernel"])
  # k = 2, m_0 = round(0.25 * 4) = 1: keep 1 by |w| + |g M| = 0.5, 0.4, 1.3 -> the third;
  # the inactive entry's large gradient does not count. One random grow back to 2.
  assert got[0, 2] and got.sum() == 2


@pytest.mark.parametrize(
  "base",
  [
    optax.adam(1e-2),
    optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9)),
    optax.adamw(1e-2, weight_decay=1e-2),
  ],
  ids=["adam", "clip+momentum", "adamw"],
)
def test_grown_and_dropped_weights_restart_with_zero_moments(base):
  found = 0
  for _, _p, old, new in _run(autosparse.RigL(0.6, end_step=20, update_every=3), 7, base):
    fresh = dynamic.changed(old.mask, new.mask)
    moments = [
      leaf for leaf in jax.tree.leaves(new.base) if hasattr(leaf, "shape") and leaf.ndim >= 2
    ]
    assert moments
    for k, f in fresh["params"].items():
      f = np.asarray(f["kernel"])
      assert not np.asarray(new.latent.weights["params"][k]["kernel"])[f].any()
      for mom in moments:
        if mom.shape == f.shape:
          found += int(f.sum())
          assert not np.asarray(mom)[f].any()
  assert found > 0


def test_with_ga_inactive_weights_get_alpha_times_gradient():
  # begin_step=1: step 0 only trains (no rewiring, which would cap the grown weights).
  method = autosparse.RigL(0.6, end_step=20, update_every=100, begin_step=1, alpha=0.25)
  tx = autosparse.optax_chain(optax.sgd(1.0), method)
  params = mlp_params(jax.random.key(3), sizes=(6, 12, 8, 4))
  state = jax.jit(tx.init)(params)
  grads = jax.tree.map(jnp.ones_like, params)
  _, new = jax.jit(tx.update)(grads, state, params)
  for k, m in _masks(state).items():
    before = np.asarray(params["params"][k]["kernel"])
    after = np.asarray(new.latent.weights["params"][k]["kernel"])
    np.testing.assert_allclose(before - after, np.where(m, 1.0, 0.25), rtol=1e-6)


METHODS = [
  autosparse.RigL(0.7, end_step=6, update_every=2),
  autosparse.RigL(0.7, end_step=6, update_every=2, alpha=0.3, budget="erk"),
  autosparse.SET(0.7, end_step=6, update_every=2),
  autosparse.MEST(0.7, end_step=6, update_every=2),
  autosparse.MEST(0.7, end_step=4, update_every=2, soft_bound=True, alpha=0.3),
  autosparse.Powerprop(autosparse.TopKAST(0.7, budget="erk"), 2.0),
  autosparse.TopKAST(0.7, alpha=0.3),
]


@pytest.mark.parametrize("method", METHODS, ids=lambda m: type(m).__name__)
def test_every_method_under_jit_and_multisteps(method):
  tx = optax.MultiSteps(autosparse.optax_chain(optax.adam(1e-2), method), every_k_schedule=2)
  params = mlp_params(jax.random.key(3), sizes=(6, 12, 8, 4))
  state = jax.jit(tx.init)(params)
  x = jax.random.normal(jax.random.key(0), (16, 6))
  y = jax.random.normal(jax.random.key(1), (16, 4))

  @jax.jit
  def step(params, state):
    loss, g = jax.value_and_grad(mlp_loss)(params, x, y)
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for _ in range(12):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  assert np.isfinite(losses).all() and losses[-1] < losses[0]
  kernels = [np.asarray(w) for w in _kernels(params).values()]
  kept = sum(np.count_nonzero(w) for w in kernels)
  assert kept <= round(0.3 * sum(w.size for w in kernels)) + 1


def test_topkast_and_gmp_follow_the_erk_budget():
  budget = autosparse.Budget("erk")
  gmp = autosparse.GradualMagnitude(0.7, begin_step=0, end_step=2, frequency=1, budget="erk")
  *_, (_, params, _, state) = _run(gmp, 4)
  shapes = [w.shape for w in _kernels(params).values()]
  ks = budget.keep_counts(shapes, 0.7)
  assert [int(m.sum()) for m in _masks(state).values()] == ks
  *_, (_, params, _, _) = _run(autosparse.TopKAST(0.7, budget="erk"), 2)
  assert [int(np.count_nonzero(w)) for w in _kernels(params).values()] == ks


def test_a_weight_grown_under_ga_enters_capped_at_the_smallest_kept_magnitude():
  # Hand-built: one layer kept {0.3, -0.5}, dropped 0.2 and grew -4.0 and 0.1.
  old = dynamic.DynamicMaskState(
    {"k": jnp.array([[True, True, True, False, False]])}, jnp.zeros((), jnp.int32)
  )
  new = dynamic.DynamicMaskState(
    {"k": jnp.array([[True, True, False, True, True]])}, jnp.ones((), jnp.int32)
  )
  weights = {"k": jnp.array([[0.3, -0.5, 0.2, -4.0, 0.1]])}
  out = dynamic.cap_grown(old, new, weights)
  np.testing.assert_array_equal(out["k"], np.float32([[0.3, -0.5, 0.2, -0.3, 0.1]]))
  # A layer that keeps none of its old weights: the grown 0.3 and -0.5 enter at zero.
  swap_old = dynamic.DynamicMaskState(
    {"k": jnp.array([[False, False, True, True, True]])}, old.step
  )
  swap_new = dynamic.DynamicMaskState(
    {"k": jnp.array([[True, True, False, False, False]])}, new.step
  )
  out = dynamic.cap_grown(swap_old, swap_new, weights)
  np.testing.assert_array_equal(out["k"], np.float32([[0.0, 0.0, 0.2, -4.0, 0.1]]))


def test_rigl_ga_grown_weights_join_at_the_bottom_of_the_active_set():
  method = autosparse.RigL(0.75, end_step=6, update_every=2, alpha=0.5)
  grew = 0
  for t, _, old, new in _run(method, 6):
    for k, m in _masks(new).items():
      before = _masks(old)[k]
      grown, kept = m & ~before, m & before
      if not grown.any() or not kept.any():
        continue
      w = np.abs(np.asarray(_kernels(new.latent.weights)[k]))
      assert w[grown].max() <= w[kept].min() + 1e-7, (t, k)
      grew += int(grown.sum())
  assert grew > 0

"""Top-k by counting against a numpy oracle; TopKAST and gradual magnitude in the chain."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import mlp_loss, mlp_params, record_gradients

import autosparse_jax as autosparse
from autosparse_jax import counting, topk


def oracle_mask(w: np.ndarray, k: int) -> np.ndarray:
  """Top-k of |w|, ties broken by the lower flat index (a stable sort)."""
  order = np.lexsort((np.arange(w.size), -np.abs(w.astype(np.float64)).ravel()))
  mask = np.zeros(w.size, bool)
  mask[order[:k]] = True
  return mask.reshape(w.shape)


def test_count_is_exact_for_every_shape_and_past_float32_integers():
  """counting.count sums float32 partials along the last axis: exact against numpy for any shape,
  and a last axis longer than 2^24 (where a float32 running sum of ones stops being exact)
  takes the int32 path."""
  rng = np.random.default_rng(0)
  for shape in [(), (1,), (7,), (5, 7), (3, 3, 2, 4), (1, 1, 64, 3), (300, 1)]:
    m = rng.random(shape) < 0.4
    assert int(jax.jit(counting.count)(jnp.asarray(m))) == np.count_nonzero(m)
  long = jnp.ones((1, 2**24 + 3), bool)
  assert int(jax.jit(counting.count)(long)) == 2**24 + 3


def test_counts_at_several_thresholds_match_numpy():
  """One pass for two thresholds (row sums of an exact float32 encoding), separate counts past
  its limit on the last axis (4094) or for three thresholds; ties at a threshold count."""
  rng = np.random.default_rng(1)
  for shape in [(7,), (5, 7), (3, 3, 2, 4), (2, 4094), (3, 4095), (1, 9000)]:
    b = rng.integers(0, 50, size=shape).astype(np.int32)
    for ts in ([10, 30], [30, 10], [25, 25], [0, 50], [5, 20, 45]):
      got = jax.jit(counting.counts_at)(jnp.asarray(b), jnp.asarray(ts, jnp.int32))
      np.testing.assert_array_equal(np.asarray(got), [np.count_nonzero(b >= t) for t in ts])


_TINY = np.finfo(np.float32).tiny  # smallest normal float32


def _special_magnitudes(rng, shape):
  """Magnitudes with zeros, subnormals, tiny and huge normals, the largest float and inf, and
  the floats just below and just above each (the closest an entry gets to a threshold)."""
  a = np.abs(rng.normal(size=shape)).astype(np.float32)
  flat = a.reshape(-1)
  specials = [0.0, 1e-45, 1e-40, _TINY, 2.0**-88, 1e-30, 1e30, np.finfo(np.float32).max, np.inf]
  flat[: len(specials)] = np.asarray(specials, np.float32)
  n = len(specials)
  flat[n : 2 * n] = np.nextafter(flat[:n], np.float32(0))
  with np.errstate(over="ignore"):  # above the largest float lies inf
    flat[2 * n : 3 * n] = np.nextafter(flat[:n], np.float32(np.inf))
  return a


def test_count_above_matches_a_compare_for_every_unit_threshold(count_path):
  """count_above (fused arithmetic) against XLA's own compare counted by numpy, for
  thresholds across [0, 1] (zero, subnormal, the smallest normal, 2^-88, 2^-100, one) and one
  per channel, over magnitudes with zeros, subnormals, huge values and inf."""
  rng = np.random.default_rng(5)
  f = jax.jit(counting.count_above)
  taus = [0.0, 1e-45, 1e-40, _TINY, 2.0**-88, 2.0**-100, 1e-30, 0.3, 0.5, 1.0]
  taus = np.asarray(taus, np.float32)
  for shape in [(29,), (33, 65), (3, 3, 4, 8)]:
    a = jnp.asarray(_special_magnitudes(rng, shape))
    for tau in taus:
      want = np.count_nonzero(np.asarray(a > tau))
      assert int(f(a, tau)) == want, (shape, tau)
    per_channel = jnp.asarray(rng.choice(taus, size=shape[-1]))
    assert int(f(a, per_channel)) == np.count_nonzero(np.asarray(a > per_channel))


def test_magnitude_counts_match_bit_pattern_counts(count_path):
  """The search's counts (fused float arithmetic where the thresholds allow, bit patterns
  otherwise) equal numpy's counts of bit patterns, for one and two thresholds, special
  magnitudes included, on rows short enough for the two-in-one encoding and longer ones."""
  rng = np.random.default_rng(6)
  floor = int(np.float32(2.0**-88).view(np.int32))
  inf = int(np.float32(np.inf).view(np.int32))
  for shape in [(29,), (5, 7), (2, 4094), (2, 4095)]:
    a = _special_magnitudes(rng, shape)
    w = jnp.asarray(np.where(rng.random(shape) < 0.5, -a, a))
    bits = a.view(np.int32)
    median = int(np.median(bits))
    cases = [[median], [0], [1], [floor], [floor + 1], [floor + 2], [inf], [inf + 1]]
    cases += [[median, median - 3000], [floor + 1, median], [0, median], [median, inf + 1]]
    for ts in cases:
      got = jax.jit(topk._magnitude_counts_at)(w, jnp.asarray(ts, jnp.int32))
      np.testing.assert_array_equal(np.asarray(got), [np.count_nonzero(bits >= t) for t in ts])


def test_magnitude_extremes_match_bit_patterns_at_their_bounds(count_path):
  """The search's finishing reductions, min{bits >= lo} and max{bits < hi} (fused arithmetic
  where the bounds allow, bit patterns otherwise), against numpy, with bounds at an entry's
  own pattern and one pattern either side of it, where an off-by-one shows."""
  rng = np.random.default_rng(8)
  a = _special_magnitudes(rng, (6, 50))
  w = jnp.asarray(np.where(rng.random(a.shape) < 0.5, -a, a))
  bits = np.sort(a.view(np.int32).ravel())
  floor = int(np.float32(2.0**-88).view(np.int32))
  inf = int(np.float32(np.inf).view(np.int32))
  extreme = jax.jit(lambda w, lo, hi, m: topk._magnitude_key(w).extreme(lo, hi, m))
  entries = [int(bits[i]) for i in (len(bits) // 3, len(bits) // 2, 2 * len(bits) // 3)]
  entries += [floor, inf]
  for b in entries:
    for lo in (b - 1, b, b + 1):
      if not (bits >= lo).any():  # the search asks only for a side that holds entries
        continue
      hi = int(bits[-1]) + 1 if lo > inf - 1000 else lo + 1000  # some entries in [lo, hi)
      for hi_ in (hi, inf + 1):
        want_min = bits[bits >= lo].min()
        assert int(extreme(w, lo, hi_, True)) == want_min, (lo, hi_)
    for hi in (b - 1, b, b + 1):
      want_max = bits[bits < hi].max()
      assert int(extreme(w, jnp.int32(0), hi, False)) == want_max, hi


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cutoffs_select_exactly_k_with_ties(dtype):
  rng = np.random.default_rng(0)
  arrays, ks = [], []
  for shape in [(5, 7), (3, 3, 2, 4), (1, 9), (6, 1)]:
    w = rng.integers(-3, 4, size=shape).astype(np.float32)  # heavy ties, zeros included
    arrays.append(jnp.asarray(w, dtype))
    ks.append(int(rng.integers(0, w.size + 1)))
  arrays.append(jnp.asarray(rng.normal(size=(8, 8)), dtype))
  ks.append(0)
  arrays.append(jnp.asarray(rng.normal(size=(4, 4)), dtype))
  ks.append(16)
  cuts = jax.jit(topk.cutoffs)(arrays, ks)
  for w, k, cut in zip(arrays, ks, cuts, strict=True):
    got = np.asarray(topk.mask(w, cut))
    assert got.sum() == k
    np.testing.assert_array_equal(got, oracle_mask(np.asarray(w, np.float32), k))


def test_keep_count_rounds():
  assert int(topk.keep_count(1000, 0.9)) == 100
  assert int(topk.keep_count(7, 0.5)) == 4  # round half to even: 3.5 -> 4


def kernels_of(params):
  return {n: np.asarray(params["params"][n]["kernel"]) for n in ("dense0", "dense1")}


def test_topkast_exact_nonzero_counts_with_ties():
  params = mlp_params(jax.random.key(0), sizes=(10, 20, 5))
  # Quantise the weights so that many magnitudes tie at the cut.
  params = jax.tree.map(lambda w: jnp.round(w * 4) / 4 if w.ndim == 2 else w, params)
  x, y = jnp.ones((4, 10)), jnp.zeros((4, 5))
  tx = autosparse.optax_chain(optax.sgd(0.01), autosparse.TopKAST(0.8, 0.5))
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(jax.grad(mlp_loss)(p, x, y), s, p))
  for _ in range(3):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
    for name, w in kernels_of(params).items():
      latent = np.asarray(state.latent.weights["params"][name]["kernel"])
      expected = oracle_mask(latent, round(0.2 * latent.size))
      assert (w != 0).sum() == round(0.2 * w.size), name
      np.testing.assert_array_equal(w != 0, expected & (latent != 0))
      np.testing.assert_array_equal(w[expected], latent[expected])  # hard mask, no shrinkage


@pytest.mark.parametrize("alpha", [None, 0.3])
def test_topkast_gradient_on_backward_set_only_with_ga_on_b_minus_a(alpha):
  params = mlp_params(jax.random.key(1), sizes=(10, 20, 5))
  x, y = jax.random.normal(jax.random.key(2), (4, 10)), jnp.zeros((4, 5))
  tx = autosparse.optax_chain(record_gradients(), autosparse.TopKAST(0.75, 0.5, alpha=alpha))
  state = tx.init(params)
  grads = jax.grad(mlp_loss)(params, x, y)
  _, state = tx.update(grads, state, params)
  a = 1.0 if alpha is None else alpha
  for name, w in kernels_of(params).items():
    g = np.asarray(grads["params"][name]["kernel"])
    fwd = oracle_mask(w, round(0.25 * w.size))
    bwd = oracle_mask(w, round(0.5 * w.size))
    expected = np.where(fwd, g, np.where(bwd, np.float32(a) * g, 0.0))
    np.testing.assert_array_equal(state.base["params"][name]["kernel"], expected)
    np.testing.assert_array_equal(state.base["params"][name]["bias"], grads["params"][name]["bias"])


def test_topkast_penalty_gradient():
  params = mlp_params(jax.random.key(3), sizes=(10, 20, 5))
  zero = jax.tree.map(jnp.zeros_like, params)
  tx = autosparse.optax_chain(record_gradients(), autosparse.TopKAST(0.75, 0.5, penalty=0.1))
  _, state = tx.update(zero, tx.init(params), params)
  for name, w in kernels_of(params).items():
    fwd = oracle_mask(w, round(0.25 * w.size))
    bwd = oracle_mask(w, round(0.5 * w.size))
    expected = np.where(fwd, 0.1 * w, np.where(bwd, 0.1 / 0.25 * w, 0.0))
    np.testing.assert_allclose(state.base["params"][name]["kernel"], expected, rtol=1e-6)


def test_gradual_magnitude_follows_the_cubic_schedule_and_keeps_pruned_weights_zero():
  method = autosparse.GradualMagnitude(0.9, begin_step=2, end_step=8, frequency=2)
  params = mlp_params(jax.random.key(4), sizes=(10, 20, 5))
  x, y = jax.random.normal(jax.random.key(5), (4, 10)), jnp.ones((4, 5))
  tx = autosparse.optax_chain(optax.sgd(0.1, momentum=0.9), method)
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(jax.grad(mlp_loss)(p, x, y), s, p))
  pruned_before = None
  for t in range(1, 11):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
    # Hand-computed cubic schedule, at the last mask update at or before t.
    last = None if t < 2 else min(8, 2 + (t - 2) // 2 * 2)
    target = 0.0 if last is None else 0.9 * (1 - (1 - (last - 2) / 6) ** 3)
    for name, w in kernels_of(params).items():
      assert (w == 0).sum() == w.size - round((1 - target) * w.size), (t, name)
    zeros = {n: w == 0 for n, w in kernels_of(params).items()}
    if pruned_before is not None:  # once pruned, always pruned
      for n in zeros:
        assert np.all(zeros[n][pruned_before[n]])
    pruned_before = zeros


@pytest.mark.parametrize(
  "make, arg",
  [
    (lambda: autosparse.TopKAST(1.0), "forward_sparsity"),
    (lambda: autosparse.TopKAST(-0.1), "forward_sparsity"),
    (lambda: autosparse.TopKAST(0.5, 0.8), "backward_sparsity"),
    (lambda: autosparse.TopKAST(0.5, 0.2, penalty=-1.0), "penalty"),
    (lambda: autosparse.GradualMagnitude(1.2, 0, 10), "target_sparsity"),
    (lambda: autosparse.GradualMagnitude(0.5, 10, 5), "begin_step"),
    (lambda: autosparse.GradualMagnitude(0.5, 0, 10, frequency=0), "frequency"),
    (lambda: autosparse.GradualMagnitude(0.5, 0, 10, initial_sparsity=0.6), "initial_sparsity"),
  ],
)
def test_bad_sparsity_arguments_name_the_argument(make, arg):
  with pytest.raises(ValueError, match=arg):
    make()


_search = jax.jit(topk.search)
_cold_search = jax.jit(lambda ws, ks: topk.search(ws, ks))


def _random_case(rng, kind, shape):
  if kind == "ties":
    return rng.integers(-3, 4, size=shape).astype(np.float32)
  if kind == "scaled":  # far from any start: a jump of many binades
    return (rng.normal(size=shape) * 10.0 ** rng.integers(-30, 30)).astype(np.float32)
  if kind == "zeros":  # half exact zeros, as gradual magnitude's survivors
    return np.where(rng.random(shape) < 0.5, 0, rng.normal(size=shape)).astype(np.float32)
  return rng.normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("kind", ["ties", "normal", "scaled", "zeros"])
def test_search_is_exact_from_any_start_and_for_repeated_arrays(kind, count_path):
  """Any start (a cold one, one from another binade, the extremes) gives the oracle's mask; an
  array listed twice (TopKAST's two budgets) gets both counts exact."""
  rng = np.random.default_rng(len(kind))
  for _ in range(3):
    ws = [jnp.asarray(_random_case(rng, kind, s)) for s in [(13, 7), (3, 3, 2, 5), (40,)]]
    ks = [int(rng.integers(0, w.size + 1)) for w in ws]
    ks += [int(rng.integers(0, k + 1)) for k in ks]
    ws = ws + ws
    starts = [int(rng.integers(0, 2**31 - 1)) for _ in ws]
    starts[0], starts[1] = 0, 2**31 - 2
    for found in (_search(ws, ks, starts), _cold_search(ws, ks)):
      for w, k, cut in zip(ws, ks, found.cuts, strict=True):
        got = np.asarray(topk.mask(w, cut))
        assert got.sum() == k
        np.testing.assert_array_equal(got, oracle_mask(np.asarray(w), k))


def test_warm_search_takes_few_passes(count_path):
  """Started from the previous cut after a small drift, the search needs far fewer passes than
  the 31 of a bisection, for both budgets together."""
  rng = np.random.default_rng(7)
  w = jnp.asarray(rng.normal(size=(300, 100)) * 0.05, jnp.float32)
  ks = [topk.keep_count(w.size, 0.8), topk.keep_count(w.size, 0.5)]
  found = _cold_search([w, w], ks)
  for _ in range(3):
    w = w + jnp.asarray(rng.normal(size=w.shape) * 1e-4, jnp.float32)
    found = _search([w, w], ks, [c.value for c in found.cuts])
    for k, cut in zip(ks, found.cuts, strict=True):
      np.testing.assert_array_equal(topk.mask(w, cut), oracle_mask(np.asarray(w), int(k)))
    assert int(found.passes) <= 12


def test_joint_search_passes_are_those_of_its_slowest_array():
  """Many arrays searched together take the passes of the slowest alone (each pass reads every
  live array once; the final min/max reads each array at most once: one pass in all), so the
  reported passes measure whole reads of the kernel set (the benchmark's byte model)."""
  rng = np.random.default_rng(3)
  ws = [jnp.asarray(rng.normal(size=s) * 0.05, jnp.float32) for s in [(40, 30)] * 12]
  ks = [topk.keep_count(w.size, 0.8) for w in ws]
  starts = [c.value for c in _cold_search(ws, ks).cuts]
  ws = [w + jnp.asarray(rng.normal(size=w.shape) * 1e-3, jnp.float32) for w in ws]
  alone = [int(_search([w], [k], [s]).passes) for w, k, s in zip(ws, ks, starts, strict=True)]
  joint = _search(ws, ks, starts)
  assert int(joint.passes) <= max(alone) + 1
  for w, k, cut in zip(ws, ks, joint.cuts, strict=True):
    np.testing.assert_array_equal(topk.mask(w, cut), oracle_mask(np.asarray(w), int(k)))


def test_topkast_stays_exact_when_the_latent_weights_jump(count_path):
  """A restore or a surgery that rescales the latent weights by 1e6 leaves the state's cuts far
  from the new ones: the warm-started search must still give exact counts."""
  params = mlp_params(jax.random.key(8), sizes=(10, 20, 5))
  x, y = jnp.ones((4, 10)), jnp.zeros((4, 5))
  tx = autosparse.optax_chain(optax.sgd(0.01), autosparse.TopKAST(0.8, 0.5))
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(jax.grad(mlp_loss)(p, x, y), s, p))
  updates, state = step(params, state)
  params = optax.apply_updates(params, updates)
  jumped = jax.tree.map(lambda w: w * 1e6 if w.ndim == 2 else w, state.latent.weights)
  state = state._replace(latent=state.latent._replace(weights=jumped))
  updates, state = step(params, state)
  params = optax.apply_updates(params, updates)
  assert int(state.mask.passes) > 0
  for name, w in kernels_of(params).items():
    latent = np.asarray(state.latent.weights["params"][name]["kernel"])
    expected = oracle_mask(latent, round(0.2 * latent.size))
    np.testing.assert_array_equal(w != 0, expected & (latent != 0))

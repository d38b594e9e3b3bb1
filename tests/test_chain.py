"""The chain as an optax citizen: composition, pytrees, leaf selection, dtypes, bad input."""

import functools
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import mlp_loss, mlp_params

import autosparse_jax as autosparse

METHOD = autosparse.AutoSparse(alpha=0.5, threshold_init=-1.5)


def test_non_prunable_leaves_get_exactly_the_base_update(batch):
  x, y = batch
  params = mlp_params(jax.random.key(0))
  base = optax.adamw(0.01, weight_decay=0.1)
  tx = autosparse.optax_chain(base, METHOD)
  state, ref_state = tx.init(params), base.init(params)
  for _ in range(3):
    grads = jax.grad(mlp_loss)(params, x, y)
    updates, state = tx.update(grads, state, params)
    ref_updates, ref_state = base.update(grads, ref_state, params)
    for name in ("dense0", "dense1"):
      np.testing.assert_array_equal(
        updates["params"][name]["bias"], ref_updates["params"][name]["bias"]
      )
    params = optax.apply_updates(params, updates)


def test_bf16_params_keep_their_dtype(batch):
  x, y = batch
  params = mlp_params(jax.random.key(1), dtype=jnp.bfloat16)
  for method in (METHOD, autosparse.TopKAST(0.5), autosparse.GradualMagnitude(0.5, 1, 2, 1)):
    tx = autosparse.optax_chain(optax.sgd(0.1), method)
    state = tx.init(params)
    grads = jax.grad(lambda p: mlp_loss(p, x.astype(jnp.bfloat16), y))(params)
    updates, state = jax.jit(tx.update)(grads, state, params)
    new = optax.apply_updates(params, updates)
    for leaf in jax.tree.leaves((updates, new, state.latent.weights)):
      assert leaf.dtype == jnp.bfloat16
    if isinstance(method, autosparse.AutoSparse):
      assert state.latent.thresholds["params"]["dense0"]["kernel"].dtype == jnp.float32
      s = state.latent.thresholds["params"]["dense0"]["kernel"]
      expected = autosparse.soft_threshold(state.latent.weights["params"]["dense0"]["kernel"], s)
      np.testing.assert_array_equal(new["params"]["dense0"]["kernel"], expected)


def train(tx, params, x, y, steps=3, jit=True):
  state = tx.init(params)

  def step(p, s):
    updates, s = tx.update(jax.grad(mlp_loss)(p, x, y), s, p)
    return optax.apply_updates(p, updates), s

  step = jax.jit(step) if jit else step
  for _ in range(steps):
    params, state = step(params, state)
  return params, state


def test_jit_and_eager_agree(batch):
  x, y = batch
  tx = autosparse.optax_chain(optax.sgd(0.1, momentum=0.9), METHOD)
  p_jit, _ = train(tx, mlp_params(jax.random.key(2)), x, y)
  p_eager, _ = train(tx, mlp_params(jax.random.key(2)), x, y, jit=False)
  for a, b in zip(jax.tree.leaves(p_jit), jax.tree.leaves(p_eager), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
  "method",
  [
    METHOD,
    autosparse.AutoSparse(alpha=0.5, target_sparsity=0.5, target_ramp=autosparse.ramp(0, 2)),
    autosparse.TopKAST(0.5),
    autosparse.GradualMagnitude(0.5, 1, 2, 1),
    autosparse.Dense(),
  ],
  ids=["autosparse", "autosparse_target", "topkast", "gmp", "dense"],
)
def test_params_and_state_can_be_donated_from_eager_init(batch, method):
  # jit(step, donate_argnums=...) refuses a tree in which two leaves share one buffer.
  x, y = batch
  params = mlp_params(jax.random.key(3))
  tx = autosparse.optax_chain(optax.sgd(0.1), method)
  state = tx.init(params)
  pointers = [leaf.unsafe_buffer_pointer() for leaf in jax.tree.leaves((params, state))]
  assert len(pointers) == len(set(pointers))

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(p, s):
    updates, s = tx.update(jax.grad(mlp_loss)(p, x, y), s, p)
    return optax.apply_updates(p, updates), s

  step(*step(params, state))  # and a state made by the jitted update


def test_inside_optax_chain_and_multisteps(batch):
  x, y = batch
  params = mlp_params(jax.random.key(3))
  inner = autosparse.optax_chain(optax.sgd(0.1), METHOD)
  chained = optax.chain(optax.clip_by_global_norm(1.0), inner)
  p, state = train(chained, params, x, y)
  assert autosparse.summary(p, state)["alpha"] == pytest.approx(0.5)
  assert float(autosparse.sparsity(p).total) > 0.1

  multi = optax.MultiSteps(inner, every_k_schedule=2)
  p, state = train(multi, params, x, y, steps=4)
  assert int(autosparse.find_state(state).annealing.step) == 2  # two real updates
  latent = autosparse.find_state(state).latent
  s = latent.thresholds["params"]["dense0"]["kernel"]
  expected = autosparse.soft_threshold(latent.weights["params"]["dense0"]["kernel"], s)
  np.testing.assert_allclose(p["params"]["dense0"]["kernel"], expected, atol=1e-7)


def test_flax_train_state(batch):
  from flax.training import train_state

  x, y = batch
  params = mlp_params(jax.random.key(4))
  tx = autosparse.optax_chain(optax.sgd(0.1), METHOD)
  ts = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)

  @jax.jit
  def step(ts):
    return ts.apply_gradients(grads=jax.grad(mlp_loss)(ts.params, x, y))

  ts = step(step(ts))
  assert int(ts.step) == 2
  summary = autosparse.summary(ts.params, ts.opt_state)
  assert summary["step"] == 2 and summary["sparsity/total"] > 0.1


def test_nnx_optimizer():
  from flax import nnx

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.hidden = nnx.Linear(6, 16, rngs=rngs)
      self.out = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
      return self.out(jnp.tanh(self.hidden(x)))

  model = MLP(nnx.Rngs(0))
  tx = autosparse.optax_chain(optax.sgd(0.1), autosparse.STR(threshold_init=-2.5))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x, y = jnp.ones((4, 6)), jnp.zeros((4, 4))

  @nnx.jit
  def step(model, optimizer):
    grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)

  step(model, optimizer)
  step(model, optimizer)
  params = nnx.state(model, nnx.Param)
  summary = autosparse.summary(params, optimizer.opt_state)
  assert set(k for k in summary if k.startswith("tau/")) == {"tau/hidden/kernel", "tau/out/kernel"}
  assert summary["sparsity/hidden/kernel"] > 0  # tau = sigmoid(-2.5) = 0.076 prunes some
  tau = float(jax.nn.sigmoid(-2.5))
  assert summary["tau/hidden/kernel"] == pytest.approx(tau, rel=0.05)


class Dense(NamedTuple):
  kernel: jax.Array
  bias: jax.Array | None


def test_pytree_kinds_frozendict_namedtuple_none_leaves():
  from flax.core import FrozenDict

  key = jax.random.key(5)
  tree = FrozenDict(
    {"a": Dense(jax.random.normal(key, (4, 3)), None), "b": [jnp.ones((3, 2)), jnp.ones(2)]}
  )
  tx = autosparse.optax_chain(optax.sgd(0.1), METHOD)
  state = tx.init(tree)
  grads = jax.tree.map(jnp.ones_like, tree)
  updates, state = jax.jit(tx.update)(grads, state, tree)
  new = optax.apply_updates(tree, updates)
  assert isinstance(new, FrozenDict) and isinstance(new["a"], Dense) and new["a"].bias is None
  assert set(autosparse.sparsity(new).layers) == {"a/kernel", "b/0"}
  thresholds = state.latent.thresholds
  assert thresholds["a"].kernel is not None and thresholds["b"][1] is None


def test_leaf_selection_rules():
  params = {
    "conv_init": {"kernel": jnp.ones((3, 3, 1, 4)), "bias": jnp.ones(4)},
    "block": {"conv": {"kernel": jnp.ones((3, 3, 4, 4))}, "norm": {"scale": jnp.ones(4)}},
    "head": {"kernel": jnp.ones((4, 2))},
  }

  def names(prunable):  # the leaves that got a threshold
    tx = autosparse.optax_chain(optax.sgd(0.1), METHOD, prunable=prunable)
    thresholds = tx.init(params).latent.thresholds
    return sorted(autosparse.selection.leaf_paths(thresholds))

  everything = ["block/conv/kernel", "conv_init/kernel", "head/kernel"]
  assert names(None) == everything
  assert names(autosparse.kernels(exclude=r"^conv_init/")) == ["block/conv/kernel", "head/kernel"]
  assert names(autosparse.kernels(include=r"conv")) == ["block/conv/kernel", "conv_init/kernel"]
  assert names([(r"^head/", False), (r".*", True)]) == ["block/conv/kernel", "conv_init/kernel"]
  assert names(lambda path, leaf: leaf.ndim == 4) == ["block/conv/kernel", "conv_init/kernel"]
  assert names([(r"bias|scale", True), (r"head", True)]) == ["head/kernel"]  # 1-D never pruned


@pytest.mark.parametrize(
  "prunable, arg",
  [
    (autosparse.kernels(include=r"^nothing$"), "prunable"),
    ([(r".*", "yes")], "prunable"),
    (42, "prunable"),
  ],
)
def test_bad_selection_names_the_argument(prunable, arg):
  params = mlp_params(jax.random.key(0))
  with pytest.raises(ValueError, match=arg):
    autosparse.optax_chain(optax.sgd(0.1), METHOD, prunable=prunable).init(params)


def test_bad_arguments_name_the_argument():
  with pytest.raises(ValueError, match="granularity"):
    autosparse.AutoSparse(alpha=0.5, granularity="neuron")
  with pytest.raises(ValueError, match="threshold_weight_decay"):
    autosparse.STR(threshold_weight_decay=-1.0)
  with pytest.raises(ValueError, match="max_layer_sparsity"):
    autosparse.STR(max_layer_sparsity=1.5)
  with pytest.raises(ValueError, match="method"):
    autosparse.optax_chain(optax.sgd(0.1), method="autosparse")
  with pytest.raises(ValueError, match="include"):
    autosparse.kernels(include="(unclosed")
  tx = autosparse.optax_chain(optax.sgd(0.1), METHOD)
  params = mlp_params(jax.random.key(0))
  with pytest.raises(ValueError, match="params"):
    tx.update(params, tx.init(params))


def test_dense_method_is_the_base_optimizer(batch):
  x, y = batch
  params = mlp_params(jax.random.key(6))
  p_dense, _ = train(autosparse.optax_chain(optax.sgd(0.1), autosparse.Dense()), params, x, y)
  p_base, _ = train(optax.sgd(0.1), params, x, y)
  for a, b in zip(jax.tree.leaves(p_dense), jax.tree.leaves(p_base), strict=True):
    np.testing.assert_array_equal(a, b)


def test_sparsity_counts_actual_zeros():
  params = {"a": {"kernel": jnp.array([[0.0, 1.0], [0.0, 0.0]])}, "b": {"kernel": jnp.ones((2, 2))}}
  stats = autosparse.sparsity(params)
  assert float(stats.layers["a/kernel"]) == 0.75 and float(stats.layers["b/kernel"]) == 0.0
  assert float(stats.total) == 3 / 8 and int(stats.zeros) == 3 and stats.size == 8
  assert float(jax.jit(lambda p: autosparse.sparsity(p).total)(params)) == 3 / 8


def test_layer_at_the_sparsity_ceiling_is_held():
  params = {
    "tiny": {"kernel": jnp.full((4, 4), 1e-3)},  # below tau: 100% sparse
    "big": {"kernel": jnp.full((4, 4), 1.0)},  # far above tau: 0% sparse
  }
  # Weight decay on s (s < 0) pushes every threshold up each step.
  method = autosparse.STR(threshold_init=-3.0, threshold_weight_decay=1.0)
  tx = autosparse.optax_chain(optax.sgd(0.1), method)
  state = tx.init(params)
  zero = jax.tree.map(jnp.zeros_like, params)
  _, state = tx.update(zero, state, params)
  s = state.latent.thresholds
  assert s["tiny"]["kernel"].item() == -3.0  # held: its update was clipped to <= 0
  assert s["big"]["kernel"].item() == pytest.approx(-3.0 + 0.1 * 3.0)  # sgd on wd * s
  assert int(state.layers_at_ceiling) == 1
  assert autosparse.summary(params, state)["layers_at_ceiling"] == 1

  free = autosparse.optax_chain(
    optax.sgd(0.1), autosparse.STR(-3.0, threshold_weight_decay=1.0, max_layer_sparsity=None)
  )
  _, state = free.update(zero, free.init(params), params)
  assert state.latent.thresholds["tiny"]["kernel"].item() > -3.0


@pytest.mark.parametrize(
  "method", [METHOD, autosparse.TopKAST(0.5), autosparse.GradualMagnitude(0.5, 1, 2, 1)]
)
def test_bad_params_get_one_clear_error(method):
  tx = autosparse.optax_chain(optax.sgd(0.1), method)
  with pytest.raises(ValueError, match="prunable: the selection picks no leaf"):
    tx.init({})
  kernel = jnp.ones((4, 3))
  with pytest.raises(ValueError, match="'k/kernel' holds NaN or Inf"):
    tx.init({"k": {"kernel": kernel.at[1, 2].set(jnp.nan)}})
  with pytest.raises(ValueError, match="'c/kernel' is a complex kernel"):
    tx.init({"k": {"kernel": kernel}, "c": {"kernel": kernel.astype(jnp.complex64)}})
  # A complex kernel left out of the selection trains as in optax.
  tx = autosparse.optax_chain(optax.sgd(0.1), method, prunable=autosparse.kernels(exclude="^c/"))
  tx.init({"k": {"kernel": kernel}, "c": {"kernel": kernel.astype(jnp.complex64)}})


def test_integer_and_empty_leaves_are_never_pruned():
  params = {
    "table": jnp.arange(12, dtype=jnp.int32).reshape(4, 3),
    "empty": {"kernel": jnp.ones((0, 4))},
    "dense": {"kernel": jax.random.normal(jax.random.key(0), (4, 4))},
  }
  tx = autosparse.optax_chain(optax.sgd(0.1), autosparse.TopKAST(0.5))
  state = tx.init(params)
  p = tx.effective_params(params, state)
  np.testing.assert_array_equal(p["table"], params["table"])
  assert int(jnp.sum(p["dense"]["kernel"] == 0)) == 8
  stats = autosparse.sparsity(p)
  assert set(stats.layers) == {"empty/kernel", "dense/kernel"}
  assert float(stats.layers["empty/kernel"]) == 0.0 and float(stats.total) == 0.5
  only_empty = autosparse.sparsity({"empty": {"kernel": jnp.ones((0, 4))}})
  assert float(only_empty.total) == 0.0 and only_empty.size == 0


def test_every_pruned_layer_keeps_at_least_one_weight():
  params = {"k": {"kernel": jax.random.normal(jax.random.key(0), (2, 5))}}
  for method in (autosparse.TopKAST(0.999999), autosparse.GradualMagnitude(0.999999, 0, 1, 1)):
    tx = autosparse.optax_chain(optax.sgd(0.1), method)
    state = tx.init(params)
    p = tx.effective_params(params, state)
    for _ in range(2):
      updates, state = tx.update(jax.tree.map(jnp.ones_like, p), state, p)
      p = optax.apply_updates(p, updates)
    assert int(jnp.count_nonzero(p["k"]["kernel"])) == 1


def test_a_regex_that_matches_no_path_is_an_error():
  # The README's pattern written for variables, applied to variables["params"].
  params = {"conv_init": {"kernel": jnp.ones((3, 3, 1, 4))}, "head": {"kernel": jnp.ones((4, 2))}}
  bad = autosparse.kernels(exclude=(r"^params/conv_init/",))
  msg = r"exclude pattern '\^params/conv_init/' matches no parameter path.*'conv_init/kernel'"
  with pytest.raises(ValueError, match=msg):
    autosparse.optax_chain(optax.sgd(0.1), METHOD, prunable=bad).init(params)
  with pytest.raises(ValueError, match="matches no parameter path"):
    autosparse.sparsity(params, bad)
  with pytest.raises(ValueError, match=r"rule pattern 'hed' matches no parameter path"):
    autosparse.optax_chain(optax.sgd(0.1), METHOD, prunable=[("hed", False), (".*", True)]).init(
      params
    )
  good = autosparse.kernels(exclude=(r"^conv_init/",))
  state = autosparse.optax_chain(optax.sgd(0.1), METHOD, prunable=good).init(params)
  assert autosparse.selection.leaf_paths(state.latent.thresholds) == ["head/kernel"]


@pytest.mark.parametrize("granularity", ["layer", "channel"])
def test_no_single_update_takes_a_layer_past_the_ceiling(granularity):
  """An absurd threshold learning rate (tau jumps from ~0.05 to ~1 in one step, above every
  weight) must not prune a layer past max_layer_sparsity: the ceiling is checked on the mask
  the update produces. The same update without the guard prunes the whole layer."""
  rng = np.random.default_rng(0)
  params = {"fc": {"kernel": jnp.asarray(rng.uniform(0.1, 0.9, (8, 6)), jnp.float32)}}
  zero = jax.tree.map(jnp.zeros_like, params)
  for ceiling in (0.5, None):
    method = autosparse.STR(
      threshold_init=-3.0,
      granularity=granularity,
      threshold_weight_decay=1.0,
      threshold_optimizer=optax.sgd(1e4),
      max_layer_sparsity=ceiling,
    )
    tx = autosparse.optax_chain(optax.sgd(0.1), method)
    updates, state = jax.jit(tx.update)(zero, tx.init(params), params)
    w = np.asarray(optax.apply_updates(params, updates)["fc"]["kernel"])
    sparsity = float(np.mean(w == 0))
    if ceiling is None:
      assert sparsity == 1.0  # the update the guard has to stop
    else:
      assert sparsity <= ceiling
      assert int(state.layers_at_ceiling) == 1
      np.testing.assert_array_equal(state.latent.thresholds["fc"]["kernel"], -3.0)


@pytest.mark.parametrize(
  "method",
  [
    autosparse.AutoSparse(alpha=0.5, max_layer_sparsity=0.99),
    autosparse.TopKAST(0.8, 0.5, alpha=0.5),
  ],
  ids=["autosparse", "topkast_ga"],
)
def test_donated_update_needs_no_copy_of_the_kernels(method, count_path):
  """A train step's update with params and state donated (as the trainer runs it) writes the
  latent kernels in place: the compiled update has no whole-kernel copy, and its scratch (XLA's
  memory analysis) is at most two float32 arrays per kernel weight (the compare path, which
  arrays that fit in cache take, writes out a select and TopKAST's bit patterns; the fused
  path needs one array for the largest kernel). AutoSparse's threshold gradient sums over the
  old W, which the update overwrites: unordered with that write, XLA kept a copy of every
  kernel for it; TopKAST+GA's search needed 4.8 MB of scratch here, against 2.1 MB now."""
  params = mlp_params(jax.random.key(0), sizes=(784, 300, 100, 10))
  tx = autosparse.optax_chain(optax.sgd(0.1, momentum=0.9), method)
  state = tx.init(params)

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile()
  kernels = [w for w in jax.tree.leaves(params) if w.ndim == 2]
  hlo = compiled.as_text()
  for w in kernels:
    shape = "f32[" + ",".join(map(str, w.shape)) + "]"
    assert not re.search(re.escape(shape) + r"\{[0-9,]*\} copy\(", hlo), f"a copy of {shape}"
  scratch = compiled.memory_analysis().temp_size_in_bytes
  assert scratch <= 8 * sum(w.size for w in kernels) + 64 * 1024, f"{scratch:,} bytes of scratch"

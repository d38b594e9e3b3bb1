"""Run by tests/test_sharding.py in its own process, with 8 fake CPU devices.

FSDP-sharded params; checks that optax.tree_map_params gives every state leaf a sharding,
that a jitted update keeps them, that results match the unsharded run, and that the compiled
TopKAST, RigL, SET, MEST and TopKAST+PP updates hold no all-gather (the top-k searches stay
shard-local).
"""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import autosparse_jax as autosparse  # noqa: E402


def params_and_specs():
  keys = jax.random.split(jax.random.key(0), 3)
  params = {
    "dense0": {"kernel": jax.random.normal(keys[0], (64, 32)), "bias": jnp.zeros(32)},
    "conv": {"kernel": jax.random.normal(keys[1], (3, 3, 8, 16))},
    "dense1": {"kernel": jax.random.normal(keys[2], (32, 16)), "bias": jnp.zeros(16)},
  }
  specs = {
    "dense0": {"kernel": P("fsdp", None), "bias": P()},
    "conv": {"kernel": P(None, None, "fsdp", None)},
    "dense1": {"kernel": P("fsdp", None), "bias": P()},
  }
  return params, specs


def loss(params, x):
  h = jnp.tanh(x @ params["dense0"]["kernel"] + params["dense0"]["bias"])
  c = jnp.sum(params["conv"]["kernel"]) * 1e-3
  return jnp.mean((h @ params["dense1"]["kernel"] + params["dense1"]["bias"]) ** 2) + c


def main():
  assert jax.device_count() == 8, jax.devices()
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))
  params, specs = params_and_specs()
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
  replicated = NamedSharding(mesh, P())
  x = jax.random.normal(jax.random.key(1), (16, 64))
  grads = jax.grad(loss)(params, x)
  methods = {
    "autosparse": autosparse.AutoSparse(0.5, threshold_init=-1.0),
    "channel": autosparse.AutoSparse(0.5, threshold_init=-1.0, granularity="channel"),
    "topkast": autosparse.TopKAST(0.8, 0.5, alpha=0.5),
    "magnitude": autosparse.GradualMagnitude(0.8, 1, 3, 1),
    # step 0 rewires: the compiled update holds the drop-and-grow searches
    "rigl": autosparse.RigL(0.8, end_step=10, update_every=1, budget="erk"),
    "set": autosparse.SET(0.8, end_step=10, update_every=1),
    "mest": autosparse.MEST(0.8, end_step=10, update_every=1, soft_bound=True),
    "topkast_pp": autosparse.Powerprop(autosparse.TopKAST(0.8, 0.5), 2.0),
    "target": autosparse.AutoSparse(
      0.5, threshold_init=-1.0, target_sparsity=0.8, target_ramp=autosparse.ramp(0, 10)
    ),
  }
  for name, method in methods.items():
    tx = autosparse.optax_chain(optax.sgd(0.1, momentum=0.9), method)
    abstract = jax.eval_shape(tx.init, params)
    state_shardings = optax.tree_map_params(
      tx, lambda _, s: s, abstract, shardings, transform_non_params=lambda _: replicated
    )
    sharded_params = jax.device_put(params, shardings)
    state = jax.jit(tx.init, out_shardings=state_shardings)(sharded_params)
    # Every state leaf that mirrors a param carries that param's sharding.
    for leaf, want in zip(
      jax.tree.leaves(state.latent.weights), jax.tree.leaves(shardings), strict=True
    ):
      assert leaf.sharding == want, (name, leaf.sharding, want)
    for leaf, want in zip(jax.tree.leaves(state.base), jax.tree.leaves(shardings), strict=True):
      assert leaf.sharding == want, (name, leaf.sharding, want)

    update = jax.jit(
      tx.update,
      in_shardings=(shardings, state_shardings, shardings),
      out_shardings=(shardings, state_shardings),
    )
    sharded_grads = jax.device_put(grads, shardings)
    compiled = update.lower(sharded_grads, state, sharded_params).compile()
    hlo = compiled.as_text()
    if name in ("topkast", "rigl", "set", "mest", "topkast_pp"):
      assert "all-gather" not in hlo, f"the {name} update gathers a sharded tensor"
      assert "all-reduce" in hlo, "expected the top-k counts to be summed across shards"
    updates, new_state = compiled(sharded_grads, state, sharded_params)
    for leaf, want in zip(jax.tree.leaves(updates), jax.tree.leaves(shardings), strict=True):
      assert leaf.sharding == want
    for a, b in zip(
      jax.tree.leaves(new_state.latent.weights), jax.tree.leaves(shardings), strict=True
    ):
      assert a.sharding == b

    # Same numbers as one device.
    ref_updates, _ = tx.update(grads, tx.init(params), params)
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(ref_updates), strict=True):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    print(name, "ok")
  print("ALL OK")


if __name__ == "__main__":
  main()

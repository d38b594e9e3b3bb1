"""ViT and GPT: output shapes, causality, prunable rules, and a jitted sparse train step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import autosparse_jax as autosparse
from autosparse_jax.models import TRANSFORMER_PRUNABLE, get_model
from autosparse_jax.selection import leaf_paths, select_leaves

SMALL = dict(width=16, depth=2, num_heads=2, mlp_dim=32)
CASES = {
  "vit_tiny": (dict(patch=4, **SMALL), np.zeros((2, 16, 16, 3), np.float32), (2, 7)),
  "gpt_tiny": (dict(max_len=8, **SMALL), np.arange(16).reshape(2, 8) % 7, (2, 8, 7)),
}
BLOCK_KERNELS = ["attn/query", "attn/key", "attn/value", "attn/out", "mlp/fc1", "mlp/fc2"]


def _init(name):
  kwargs, x, _ = CASES[name]
  model = get_model(name, 7, **kwargs)
  return model, model.init(jax.random.key(0), x), x


@pytest.mark.parametrize("name", sorted(CASES))
def test_shapes_and_rules_select_attention_and_mlp_kernels_only(name):
  model, variables, x = _init(name)
  assert set(variables) == {"params"}
  y = model.apply(variables, x, train=True)
  assert y.shape == CASES[name][2] and y.dtype == jnp.float32
  flags = select_leaves(variables, TRANSFORMER_PRUNABLE)
  pruned = {p for p, f in zip(leaf_paths(variables), flags, strict=True) if f}
  expected = {f"params/block{i}/{k}/kernel" for i in range(2) for k in BLOCK_KERNELS}
  assert pruned == expected
  paths = set(leaf_paths(variables))
  assert {"params/embedding/embedding" if name == "gpt_tiny" else "params/embedding/kernel"} < (
    paths - pruned
  )
  assert {"params/head/kernel", "params/pos_embedding", "params/ln/scale"} < paths - pruned


def test_gpt_is_causal():
  model, variables, x = _init("gpt_tiny")
  y = model.apply(variables, x)
  changed = x.copy()
  changed[:, 5] = (changed[:, 5] + 1) % 7
  y2 = model.apply(variables, changed)
  np.testing.assert_allclose(y[:, :5], y2[:, :5], rtol=1e-6, atol=1e-6)
  assert not np.allclose(y[:, 5:], y2[:, 5:])


# Each train step compiles for a minute on a loaded CPU: one method per model.
@pytest.mark.parametrize("name, method", [("vit_tiny", "autosparse"), ("gpt_tiny", "topkast")])
def test_jitted_sparse_train_step(name, method):
  model, variables, x = _init(name)
  params = variables["params"]
  labels = jnp.ones(CASES[name][2][:-1], jnp.int32)
  chosen = {
    "autosparse": autosparse.AutoSparse(alpha=0.5, threshold_init=-3.0),
    "topkast": autosparse.TopKAST(0.8, 0.5),
  }[method]
  tx = autosparse.optax_chain(optax.adamw(1e-2), chosen, prunable=TRANSFORMER_PRUNABLE)
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    def loss(p):
      logits = model.apply({"params": p}, x, train=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    value, grads = jax.value_and_grad(loss)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, value

  for _ in range(2):
    params, state, value = step(params, state)
  assert np.isfinite(float(value))
  flat = dict(zip(leaf_paths(params), jax.tree.leaves(params), strict=True))
  for path, w in flat.items():
    zeros = float(jnp.mean(w == 0))
    if any(path.endswith(f"{k}/kernel") for k in BLOCK_KERNELS):
      if method == "topkast":
        assert zeros == pytest.approx(0.8, abs=0.02), path
    else:
      assert zeros < 0.5 or path.endswith("cls"), path  # dense leaves are not pruned

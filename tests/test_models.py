"""Tests of autosparse_jax.models: shapes, train/eval modes, param layout, init, bf16.

Params for the forward tests come from ``jax.eval_shape(model.init)`` filled with numpy noise:
compiling ``model.init`` on CPU costs ~0.15 s per param leaf (threefry), the forward a second.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autosparse_jax.models import MODELS, ResNet, get_model
from autosparse_jax.models._common import conv_kernel_init

NUM_CLASSES = 7

# name -> (size overrides, input shape): a small variant of every registry entry.
SMALL = {
  "lenet_300_100": ({}, (2, 784)),
  "lenet5": ({}, (2, 28, 28, 1)),
  "resnet20": ({"stage_sizes": (1, 1), "num_filters": 4}, (2, 16, 16, 3)),
  "resnet18": ({"stage_sizes": (1, 1), "num_filters": 4}, (2, 32, 32, 3)),
  "resnet50": ({"stage_sizes": (1, 1), "num_filters": 4}, (2, 32, 32, 3)),
  "mobilenet_v1": ({"width": 0.25, "blocks": ((64, 1), (128, 2))}, (2, 32, 32, 3)),
  "resnet_tiny": ({}, (2, 32, 32, 3)),
  "mobilenet_tiny": ({}, (2, 32, 32, 3)),
}


def _path(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


@functools.cache
def _shapes(name: str, num_classes: int, shape: tuple[int, ...], **kwargs):
  model = get_model(name, num_classes, **kwargs)
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), x)


def _fake_variables(shapes, seed: int = 0):
  rng = np.random.default_rng(seed)

  def fill(path, s):
    leaf = _path(path).rsplit("/", 1)[-1]
    if leaf in ("scale", "var"):
      return np.ones(s.shape, s.dtype)
    if leaf in ("bias", "mean"):
      return np.zeros(s.shape, s.dtype)
    fan_in = int(np.prod(s.shape[:-1]))
    return (rng.standard_normal(s.shape) * np.sqrt(2.0 / fan_in)).astype(s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _flat(tree) -> dict[str, jax.ShapeDtypeStruct]:
  return {_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


# Transformers have no batch norm and (GPT) take tokens: tests/test_transformers.py.
TRANSFORMERS = {"vit_tiny", "gpt2_small", "gpt_tiny"}


def test_small_variants_cover_the_registry():
  assert set(SMALL) | TRANSFORMERS == set(MODELS)


def test_unknown_name_raises_and_lists_names():
  with pytest.raises(ValueError, match="resnet51") as err:
    get_model("resnet51", 10)
  for name in MODELS:
    assert name in str(err.value)


# Backward passes dominate CPU compile time (~3 s each), so only the tiny models take one.
WITH_BACKWARD = ("resnet_tiny", "mobilenet_tiny")


@pytest.mark.parametrize("name", sorted(SMALL))
def test_forward_train_and_eval(name):
  kwargs, shape = SMALL[name]
  model = get_model(name, NUM_CLASSES, **kwargs)
  variables = _fake_variables(_shapes(name, NUM_CLASSES, shape, **kwargs))
  x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
  backward = name in WITH_BACKWARD

  @jax.jit
  def run(variables, x):
    def loss(params):
      y, new_state = model.apply(
        {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
      )
      return jnp.mean(y**2), (y, new_state)

    if backward:
      grads, (y_train, new_state) = jax.grad(loss, has_aux=True)(variables["params"])
    else:
      grads, (y_train, new_state) = None, loss(variables["params"])[1]
    y_eval = model.apply(variables, x, train=False)
    return grads, y_train, new_state, y_eval

  grads, y_train, new_state, y_eval = run(variables, x)
  for y in (y_train, y_eval):
    assert y.shape == (shape[0], NUM_CLASSES)
    assert y.dtype == jnp.float32
    assert np.all(np.isfinite(y))
  # train mode normalises with batch statistics and updates the running ones
  assert not np.allclose(y_train, y_eval)
  old = _flat(variables["batch_stats"])
  new = _flat(new_state["batch_stats"])
  assert old.keys() == new.keys() and old
  assert any(not np.allclose(old[k], new[k]) for k in old)
  if backward:
    grads = _flat(grads)
    assert grads.keys() == _flat(variables["params"]).keys()
    assert all(np.all(np.isfinite(g)) for g in grads.values())
    assert all(np.any(g != 0) for p, g in grads.items() if p.endswith("kernel"))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_param_layout(name):
  kwargs, shape = SMALL[name]
  variables = _shapes(name, NUM_CLASSES, shape, **kwargs)
  assert set(variables) == {"params", "batch_stats"}
  params = _flat(variables["params"])
  for path, leaf in params.items():
    assert leaf.dtype == jnp.float32, path
    if leaf.ndim >= 2:
      assert path.endswith("/kernel"), path
  # every layer that batch norm follows has no bias: only the classifier and BN have one
  biases = {p for p in params if p.endswith("/bias")}
  bn_biases = {p for p in biases if p[: -len("bias")] + "scale" in params}
  assert biases - bn_biases == {"head/bias"}
  assert params["head/kernel"].shape[-1] == NUM_CLASSES


# (name, input size) -> torchvision / paper parameter counts and prunable-kernel counts
FULL_SIZE = {
  "resnet50": (224, 1000, 25_557_032, 25_502_912),  # kernels: STR's budget file
  "resnet18": (224, 1000, 11_689_512, 11_678_912),
  "mobilenet_v1": (224, 1000, 4_231_976, 4_209_088),
  "resnet20": (32, 10, 272_474, 270_896),  # option B; option A would be 269,722
  "lenet_300_100": (28, 10, 267_010, 266_200),  # 784*300 + 300*100 + 100*10 kernels
  "lenet5": (28, 10, 431_650, 430_500),  # 500 + 25,000 + 400,000 + 5,000 kernels
}


@pytest.mark.parametrize("name", sorted(FULL_SIZE))
def test_full_size_param_counts(name):
  size, classes, n_params, n_kernels = FULL_SIZE[name]
  channels = 1 if name.startswith("lenet") else 3
  params = _flat(_shapes(name, classes, (1, size, size, channels))["params"])
  assert sum(x.size for x in params.values()) == n_params
  assert sum(x.size for p, x in params.items() if p.endswith("kernel")) == n_kernels


def test_readable_names_and_shapes():
  r50 = _flat(_shapes("resnet50", 1000, (1, 224, 224, 3))["params"])
  assert r50["conv_init/kernel"].shape == (7, 7, 3, 64)
  assert r50["stage1_block0/conv1/kernel"].shape == (1, 1, 64, 64)
  assert r50["stage1_block0/proj_conv/kernel"].shape == (1, 1, 64, 256)
  assert r50["stage2_block0/conv2/kernel"].shape == (3, 3, 128, 128)
  assert r50["stage4_block2/conv3/kernel"].shape == (1, 1, 512, 2048)
  assert r50["head/kernel"].shape == (2048, 1000)
  assert "stage1_block1/proj_conv/kernel" not in r50
  mb = _flat(_shapes("mobilenet_v1", 1000, (1, 224, 224, 3))["params"])
  assert mb["conv_init/kernel"].shape == (3, 3, 3, 32)
  assert mb["block0/dw_conv/kernel"].shape == (3, 3, 1, 32)  # depthwise
  assert mb["block12/dw_conv/kernel"].shape == (3, 3, 1, 1024)
  assert mb["block12/pw_conv/kernel"].shape == (1, 1, 1024, 1024)
  r20 = _flat(_shapes("resnet20", 10, (1, 32, 32, 3))["params"])
  assert r20["conv_init/kernel"].shape == (3, 3, 3, 16)
  assert r20["stage3_block2/conv2/kernel"].shape == (3, 3, 64, 64)
  assert r20["stage2_block0/proj_conv/kernel"].shape == (1, 1, 16, 32)


def test_mobilenet_width_multiplier():
  mb = _flat(_shapes("mobilenet_v1", 10, (1, 64, 64, 3), width=0.5)["params"])
  assert mb["conv_init/kernel"].shape == (3, 3, 3, 16)
  assert mb["block12/pw_conv/kernel"].shape == (1, 1, 512, 512)


def test_lenet_caffe_variant_and_flat_input():
  v = _shapes("lenet5", 10, (3, 784), batch_norm=False)
  assert set(v) == {"params"}
  params = _flat(v["params"])
  assert params["conv1/kernel"].shape == (5, 5, 1, 20)
  assert params["conv1/bias"].shape == (20,)
  assert params["fc1/kernel"].shape == (800, 500)
  model = get_model("lenet5", 10, batch_norm=False)
  out = jax.eval_shape(model.apply, v, jax.ShapeDtypeStruct((3, 784), jnp.float32))
  assert out.shape == (3, 10)
  v = _shapes("lenet_300_100", 10, (3, 28, 28, 1), batch_norm=False)
  assert _flat(v["params"])["fc1/kernel"].shape == (784, 300)


def test_kaiming_normal_fan_in_init_and_zero_init_residual():
  w = conv_kernel_init(jax.random.key(0, impl="unsafe_rbg"), (3, 3, 64, 64), jnp.float32)
  w = np.asarray(w)
  np.testing.assert_allclose(np.std(w), np.sqrt(2.0 / (9 * 64)), rtol=0.02)
  model = ResNet(num_classes=3, stage_sizes=(1,), num_filters=16, stem="cifar")
  # the key's generator does not change the distribution; rbg compiles 3x faster than threefry
  key = jax.random.key(1, impl="unsafe_rbg")
  variables = jax.device_get(jax.jit(model.init)(key, jnp.zeros((1, 8, 8, 3))))
  params = _flat(variables["params"])
  w = params["stage1_block0/conv2/kernel"]  # fan_in = 9 * 16
  np.testing.assert_allclose(np.std(w), np.sqrt(2.0 / 144), rtol=0.1)
  assert np.all(params["stage1_block0/bn3/scale"] == 0)
  assert np.all(params["stage1_block0/bn1/scale"] == 1)


@pytest.mark.parametrize("name", ["resnet_tiny", "mobilenet_tiny"])
def test_bfloat16_compute(name):
  kwargs, shape = SMALL[name]
  model = get_model(name, NUM_CLASSES, dtype=jnp.bfloat16, **kwargs)
  shapes = _shapes(name, NUM_CLASSES, shape, dtype=jnp.bfloat16, **kwargs)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(shapes))  # params stay f32
  variables = _fake_variables(shapes)
  x = np.ones(shape, np.float32)
  jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x))(variables, x)
  convs = [e for e in jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
  assert convs and all(e.outvars[0].aval.dtype == jnp.bfloat16 for e in convs)
  y = jax.jit(lambda v, x: model.apply(v, x))(variables, x)
  assert y.dtype == jnp.float32 and y.shape == (shape[0], NUM_CLASSES)
  assert np.all(np.isfinite(y))

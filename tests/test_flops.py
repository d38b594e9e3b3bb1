"""Tests of autosparse_jax.flops against hand counts and published numbers.

The ImageNet models are only traced (``jax.eval_shape`` / ``jax.make_jaxpr``), never run.
STR's per-layer budget file is read from ``$AUTOSPARSE_SHARED_DATA`` or ``../shared/data``
beside the repository; the tests that need it skip when it is absent.
"""

from __future__ import annotations

import ast
import csv
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from autosparse_jax import flops
from autosparse_jax.models import get_model

SHARED_DATA = Path(
  os.environ.get("AUTOSPARSE_SHARED_DATA", Path(__file__).parents[2] / "shared" / "data")
)
STR_CSV = SHARED_DATA / "str_budgets_resnet50.csv"

RESNET50_AVG_POOL = 7 * 7 * 2048  # 100,352: STR's extra row
RESNET50_TOTAL = 4_089_284_608  # conv + fc + average pool, STR's table


def _image(size: int, batch: int = 1) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)


def _dense_macs(name: str, size: int = 224, **kwargs) -> tuple[dict[str, int], dict]:
  model = get_model(name, 1000, **kwargs)
  variables = jax.eval_shape(model.init, jax.random.key(0), _image(size))
  return flops.count_macs(model.apply, variables, _image(size), train=False), variables


@pytest.fixture(scope="module")
def resnet50():
  return _dense_macs("resnet50")


@pytest.fixture(scope="module")
def str_table():
  if not STR_CSV.exists():
    pytest.skip(f"STR budget file not found at {STR_CSV} (set AUTOSPARSE_SHARED_DATA)")
  with open(STR_CSV, encoding="utf-8-sig", newline="") as f:
    rows = list(csv.reader(f))
  overall = rows[1]
  layers = [r for r in rows if r[0].startswith("Layer ")]
  pool = [r for r in rows if r[0].startswith("AP ")]
  assert overall[0] == "Overall" and len(layers) == 54 and len(pool) == 1
  return overall, layers, pool[0]


def _str_name_to_path(row_name: str) -> str:
  """'Layer 3 - layer1.0.conv2' -> 'params/stage1_block0/conv2/kernel'."""
  layer = row_name.split(" - ", 1)[1]
  if layer == "conv1":
    return "params/conv_init/kernel"
  if layer == "fc":
    return "params/head/kernel"
  stage, block, conv = re.fullmatch(r"layer(\d)\.(\d+)\.(conv\d|downsample\.0)", layer).groups()
  conv = "proj_conv" if conv == "downsample.0" else conv
  return f"params/stage{stage}_block{block}/{conv}/kernel"


# ----------------------------------------------------------------------------- published


def test_resnet50_dense_total(resnet50):
  macs, _ = resnet50
  assert len(macs) == 54  # 53 convs + fc
  assert sum(macs.values()) + flops.global_avg_pool_macs((7, 7, 2048)) == RESNET50_TOTAL
  assert flops.macs_to_flops(RESNET50_TOTAL) == 8_178_569_216  # RigL's "8.2G FLOPs"


def test_resnet50_per_layer_matches_str(resnet50, str_table):
  macs, variables = resnet50
  kernels = {
    "params/" + "/".join(str(k.key) for k in p): x
    for p, x in jax.tree_util.tree_flatten_with_path(variables["params"])[0]
  }
  overall, layers, pool = str_table
  table = {_str_name_to_path(r[0]): (int(r[1]), int(r[2])) for r in layers}
  assert table.keys() == macs.keys()
  for path, (n_params, n_macs) in table.items():
    assert macs[path] == n_macs, path
    assert kernels[path].size == n_params, path
  assert int(pool[2]) == RESNET50_AVG_POOL
  assert int(overall[2]) == RESNET50_TOTAL


def _sparse_params(variables, sparsity: dict[str, float]):
  """int8 copies of the kernels with round(size * s) exact zeros each (other leaves ones)."""

  def make(path, s):
    key = "/".join(str(k.key) for k in path)
    arr = np.ones(s.size, np.int8)
    arr[: round(s.size * sparsity.get(key, 0.0))] = 0
    return arr.reshape(s.shape)

  return jax.tree_util.tree_map_with_path(make, {"params": variables["params"]})


@pytest.mark.parametrize(("overall_pct", "published_m"), [("81.27", 705), ("90.23", 343)])
def test_str_budget_reproduces_published_inference_macs(
  resnet50, str_table, overall_pct, published_m
):
  macs, variables = resnet50
  overall, layers, _ = str_table
  col = overall.index(overall_pct)
  sparsity = {_str_name_to_path(r[0]): float(r[col]) / 100 for r in layers}
  params = _sparse_params(variables, sparsity)
  pool = {"avg_pool": flops.global_avg_pool_macs((7, 7, 2048))}
  result = flops.inference_macs(macs, params, extra_macs=pool)
  assert round(result["total"] / 1e6) == published_m
  assert result["dense_total"] == RESNET50_TOTAL
  assert result["ratio"] == pytest.approx(result["total"] / RESNET50_TOTAL)
  sizes = {
    "params/" + "/".join(str(k.key) for k in p): x.size
    for p, x in jax.tree_util.tree_flatten_with_path(variables["params"])[0]
  }
  for path, s in sparsity.items():  # measured from the zeros, to one weight
    assert result["density"][path] == pytest.approx(1 - s, abs=0.5 / sizes[path])
  # the overall sparsity of those kernels is STR's headline number
  zeros = sum((1 - result["density"][p]) * sizes[p] for p in macs)
  assert f"{100 * zeros / sum(sizes[p] for p in macs):.2f}" == overall_pct


def test_mobilenet_v1_dense_macs():
  macs, _ = _dense_macs("mobilenet_v1")
  # independent count: stem, then per block depthwise H*W*C*9 + pointwise H*W*C_in*C_out
  hand, size, c_in = 112 * 112 * 3 * 32 * 9, 112, 32
  for c_out, stride in get_model("mobilenet_v1", 1000).blocks:
    size //= stride
    hand += size * size * c_in * 9 + size * size * c_in * c_out
    c_in = c_out
  hand += 1024 * 1000
  assert sum(macs.values()) == hand == 568_740_352
  assert round(sum(macs.values()) / 1e6) == 569  # the paper's "569M Mult-Adds"
  assert macs["params/block0/dw_conv/kernel"] == 112 * 112 * 32 * 9


def test_counts_do_not_depend_on_compute_dtype_or_batch():
  f32, _ = _dense_macs("resnet_tiny", 32)
  bf16, _ = _dense_macs("resnet_tiny", 32, dtype=jnp.bfloat16)
  assert f32 == bf16
  model = get_model("resnet_tiny", 1000)
  variables = jax.eval_shape(model.init, jax.random.key(0), _image(32))
  assert flops.count_macs(model.apply, variables, _image(32, batch=5)) == f32
  # keys follow the first argument: the inner 'params' collection drops the prefix
  inner = flops.count_macs(
    lambda p, x, bs: model.apply({"params": p, "batch_stats": bs}, x),
    variables["params"],
    _image(32, batch=2),
    variables["batch_stats"],
  )
  assert inner == {k.removeprefix("params/"): v for k, v in f32.items()}


# ----------------------------------------------------------------------------- hand counts

BATCH = 4


def _toy_params():
  shapes = {
    "conv": {"kernel": (3, 3, 3, 4)},  # HWIO
    "dw": {"kernel": (3, 3, 1, 4)},  # depthwise, 4 groups
    "nchw": {"kernel": (3, 2, 1, 3)},  # OIHW
    "dense": {"kernel": (64, 5)},
    "layers": [{"kernel": (5, 5)}, {"kernel": (5, 2)}],
    "stack": {"kernel": (3, 2, 2)},  # scanned over the leading axis
    "tied": {"kernel": (2, 6)},  # used twice, once transposed
    "bias": (6,),
  }
  rng = np.random.default_rng(0)
  return jax.tree.map(
    lambda s: rng.standard_normal(s).astype(np.float32),
    shapes,
    is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(d, int) for d in x),
  )


def _toy_apply(params, x, x_nchw):
  # conv 3x3, stride 2, SAME: (B, 8, 8, 3) -> (B, 4, 4, 4), in bf16
  y = lax.conv_general_dilated(
    x.astype(jnp.bfloat16),
    params["conv"]["kernel"].astype(jnp.bfloat16),
    (2, 2),
    "SAME",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  ).astype(jnp.float32)
  # depthwise 3x3 inside a jit: (B, 4, 4, 4) -> (B, 4, 4, 4)
  y = jax.jit(
    lambda a, k: lax.conv_general_dilated(
      a, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=4
    )
  )(y, params["dw"]["kernel"])
  y = jax.nn.relu(y) * y  # not counted
  # NCHW conv, VALID: (B, 2, 5, 6) -> (B, 3, 5, 4)
  z = lax.conv_general_dilated(
    x_nchw, params["nchw"]["kernel"], (1, 1), "VALID", dimension_numbers=("NCHW", "OIHW", "NCHW")
  )
  h = y.reshape(y.shape[0], -1) @ params["dense"]["kernel"]  # (B, 64) @ (64, 5)
  h = jax.checkpoint(lambda a, k: jnp.tanh(a @ k))(h, params["layers"][0]["kernel"])
  h = h @ params["layers"][1]["kernel"]  # (B, 5) @ (5, 2)

  def body(carry, k):
    return carry @ k, None

  h, _ = lax.scan(body, h, params["stack"]["kernel"])  # 3 x (B, 2) @ (2, 2)
  t = h @ params["tied"]["kernel"] + params["bias"]  # (B, 2) @ (2, 6)
  t = t @ params["tied"]["kernel"].T  # (B, 6) @ (6, 2)
  gram = h @ h.T  # activation x activation: not counted
  return t.sum() + gram.sum() + z.sum() + jnp.mean(z)


TOY_MACS = {
  "conv/kernel": 4 * 4 * 4 * 9 * 3,  # out elements * window * C_in
  "dw/kernel": 4 * 4 * 4 * 9 * 1,  # C_in / groups = 1
  "nchw/kernel": 3 * 5 * 4 * 3 * 2,
  "dense/kernel": 64 * 5,
  "layers/0/kernel": 5 * 5,
  "layers/1/kernel": 5 * 2,
  "stack/kernel": 3 * 2 * 2,
  "tied/kernel": 2 * 6 + 6 * 2,
}


def _toy_inputs():
  x = jax.ShapeDtypeStruct((BATCH, 8, 8, 3), jnp.float32)
  x_nchw = jax.ShapeDtypeStruct((BATCH, 2, 5, 6), jnp.float32)
  return x, x_nchw


def test_hand_counted_toy_model():
  macs = flops.count_macs(_toy_apply, _toy_params(), *_toy_inputs())
  assert macs == TOY_MACS
  assert list(macs)[:2] == ["conv/kernel", "dw/kernel"]  # first-use order
  total = flops.count_macs(_toy_apply, _toy_params(), *_toy_inputs(), batch_size=1)
  assert total == {k: BATCH * v for k, v in TOY_MACS.items()}
  with pytest.raises(ValueError, match="batch_size"):
    flops.count_macs(_toy_apply, _toy_params(), *_toy_inputs(), batch_size=3)


def test_inference_macs_with_known_zeros():
  params = _toy_params()
  params["conv"]["kernel"][0] = 0.0  # 1 of 3 kernel rows: 36 of 108 weights
  params["dw"]["kernel"][..., :3] = 0.0  # 3 of 4 channels
  params["dense"]["kernel"][:] = 0.0  # all
  # the other layers are dense
  result = flops.inference_macs(TOY_MACS, {"params": params}, extra_macs={"pool": 10})
  expected = dict(TOY_MACS)
  expected["conv/kernel"] = TOY_MACS["conv/kernel"] * 2 / 3
  expected["dw/kernel"] = TOY_MACS["dw/kernel"] / 4
  expected["dense/kernel"] = 0
  expected["pool"] = 10
  assert result["per_layer"] == pytest.approx(expected)
  assert result["total"] == pytest.approx(sum(expected.values()))
  assert result["dense_total"] == sum(TOY_MACS.values()) + 10
  assert result["ratio"] == pytest.approx(sum(expected.values()) / (sum(TOY_MACS.values()) + 10))
  assert result["density"]["dw/kernel"] == 0.25
  with pytest.raises(ValueError, match="no leaf"):
    flops.inference_macs({"missing/kernel": 5}, params)


def test_training_cost_on_a_toy_schedule():
  dense = {"a/kernel": 100, "b/kernel": 50}
  assert flops.training_macs_per_step(dense, 1.0, 1.0) == 3 * 150
  # GA phase (alpha_t > 0): sparse forward, dense weight gradient
  ga = {"a/kernel": 0.5, "b/kernel": 1.0}
  assert flops.training_macs_per_step(dense, ga, 1.0) == 100 * (0.5 + 0.5 + 1) + 50 * 3
  # alpha_t = 0: the weight gradient at the forward density; 'params/' prefixes match too
  late = {"params/a/kernel": 0.2, "params/b/kernel": 0.4}
  assert flops.training_macs_per_step(dense, late, late) == 100 * 0.6 + 50 * 1.2
  history = [
    {"forward_density": ga, "weight_grad_density": 1.0, "steps": 10},
    flops.TrainingCostRecord(late, late, steps=20),
    flops.TrainingCostRecord(late, late),  # one step
    flops.TrainingCostRecord(late, late, steps=9),
  ]
  expected = (10 * 350 + 30 * 120) / (40 * 450)
  assert flops.training_cost_ratio(dense, history) == pytest.approx(expected)
  # a layer missing from a density mapping is dense
  assert flops.training_macs_per_step(dense, {"a/kernel": 0.0}, {"a/kernel": 0.0}) == 150
  with pytest.raises(ValueError, match="forward_density"):
    flops.training_macs_per_step(dense, {"c/kernel": 0.5}, 1.0)
  with pytest.raises(ValueError, match="weight_grad_density"):
    flops.training_macs_per_step(dense, 1.0, 1.5)
  with pytest.raises(ValueError, match="history"):
    flops.training_cost_ratio(dense, [])


def test_layer_density_measures_zeros():
  tree = {"w": np.array([[0.0, 1.0], [2.0, 0.0]]), "b": jnp.array([0.0, 0.0, 3.0, 4.0])}
  assert flops.layer_density(tree) == {"w": 0.5, "b": 0.5}
  assert flops.layer_density({"params": tree}, ["w"]) == {"w": 0.5}


def test_macs_to_flops():
  assert flops.macs_to_flops(569_000_000) == 1_138_000_000


def test_flops_package_imports_only_jax_and_numpy():
  roots = set()
  for path in Path(flops.__file__).parent.glob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        roots |= {a.name.split(".")[0] for a in node.names}
      elif isinstance(node, ast.ImportFrom) and not (node.module or "").startswith(
        "autosparse_jax.flops"
      ):
        roots.add((node.module or "").split(".")[0])
  assert roots <= {"__future__", "math", "collections", "typing", "jax", "numpy"}, roots

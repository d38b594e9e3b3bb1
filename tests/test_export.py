"""Sparse export and sparse inference (``autosparse_jax.export``): the file round-trips bit for
bit, every inference path predicts what the dense model predicts, bad input is refused or kept
dense with a note, and the command line exports a workdir the training system wrote.

Oracles: ``scipy.sparse.csr_matrix`` of ``W^T`` for the CSR arrays, the array bytes for the
round trip, and ``model.apply`` with the dense variables for the predictions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flax")
scipy_sparse = pytest.importorskip("scipy.sparse")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402

from autosparse_jax import export  # noqa: E402
from autosparse_jax.models import get_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ALL = export.Policy(min_sparsity=0.0, min_size=0)
SUBPROCESS_TIMEOUT_S = 600

pytestmark = pytest.mark.usefixtures("compilation_cache")


def magnitude_prune(variables, sparsity):
  def prune(w):
    w = np.array(w)
    if w.ndim >= 2:
      cut = np.quantile(np.abs(w), sparsity)
      w[np.abs(w) <= cut] = 0
    return w

  return jax.tree.map(prune, variables)


def same_bits(a, b) -> bool:
  """Same tree structure, and per leaf the same shape, dtype and bytes."""
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  return ta == tb and all(
    x.shape == y.shape and x.dtype == y.dtype and np.asarray(x).tobytes() == np.asarray(y).tobytes()
    for x, y in zip(la, lb, strict=True)
  )


@pytest.fixture(scope="module")
def lenet300():
  """LeNet-300-100 at 95% (magnitude-pruned init), its export, and an input batch."""
  model = get_model("lenet_300_100", 10)
  variables = jax.device_get(model.init(jax.random.key(0), jnp.zeros((1, 784))))
  pruned = magnitude_prune(variables, 0.95)
  info = {"class": "LeNet300100", "name": "lenet_300_100", "num_classes": 10, "input_shape": [784]}
  x = np.random.default_rng(0).standard_normal((16, 784)).astype(np.float32)
  return model, pruned, export.encode(pruned, info), x


# ---------------------------------------------------------------------------------------------
# the file


def test_round_trip_is_bit_exact_for_awkward_trees(tmp_path):
  rng = np.random.default_rng(1)
  w = rng.standard_normal((40, 30)).astype(np.float32)
  w[np.abs(w) < 1.5] = 0
  w[0, :5] = -0.0  # soft thresholding makes negative zeros
  w[1, 1] = np.nan
  conv = rng.standard_normal((3, 3, 4, 8)).astype(np.float32)
  conv[np.abs(conv) < 2.0] = -0.0
  half = rng.standard_normal((64, 32)).astype(ml_dtypes.bfloat16)
  half[np.abs(half.astype(np.float32)) < 1.8] = 0
  variables = {
    "params": {"fc": {"kernel": w, "bias": rng.standard_normal(30).astype(np.float32)}},
    "conv": {"kernel": conv},
    "bf16": {"kernel": half},
    "nnx": {0: {"kernel": np.zeros((8, 8), np.float32)}, 1: {"count": np.arange(3)}},
    "batch_stats": {},
  }
  exported = export.encode(variables)
  assert {tuple(leaf.path): leaf.storage for leaf in exported.leaves if leaf.storage == "csr"} == {
    ("params", "fc", "kernel"): "csr",
    ("conv", "kernel"): "csr",
    ("bf16", "kernel"): "csr",
    ("nnx", 0, "kernel"): "csr",
  }
  export.save(tmp_path / "v.npz", exported)
  back = export.load(tmp_path / "v.npz").variables()
  assert back.keys() == variables.keys() and back["batch_stats"] == {}
  assert same_bits(back, variables)
  assert np.signbit(back["params"]["fc"]["kernel"][0, :5]).all()


def test_csr_arrays_match_scipy_of_the_transposed_kernel(lenet300):
  _, pruned, exported, _ = lenet300
  for name in ("fc1", "fc2", "head"):
    kernel = pruned["params"][name]["kernel"]
    leaf = exported.leaf(("params", name, "kernel"))
    oracle = scipy_sparse.csr_matrix(kernel.T)
    assert leaf.storage == "csr"
    assert leaf.value.indices.dtype == np.int32 and leaf.value.indptr.dtype == np.int32
    assert leaf.value.data.dtype == kernel.dtype
    np.testing.assert_array_equal(leaf.value.indptr, oracle.indptr)
    np.testing.assert_array_equal(leaf.value.indices, oracle.indices)
    np.testing.assert_array_equal(leaf.value.data, oracle.data)
  # 95% sparse float32: data + int32 indices + indptr is about 0.1 of the dense bytes
  assert 0.09 < exported.nbytes() / exported.dense_nbytes() < 0.12


def test_a_dense_model_stays_dense_and_says_so(tmp_path, capsys):
  model = get_model("lenet_300_100", 10)
  variables = jax.device_get(model.init(jax.random.key(0), jnp.zeros((1, 784))))
  half_pruned = magnitude_prune(variables, 0.3)
  exported = export.encode(half_pruned)
  kernels = [leaf for leaf in exported.leaves if len(leaf.shape) >= 2]
  assert all(leaf.storage == "dense" for leaf in kernels)
  assert all("kept dense: 30.0% sparse" in leaf.note for leaf in kernels)
  from autosparse_jax.export.__main__ import describe

  assert "the file holds the dense model" in describe(exported)[-2]
  assert same_bits(exported.variables(), half_pruned)


def test_files_of_another_format_version_or_kind_are_refused(tmp_path, lenet300):
  _, _, exported, _ = lenet300
  good = tmp_path / "good.npz"
  export.save(good, exported)
  with pytest.raises(FileExistsError, match="not overwriting"):
    export.save(good, exported)

  with np.load(good) as f:
    arrays = dict(f)
  meta = json.loads(bytes(arrays["meta"]).decode())
  newer = tmp_path / "newer.npz"
  np.savez(
    newer, **arrays | {"meta": np.frombuffer(json.dumps(meta | {"version": 2}).encode(), np.uint8)}
  )
  with pytest.raises(ValueError, match="format version 2; this autosparse_jax reads version 1"):
    export.load(newer)

  plain = tmp_path / "plain.npz"
  np.savez(plain, w=np.zeros(3))
  with pytest.raises(ValueError, match="is not an autosparse_jax sparse export"):
    export.load(plain)
  text = tmp_path / "notes.txt"
  text.write_text("hello")
  with pytest.raises(ValueError, match="is not an autosparse_jax sparse export"):
    export.load(text)
  assert zipfile.is_zipfile(good)  # the refusals left the good file alone
  assert same_bits(export.load(good).variables(), exported.variables())


def test_a_file_of_another_model_is_refused(lenet300):
  _, _, exported, _ = lenet300
  with pytest.raises(ValueError, match="holds the variables of a LeNet300100 .*not of a LeNet5"):
    export.SparseModel(get_model("lenet5", 10), exported, batch_size=8)
  wider = get_model("lenet_300_100", 10, hidden=(200, 100))
  with pytest.raises(
    ValueError,
    match=r"does not hold this LeNet300100's variables: .*300.* in the file, the model has .*200",
  ):
    export.SparseModel(wider, exported, batch_size=8)


# ---------------------------------------------------------------------------------------------
# inference


@pytest.mark.parametrize("path", ["bcsr", "bcsr_policy", "scipy"])
def test_every_path_predicts_what_the_dense_model_predicts(lenet300, path):
  model, pruned, exported, x = lenet300
  if path == "bcsr":
    fast = export.SparseModel(model, exported, batch_size=len(x), policy=ALL)
    assert [d.path for d in fast.decisions if d.sparse] == ["fc1", "fc2", "head"]
  elif path == "bcsr_policy":
    fast = export.SparseModel(model, exported, batch_size=len(x))
    by_path = {d.path: d for d in fast.decisions}
    assert by_path["fc1"].sparse  # 235,200 weights, 95%, batch 16
    assert not by_path["head"].sparse and "1,000 weights < " in by_path["head"].reason
  else:
    fast = export.HostModel(model, exported, batch_size=1, policy=ALL)
    assert all(d.sparse for d in fast.decisions)
  want = np.asarray(model.apply(pruned, x))
  got = np.asarray(fast(x))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
  # 95%: every sparse layer's arrays take about 0.1 of its dense bytes
  sparse_bytes = sum(np.prod(d.shape) * 4 for d in fast.decisions if d.sparse)
  assert fast.nbytes() < exported.dense_nbytes() - 0.8 * sparse_bytes


def test_the_policy_keeps_small_batches_and_weakly_sparse_layers_dense(lenet300):
  model, _, exported, _ = lenet300
  batch1 = export.SparseModel(model, exported, batch_size=1)
  assert not any(d.sparse for d in batch1.decisions)
  assert "batch 1 < 8: BCSR loses at small batch" in batch1.decisions[0].reason
  strict = export.Policy(min_sparsity=0.97, min_size=0)
  assert not any(
    d.sparse for d in export.SparseModel(model, exported, batch_size=64, policy=strict).decisions
  )


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(8, name="down")(nn.gelu(nn.Dense(32, name="up")(x)))


class Block(nn.Module):
  """A transformer-shaped block: attention-like projections (Dense on (batch, seq, d)), an
  MLP, a convolution and a DenseGeneral, nested two levels deep."""

  @nn.compact
  def __call__(self, x):
    h = nn.Conv(8, (3,), name="conv")(x)
    q = nn.Dense(8, name="query")(h)
    k = nn.Dense(8, use_bias=False, name="key")(h)
    a = jax.nn.softmax(q @ k.transpose(0, 2, 1), axis=-1) @ h
    h = h + nn.DenseGeneral((2, 4), name="out")(a).reshape(h.shape)
    return h + MLP(name="mlp")(h)


def test_dense_layers_anywhere_in_the_tree_run_sparse_and_others_stay_dense_with_a_note():
  model = Block()
  x = np.random.default_rng(2).standard_normal((4, 6, 8)).astype(np.float32)
  variables = jax.device_get(model.init(jax.random.key(1), x))
  pruned = magnitude_prune(variables, 0.8)
  exported = export.encode(pruned, {"class": "Block", "input_shape": [6, 8]})
  fast = export.SparseModel(model, exported, batch_size=24, policy=ALL)
  by_path = {d.path: d for d in fast.decisions}
  assert {p for p, d in by_path.items() if d.sparse} == {"query", "key", "mlp/up", "mlp/down"}
  assert "Conv layers run dense" in by_path["conv"].reason
  assert "DenseGeneral layers run dense" in by_path["out"].reason
  want = np.asarray(model.apply(pruned, x))
  np.testing.assert_allclose(np.asarray(fast(x)), want, rtol=1e-5, atol=1e-5)
  host = export.HostModel(model, exported, batch_size=1, policy=ALL)
  np.testing.assert_allclose(np.asarray(host(x)), want, rtol=1e-5, atol=1e-5)


def test_import_autosparse_jax_does_not_load_the_export_package():
  code = (
    "import sys, autosparse_jax; print(any(m.startswith('autosparse_jax.export') "
    "or m in ('flax', 'scipy') for m in sys.modules))"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S
  )
  assert out.stdout.strip() == "False", out.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# the command line over a workdir written by the training system


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  """A 10-step TopKAST run (90% forward sparsity) of the digits LeNet-300-100."""
  from autosparse_jax import train
  from tests.test_train import digits_config

  workdir = tmp_path_factory.mktemp("run")
  config = digits_config(method="topkast")
  config.sparsity.topkast.forward_sparsity = 0.9
  train.train_and_evaluate(config, str(workdir))
  return config, workdir


def run_cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, "-m", "autosparse_jax.export", *args],
    capture_output=True,
    text=True,
    timeout=SUBPROCESS_TIMEOUT_S,
    env=env,
  )


def test_cli_exports_a_workdir_that_reloads_bit_exactly_and_predicts_the_same(
  trained_workdir, tmp_path
):
  from autosparse_jax import train

  config, workdir = trained_workdir
  out = tmp_path / "model.npz"
  proc = run_cli(f"--workdir={workdir}", f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "params/fc1/kernel" in proc.stdout and f"wrote {out}" in proc.stdout

  state = train.load_checkpoint(config, str(workdir))
  saved = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
  model, exported = export.load_model(out)
  assert same_bits(exported.variables(), saved)
  assert exported.leaf(("params", "fc1", "kernel")).storage == "csr"
  assert exported.model["step"] == 10 and exported.model["input_shape"] == [8, 8, 1]

  from sklearn.datasets import load_digits

  pixels, labels = load_digits(return_X_y=True)  # the training system's test split: the last 359
  images = (pixels[-359:] / 16.0).reshape(-1, 8, 8, 1).astype(np.float32)
  want = np.asarray(model.apply(saved, images)).argmax(-1)
  for fast in (
    export.SparseModel(model, exported, batch_size=len(images), policy=ALL),
    export.HostModel(model, exported, batch_size=1, policy=ALL),
  ):
    np.testing.assert_array_equal(np.asarray(fast(images)).argmax(-1), want)


def test_cli_bad_input_is_one_line_and_exit_2(trained_workdir, tmp_path):
  _, workdir = trained_workdir
  existing = tmp_path / "existing.npz"
  existing.write_bytes(b"keep me")
  cases = {
    "no such directory": [f"--workdir={tmp_path / 'nope'}", f"--out={tmp_path / 'a.npz'}"],
    "not a training workdir": [f"--workdir={tmp_path}", f"--out={tmp_path / 'b.npz'}"],
    "exists; not overwriting": [f"--workdir={workdir}", f"--out={existing}"],
    "the following arguments are required: --out": [f"--workdir={workdir}"],
    "--step=5: no checkpoint at that step; there are [4, 8, 10]": [
      f"--workdir={workdir}",
      f"--out={tmp_path / 'c.npz'}",
      "--step=5",
    ],
  }
  for expected, args in cases.items():
    proc = run_cli(*args)
    assert proc.returncode == 2, (args, proc.stderr[-2000:])
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], proc.stderr[-2000:]
  assert existing.read_bytes() == b"keep me"
  assert not (tmp_path / "a.npz").exists() and not (tmp_path / "b.npz").exists()


def test_benchmark_smoke_run_writes_its_results(trained_workdir, tmp_path):
  out = tmp_path / "sparse_inference.json"
  flags = os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags.strip())
  proc = subprocess.run(
    [
      sys.executable,
      str(REPO / "benchmarks" / "sparse_inference.py"),
      "--smoke",
      "--out",
      str(out),
      f"--workdir={trained_workdir[1]}",
    ],
    capture_output=True,
    text=True,
    timeout=SUBPROCESS_TIMEOUT_S,
    env=env,
  )
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  payload = json.loads(out.read_text())
  assert payload["benchmark"] == "sparse_inference" and payload["smoke"] is True
  assert {"command", "date", "machine"} <= set(payload)
  for case in payload["results"]:
    assert case["bytes_on_disk"] < case["dense_bytes_on_disk"]
    for point in case["points"]:
      assert set(point["arms"]) == {"dense", "BCSR all", "BCSR auto", "scipy all"}
      for arm in point["arms"].values():
        assert arm["max_abs_diff"] < 1e-4 and arm["speedup"]["ratio"] > 0
  checks = payload["trained_checks"]
  assert checks["bit_exact_reload"] and checks["eval_examples"] == 359
  assert set(checks["same_labels_as_dense"].values()) == {1.0}
  assert payload["results"][0]["weights"] == "trained"
  assert out.with_suffix(".md").read_text().startswith("## Sparse inference")

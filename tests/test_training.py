"""A short real training run: AutoSparse must end clearly sparse at dense-level accuracy, and a
larger alpha0 must give a lower sparsity than alpha0 = 0 (STR): the trade-off GA exists for."""

import pytest
from digits_mlp import STEPS, train

import autosparse_jax as autosparse


def autosparse_method(alpha0):
  return autosparse.AutoSparse(
    alpha=autosparse.sigmoid_cosine_decay(alpha0, STEPS),
    threshold_init=-4.0,
    threshold_weight_decay=0.02,
  )


@pytest.fixture(scope="module")
def results():
  runs = {
    "dense": autosparse.Dense(),
    "str": autosparse_method(0.0),
    "autosparse": autosparse_method(0.9),
  }
  out = {}
  for name, method in runs.items():
    accuracy, params, _ = train(method)
    out[name] = accuracy, float(autosparse.sparsity(params).total)
  return out


def test_autosparse_is_sparse_at_dense_accuracy(results):
  dense_acc, _ = results["dense"]
  acc, sparsity = results["autosparse"]
  assert dense_acc > 0.95
  assert sparsity > 0.5
  assert acc >= dense_acc - 0.02


def test_larger_alpha0_gives_lower_sparsity(results):
  assert results["autosparse"][1] < results["str"][1] - 0.01

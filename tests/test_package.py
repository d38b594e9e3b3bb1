"""Packaging contract: the core import pulls in only jax, optax and numpy."""

import subprocess
import sys

HEAVY = ("flax", "tensorflow", "tensorflow_datasets", "orbax", "clu", "sklearn", "matplotlib")


def test_import_loads_only_jax_optax_numpy():
  code = f"import sys, autosparse_jax; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]", out.stdout


def test_public_api_names():
  import autosparse_jax as autosparse

  for name in (
    "optax_chain", "AutoSparse", "STR", "TopKAST", "GradualMagnitude", "Dense",
    "threshold_mask", "topk_mask", "gradient_annealing", "sigmoid_cosine_decay",
    "cosine_decay", "linear_decay", "constant", "kernels", "sparsity", "summary",
  ):  # fmt: skip
    assert hasattr(autosparse, name), name

"""Shared test helpers: small models, a gradient-recording base optimizer, data paths."""

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
import pytest


def shared_data_dir() -> Path:
  """``../shared/data`` beside the repository, or $AUTOSPARSE_SHARED_DATA."""
  env = os.environ.get("AUTOSPARSE_SHARED_DATA")
  return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def record_gradients() -> optax.GradientTransformation:
  """A base 'optimizer' whose state is the last gradient it saw and whose update is zero:
  it exposes exactly what the chain hands to the base optimizer."""

  def init(params):
    return jax.tree.map(jnp.zeros_like, params)

  def update(grads, state, params=None):
    del state, params
    return jax.tree.map(jnp.zeros_like, grads), grads

  return optax.GradientTransformation(init, update)


def mlp_params(key, sizes=(6, 5, 4), dtype=jnp.float32):
  params = {}
  keys = jax.random.split(key, len(sizes) - 1)
  for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
    params[f"dense{i}"] = {
      "kernel": (jax.random.normal(keys[i], (a, b)) * 0.5).astype(dtype),
      "bias": jnp.full((b,), 0.1, dtype),
    }
  return {"params": params}


def mlp_apply(params, x):
  p = params["params"]
  n = len(p)
  for i in range(n):
    x = x @ p[f"dense{i}"]["kernel"] + p[f"dense{i}"]["bias"]
    if i < n - 1:
      x = jnp.tanh(x)
  return x


def mlp_loss(params, x, y):
  return jnp.mean((mlp_apply(params, x) - y) ** 2)


@pytest.fixture
def batch():
  kx, ky = jax.random.split(jax.random.key(42))
  return jax.random.normal(kx, (8, 6)), jax.random.normal(ky, (8, 4))


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
  """A persistent compilation cache for one test module: runs that compile identical functions
  (e.g. a resume test's runs) compile once."""
  names = (
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
  )
  before = {n: getattr(jax.config, n) for n in names}
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  yield
  for name, value in before.items():
    jax.config.update(name, value)


@pytest.fixture(scope="session")
def subprocess_env(tmp_path_factory):
  """The environment of a training job in a subprocess (tests/fault_run.py): this checkout on
  the path, CPU, and one persistent compilation cache for the whole session, so that only the
  first job compiles."""
  cache = tmp_path_factory.mktemp("jax_cache_subprocess")
  return {
    **os.environ,
    "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
    "JAX_COMPILATION_CACHE_DIR": str(cache),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    "JAX_PLATFORMS": "cpu",
  }


@pytest.fixture(scope="session")
def reference(tmp_path_factory, subprocess_env):
  """The digits job of tests/fault_run.py run once, uninterrupted: (workdir, result)."""
  from fault_helpers import committed, result_of, run

  workdir = tmp_path_factory.mktemp("reference")
  (output,) = run(workdir, subprocess_env)
  assert committed(workdir) == [6, 9, 12]
  return workdir, result_of(output)


@pytest.fixture(params=["compared", "fused"])
def count_path(request, monkeypatch):
  """Runs a test twice: with counts by compare (the path of arrays that fit in cache, as the
  tests' small ones do) and by the fused arithmetic of large arrays, forced on every size."""
  from autosparse_jax import counting

  if request.param == "fused":
    monkeypatch.setattr(counting, "FUSED_MIN_SIZE", 0)
  jax.clear_caches()  # no trace made under the other path may be reused
  yield request.param
  jax.clear_caches()

"""Run by tests/test_train.py in its own process, with 8 fake CPU devices.

The digits MLP trained by ``train_and_evaluate`` on one device, data parallel over 8 and FSDP
over 8 must end with the same params, batch statistics and optimizer state (to float
tolerance: the reductions run in another order) and the same metrics; FSDP must actually shard
the params and the optimizer state that mirrors them.
"""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import importlib.util  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from autosparse_jax import train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def config(**overrides):
  spec = importlib.util.spec_from_file_location("default", REPO / "configs" / "default.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.model_kwargs = {"hidden": (256, 128)}  # kernels (64, 256), (256, 128), (128, 10)
  c.num_train_steps = 6
  c.log_every_steps = 3
  c.checkpoint_every_steps = 6
  c.eval_every_epochs = 10.0  # evaluate at the end only
  c.warmup_epochs = 0.1
  c.global_batch_size = 64
  c.eval_batch_size = 128
  c.fsdp_min_size = 0
  c.tensorboard = False
  for k, v in overrides.items():
    c[k] = v
  return c


def assert_trees_close(a, b, what):
  assert jax.tree.structure(a) == jax.tree.structure(b), what
  for (path, x), y in zip(
    jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b), strict=True
  ):
    np.testing.assert_allclose(
      np.asarray(x, np.float64),
      np.asarray(y, np.float64),
      rtol=2e-4,
      atol=2e-5,
      err_msg=f"{what}: {jax.tree_util.keystr(path)}",
    )


def main():
  assert jax.device_count() == 8, jax.devices()
  root = Path(tempfile.mkdtemp())
  runs = {
    "single": config(num_devices=1),
    "data": config(sharding="data"),
    "fsdp": config(sharding="fsdp"),
  }
  results, states = {}, {}
  for name, c in runs.items():
    results[name] = train.train_and_evaluate(c, str(root / name))
    # Restore every run onto one device, to compare values.
    states[name] = train.load_checkpoint(runs["single"], str(root / name))
    print(name, "trained", {k: results[name][k] for k in ("eval/accuracy", "sparsity/total")})

  for name in ("data", "fsdp"):
    assert results[name].keys() == results["single"].keys()
    for key, value in results["single"].items():
      np.testing.assert_allclose(results[name][key], value, rtol=1e-3, atol=1e-4, err_msg=key)
    assert_trees_close(states[name], states["single"], name)
    print(name, "matches the single-device run")

  # FSDP shards params and the optimizer state that mirrors them; thresholds stay replicated.
  fsdp_state = train.load_checkpoint(runs["fsdp"], str(root / "fsdp"))
  kernel = fsdp_state.params["fc2"]["kernel"]
  assert not kernel.sharding.is_fully_replicated, kernel.sharding
  assert kernel.addressable_shards[0].data.shape == (32, 128), kernel.addressable_shards[0]
  latent = fsdp_state.opt_state.latent.weights["fc2"]["kernel"]
  assert latent.sharding == kernel.sharding, (latent.sharding, kernel.sharding)
  threshold = fsdp_state.opt_state.latent.thresholds["fc2"]["kernel"]
  assert threshold.sharding.is_fully_replicated
  data_state = train.load_checkpoint(runs["data"], str(root / "data"))
  assert data_state.params["fc2"]["kernel"].sharding.is_fully_replicated
  print("ALL OK")


if __name__ == "__main__":
  sys.exit(main())

"""FSDP-sharded optimizer state on 8 fake CPU devices, in a separate process (the device-count
flag must be set before jax is imported, and it slows everything else down)."""

import subprocess
import sys
from pathlib import Path


def test_sharded_update_keeps_shardings_and_topk_stays_shard_local():
  script = Path(__file__).with_name("sharded_update_check.py")
  result = subprocess.run(
    [sys.executable, str(script)], capture_output=True, text=True, timeout=600
  )
  assert result.returncode == 0, result.stdout + result.stderr
  assert "ALL OK" in result.stdout


def test_sharded_nnx_optimizer_for_every_method():
  # The Flax Gemma example's shape: partitioned NNX kernels, nnx.Optimizer, nnx.jit, orbax.
  script = Path(__file__).with_name("nnx_sharded_check.py")
  result = subprocess.run(
    [sys.executable, str(script)], capture_output=True, text=True, timeout=1200
  )
  assert result.returncode == 0, result.stdout + result.stderr
  assert "ALL OK" in result.stdout

"""Every benchmark script runs with ``--smoke`` and writes the results it promises, so that the
benchmarks cannot rot. The scripts run concurrently (each is mostly XLA compilation) and the
``--render`` path re-reads what they wrote."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
HEAD_KEYS = {"command", "date", "machine", "benchmark", "smoke", "results"}
MACHINE_KEYS = {"cpu", "cores", "jax", "backend"}
TIMEOUT_S = 300
ARMS = {"AutoSparse", "TopKAST", "TopKAST+GA", "GradualMagnitude", "RigL", "RigL+GA"}

SCRIPTS = {
  "step_overhead": {"goal_ratio", "methods", "base_optimizer"},
  "optimizer_update": {"bandwidth", "params", "kernel_params", "methods"},
  "topk_search": {"sparsity"},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Starts every script at once; returns {name: (returncode, output, results JSON path)}."""
  out_dir = tmp_path_factory.mktemp("benchmarks")
  # Smoke runs check the scripts, not the speed: LLVM's optimisation level 0 halves XLA:CPU's
  # compile time, which is most of a smoke run.
  flags = os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags.strip())
  procs = {}
  for name in SCRIPTS:
    out = out_dir / f"{name}.json"
    cmd = [sys.executable, str(BENCHMARKS / f"{name}.py"), "--smoke", "--out", str(out)]
    procs[name] = (
      subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env),
      out,
    )
  done = {}
  for name, (proc, out) in procs.items():
    try:
      output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
      proc.kill()
      output, _ = proc.communicate()
    done[name] = (proc.returncode, output, out)
  return done


def _load_script(name):
  if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))  # the scripts import their sibling _common
  return importlib.import_module(name)


def _check_ratio(r):
  assert {"ratio", "ci95_lo", "ci95_hi", "paired_q1", "paired_q3", "rounds"} <= set(r)
  assert r["ratio"] > 0


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_smoke_run_writes_results(runs, name):
  code, output, out = runs[name]
  assert code == 0, output[-4000:]
  payload = json.loads(out.read_text())
  assert HEAD_KEYS | SCRIPTS[name] <= set(payload)
  assert MACHINE_KEYS <= set(payload["machine"])
  assert payload["benchmark"] == name and payload["smoke"] is True
  assert out.with_suffix(".md").read_text().startswith("## ")

  # --render recomputes the statistics from the stored raw timings and rewrites the same keys.
  module = _load_script(name)
  assert module.main(["--render", "--out", str(out)]) == 0
  assert json.loads(out.read_text()).keys() == payload.keys()

  if name == "step_overhead":
    (model,) = payload["results"]
    assert {"base", *ARMS} == set(model["arms"])
    for arm, entry in model["arms"].items():
      assert entry["step_s"]["median"] > 0
      if arm != "base":
        _check_ratio(entry["ratio_to_base"])
    assert model["arms"]["TopKAST"]["sparsity_after"] == pytest.approx(0.8, abs=0.01)
  elif name == "optimizer_update":
    assert payload["bandwidth"]["copy_GBps"]["median"] > 0
    results = payload["results"]
    assert {"base", "search", *ARMS} <= set(results)
    for arm, entry in results.items():
      _check_ratio(entry["ratio_to_base"])
      assert entry["bytes_model"]["total_bytes"] > 0
      if arm != "search":
        assert entry["state_bytes"] > 0 and entry["update_peak_bytes"] > 0
    # The chain keeps a latent copy of the params beside the base's momentum.
    assert results["AutoSparse"]["state_vs_base"] == pytest.approx(2.0, rel=0.01)
  else:
    for case in payload["results"]:
      assert {"cutoffs+mask", "lax.top_k", "sort threshold"} == set(case["methods"])
      exact = case["methods"]["cutoffs+mask"]
      assert exact["identical_to_oracle"] and exact["count_equals_k"]
      assert case["methods"]["lax.top_k"]["identical_to_oracle"]


def test_mnist_sparsity_accuracy_smoke(tmp_path):
  out = tmp_path / "mnist.json"
  cmd = [
    sys.executable,
    str(BENCHMARKS / "mnist_sparsity_accuracy.py"),
    "--smoke",
    "--out",
    str(out),
  ]
  result = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
  payload = json.loads(out.read_text())
  assert {"meta", "table", "runs"} <= set(payload)
  methods = {row["method"] for row in payload["table"]}
  assert methods == {"dense", "autosparse"}
  assert all(0.0 <= row["sparsity_mean"] <= 1.0 for row in payload["table"])
  assert out.with_suffix(".png").stat().st_size > 0
  assert not out.with_suffix(".runs.jsonl").exists()  # the partial log is folded into the JSON


def test_device_suite_smoke(tmp_path):
  """The device suite runs each of its scripts in smoke mode and records every part."""
  out_dir = tmp_path / "device"
  cmd = [sys.executable, str(BENCHMARKS / "device_suite.py"), "--smoke", "--out-dir", str(out_dir)]
  flags = os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags.strip())
  result = subprocess.run(cmd, capture_output=True, text=True, timeout=3 * TIMEOUT_S, env=env)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  payload = json.loads((out_dir / "device_suite.json").read_text())
  parts = payload["parts"]
  assert set(parts) == {
    "step_overhead_resnet50",
    "step_overhead_transformers",
    "optimizer_update",
    "mnist_lenet5",
  }
  ran = {n for n, p in parts.items() if p["status"] == "ok"}
  assert ran == {"step_overhead_resnet50", "optimizer_update", "mnist_lenet5"}
  update = json.loads((out_dir / "optimizer_update.json").read_text())["results"]
  assert update["TopKAST"]["bytes_model"]["search_passes"] > 0
  assert update["AutoSparse"]["state_bytes_per_param"] > 0
  step = json.loads((out_dir / "step_overhead_resnet50.json").read_text())["results"][0]
  assert step["dtype"] == "bfloat16"
  assert step["arms"]["TopKAST+GA"]["topk_passes_last_step"] > 0
  assert (out_dir / "mnist_lenet5.md").exists()

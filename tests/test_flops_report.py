"""FLOP logging, the summary's cost lines and plots, and ``python -m autosparse_jax.train.report``
(issue 4), on the digits default for a few steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("orbax.checkpoint")

from autosparse_jax import flops, train  # noqa: E402
from autosparse_jax.train import logs, plots  # noqa: E402
from autosparse_jax.train import summary as run_summary  # noqa: E402

pytestmark = pytest.mark.usefixtures("compilation_cache")

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("fc1/kernel", "fc2/kernel", "head/kernel")
DENSE_MACS = np.array([64 * 300, 300 * 100, 100 * 10], np.float64)  # one example


def digits_config(num_train_steps: int):
  """The digits default (configs/default.py), logging every 2 steps, checkpoints every 4."""
  from autosparse_jax.train import recipes

  config = recipes.digits_default()
  config.num_train_steps = num_train_steps
  config.log_every_steps = 2
  config.checkpoint_every_steps = 4
  config.eval_every_epochs = 0.2
  config.warmup_epochs = 0.1
  config.tensorboard = False
  return config


def expected_ratios(records, method, backward_sparsity=None):
  """An independent numpy re-derivation from the logged per-layer sparsities."""
  inference, training = [], []
  cost = steps = prev = 0
  for r in records:
    d = np.array([1.0 - r[f"sparsity/{k}"] for k in LAYERS])
    inference.append(float(d @ DENSE_MACS / DENSE_MACS.sum()))
    alpha = r.get("alpha", 0.0)
    if method == "dense":
      fwd, wg = np.ones(3), np.ones(3)
    elif method in ("autosparse", "topkast_ga") and alpha > 0:
      fwd, wg = d, np.ones(3)
    elif method == "topkast":
      fwd, wg = d, np.full(3, 1.0 - backward_sparsity)
    else:
      fwd, wg = d, d
    n = r["step"] - prev
    prev = r["step"]
    cost += n * float(DENSE_MACS @ (2 * fwd + wg))
    steps += n
    training.append(cost / (steps * 3 * DENSE_MACS.sum()))
  return inference, training


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("flops_run")
  # alpha_zero_at=6: alpha_t > 0 (dense weight gradient) for the first records, 0 after.
  config = digits_config(num_train_steps=8)
  config.sparsity.autosparse.alpha_zero_at = 6
  result = train.train_and_evaluate(config, str(workdir))
  return config, workdir, result


def test_logged_ratios_match_a_hand_computation(run):
  _, workdir, result = run
  records = [r for r in logs.read_jsonl(workdir / logs.METRICS_FILE) if "sparsity/total" in r]
  assert [r["step"] for r in records] == [2, 4, 6, 8]
  assert records[0]["alpha"] > 0 and records[-1]["alpha"] == 0
  inference, training = expected_ratios(records, "autosparse")
  assert [r["flops/inference_ratio"] for r in records] == pytest.approx(inference, rel=1e-9)
  assert [r["flops/training_ratio"] for r in records] == pytest.approx(training, rel=1e-9)
  assert 0 < records[-1]["flops/inference_ratio"] < 1
  summary = json.loads((workdir / run_summary.SUMMARY_JSON).read_text())
  assert summary["training_cost"]["ratio"] == pytest.approx(training[-1])
  assert result["training_cost/ratio"] == pytest.approx(training[-1])
  layer = summary["sparsity"]["layers"]["fc2/kernel"]
  assert layer["sparse_macs"] == pytest.approx((1 - layer["sparsity"]) * 300 * 100)
  text = (workdir / run_summary.SUMMARY_TXT).read_text()
  for word in ("params", "dense MACs", "sparse MACs", "sparsity", "training cost", "total"):
    assert word in text, word


@pytest.mark.parametrize(
  "method, kwargs",
  [("dense", {}), ("str", {}), ("gmp", {}), ("topkast", {"backward_sparsity": 0.3})],
)
def test_running_cost_weight_gradient_rule(method, kwargs):
  macs = dict(zip(LAYERS, DENSE_MACS.astype(int).tolist(), strict=True))
  records = [
    {
      "step": 3,
      "alpha": 0.4,
      **{f"sparsity/{k}": s for k, s in zip(LAYERS, (0.5, 0.6, 0.1), strict=True)},
    },
    {
      "step": 5,
      "alpha": 0.0,
      **{f"sparsity/{k}": s for k, s in zip(LAYERS, (0.8, 0.9, 0.2), strict=True)},
    },
  ]
  records = [{**r, "sparsity/total": 0.5} for r in records]
  meter = flops.RunningTrainingCost(macs, method, kwargs.get("backward_sparsity"))
  meter.replay(records)
  _, training = expected_ratios(records, method, kwargs.get("backward_sparsity"))
  assert meter.ratio == pytest.approx(training[-1], rel=1e-12)
  if method == "dense":
    assert meter.ratio == 1.0


def test_plots_are_written(run):
  _, workdir, _ = run
  for name in (plots.SPARSITY_PLOT, plots.CURVES_PLOT):
    data = (workdir / name).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, name


def _report_cli(*args, cwd=REPO):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run(
    [sys.executable, "-m", "autosparse_jax.train.report", *args],
    capture_output=True,
    text=True,
    cwd=cwd,
    env=env,
    timeout=600,
  )


def test_report_command_prints_the_table(run):
  _, workdir, _ = run
  out = _report_cli(f"--workdir={workdir}", "--step=4")
  assert out.returncode == 0, out.stderr
  text = out.stdout
  for word in ("fc1/kernel", "head/kernel", "dense MACs", "sparse MACs", "tau", "total"):
    assert word in text, word
  assert "inference MACs" in text and "inference FLOPs" in text and "2 x MACs" in text
  records = [r for r in logs.read_jsonl(workdir / logs.METRICS_FILE) if "sparsity/total" in r]
  at4 = next(r for r in records if r["step"] == 4)
  assert f"{at4['flops/training_ratio']:.4f} of dense training" in text
  assert "steps 1-4" in text


def test_report_command_refuses_a_workdir_without_checkpoints(run, tmp_path):
  _, workdir, _ = run
  (tmp_path / "config.json").write_text((workdir / "config.json").read_text())
  before = sorted(p.name for p in tmp_path.iterdir())
  out = _report_cli(f"--workdir={tmp_path}")
  assert out.returncode == 2
  assert "no checkpoint" in out.stderr and str(tmp_path) in out.stderr
  assert sorted(p.name for p in tmp_path.iterdir()) == before
  (tmp_path / "config.json").unlink()
  out = _report_cli(f"--workdir={tmp_path}")
  assert out.returncode == 2 and "config.json" in out.stderr
  out = _report_cli(f"--workdir={tmp_path / 'missing'}")
  assert out.returncode == 2 and "no such directory" in out.stderr

"""The training system end to end: train_and_evaluate, resume, configs, bad fields, writers.

Small on purpose (XLA:CPU compiles slowly): the digits MLP for the loop and resume tests, the
tiny variants of the CIFAR-10 and ImageNet configs on ``tfds.testing.mock_data`` at 32x32
with batch 8 for three steps. A persistent compilation cache shared by this module lets the
runs that compile the same functions (resume, repeated configs) compile once. The sharded
runs (8 fake CPU devices) are in ``tests/train_sharded_check.py``, run in a subprocess.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

pytest.importorskip("flax")
pytest.importorskip("orbax.checkpoint")

from autosparse_jax import train  # noqa: E402
from autosparse_jax.train import config_lib, logs, optim  # noqa: E402
from autosparse_jax.train import summary as run_summary  # noqa: E402

pytestmark = pytest.mark.usefixtures("compilation_cache")


def load_config(name: str, variant: str | None = None):
  """``configs/<name>.py`` -> get_config(variant), as ``--config=configs/<name>.py:variant``."""
  spec = importlib.util.spec_from_file_location(f"config_{name}", CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant) if variant else module.get_config()


def digits_config(**overrides):
  config = load_config("default")
  config.num_train_steps = 10
  config.log_every_steps = 2
  config.checkpoint_every_steps = 4
  config.eval_every_epochs = 0.2  # 22 steps per epoch: evaluation every 4 steps and at 10
  config.warmup_epochs = 0.1
  for key, value in overrides.items():
    config[key] = value
  return config


def set_fields(config, overrides):
  """``{"a.b": v}`` -> ``config.a.b = v`` (as ``--config.a.b=v`` does)."""
  for key, value in overrides.items():
    node = config
    *parents, last = key.split(".")
    for p in parents:
      node = node[p]
    node[last] = value


def strip_timing(records):
  return [{k: v for k, v in r.items() if k not in logs.TIMING_KEYS} for r in records]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  config = digits_config()
  result = train.train_and_evaluate(config, str(workdir))
  return config, workdir, result


# ---------------------------------------------------------------------------------------------
# end to end on digits


def test_digits_run_writes_metrics_summary_and_checkpoints(uninterrupted):
  config, workdir, result = uninterrupted
  assert result["step"] == 10
  for key in ("eval/accuracy", "eval/loss", "train/loss", "sparsity/total", "alpha"):
    assert np.isfinite(result[key]), key
  assert result["eval/accuracy"] > 0.3  # 10 steps from chance (0.1)
  assert {"sparsity/fc1/kernel", "tau/fc1/kernel", "sparsity/head/kernel"} <= set(result)

  records = logs.read_jsonl(workdir / logs.METRICS_FILE)
  train_records = [r for r in records if "train/loss" in r]
  eval_records = [r for r in records if "eval/accuracy" in r]
  assert [r["step"] for r in train_records] == [2, 4, 6, 8, 10]
  assert [r["step"] for r in eval_records] == [4, 8, 10]
  for key in (
    "train/accuracy",
    "train/learning_rate",
    "alpha",
    "sparsity/total",
    "sparsity/fc2/kernel",
    "tau/fc2/kernel",
    "train/steps_per_sec",
  ):
    assert key in train_records[-1], key
  # Warmup then cosine: the rate rises over the first 2 steps, then decays to ~0 at the end.
  rates = [r["train/learning_rate"] for r in train_records]
  assert rates[-1] < rates[1] and rates[-1] < 0.01

  summary = json.loads((workdir / run_summary.SUMMARY_JSON).read_text())
  assert summary["experiment"]["method"] == "autosparse"
  assert summary["eval"]["accuracy"] == pytest.approx(result["eval/accuracy"])
  layers = summary["sparsity"]["layers"]
  assert set(layers) == {"fc1/kernel", "fc2/kernel", "head/kernel"}
  assert layers["fc1/kernel"]["size"] == 64 * 300
  assert summary["sparsity"]["total"] == pytest.approx(result["sparsity/total"], abs=1e-6)
  macs = summary["inference_macs"]
  assert macs["dense"] == 64 * 300 + 300 * 100 + 100 * 10  # one example through the MLP
  assert macs["ratio"] == pytest.approx(result["inference_macs/ratio"])
  assert 0 < macs["ratio"] < 1 and layers["fc2/kernel"]["macs"] == 300 * 100
  text = (workdir / run_summary.SUMMARY_TXT).read_text()
  assert "fc2/kernel" in text and "eval accuracy" in text and "inference MACs" in text
  assert (workdir / "config.json").exists() and (workdir / "parameter_overview.txt").exists()
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
    "10",
    "4",
    "8",
  ]

  # TensorBoard reads the event file (pure-Python tensorboard, no TensorFlow).
  pytest.importorskip("tensorboard")
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

  events = EventAccumulator(str(workdir))
  events.Reload()
  assert [e.step for e in events.Scalars("eval/accuracy")] == [4, 8, 10]
  assert "tau/fc1/kernel" in events.Tags()["scalars"]


def test_params_are_the_sparse_weights_in_the_checkpoint(uninterrupted):
  config, workdir, result = uninterrupted
  state = train.load_checkpoint(config, str(workdir))
  assert int(state.step) == 10
  kernel = np.asarray(state.params["fc2"]["kernel"])
  assert np.mean(kernel == 0) == pytest.approx(result["sparsity/fc2/kernel"], abs=1e-6)
  latent = np.asarray(state.opt_state.latent.weights["fc2"]["kernel"])
  assert np.all(latent[kernel != 0] != 0) and np.any(latent[kernel == 0] != 0)


# ---------------------------------------------------------------------------------------------
# resume


def test_killed_run_resumes_bitwise_identical(uninterrupted, tmp_path):
  config, reference_dir, reference = uninterrupted
  workdir = tmp_path / "run"
  partial = train.train_and_evaluate(config, str(workdir), stop_at_step=6)
  assert partial["train/loss"] > 0
  # The last checkpoint is step 4: the records of steps 5-6 are rewritten on resume.
  assert max(r["step"] for r in logs.read_jsonl(workdir / logs.METRICS_FILE)) == 6
  resumed = train.train_and_evaluate(config, str(workdir))
  assert resumed == reference

  ours = strip_timing(logs.read_jsonl(workdir / logs.METRICS_FILE))
  theirs = strip_timing(logs.read_jsonl(reference_dir / logs.METRICS_FILE))
  assert ours == theirs

  a = train.load_checkpoint(config, str(workdir))
  b = train.load_checkpoint(config, str(reference_dir))
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_finished_run_is_not_retrained(uninterrupted):
  config, workdir, reference = uninterrupted
  before = (workdir / logs.METRICS_FILE).read_text()
  again = train.train_and_evaluate(config, str(workdir))
  assert again["eval/accuracy"] == reference["eval/accuracy"]
  assert again["sparsity/total"] == reference["sparsity/total"]
  assert (workdir / logs.METRICS_FILE).read_text() == before


def test_workdir_of_another_run_is_refused(uninterrupted):
  config, workdir, _ = uninterrupted
  before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*")}
  with pytest.raises(ValueError, match="config.model_kwargs"):
    train.train_and_evaluate(digits_config(model_kwargs={"hidden": (32, 16)}), str(workdir))
  assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*")} == before


# ---------------------------------------------------------------------------------------------
# bad configs: ValueError naming the field, nothing compiled or written


@pytest.mark.parametrize(
  "overrides, field",
  [
    ({"model": "resnet1000"}, "config.model"),
    ({"dataset": "svhn"}, "config.dataset"),
    ({"method": "lottery"}, "config.method"),
    ({"optimizer": "rmsprop"}, "config.optimizer"),
    ({"sharding": "tensor"}, "config.sharding"),
    ({"num_devices": 4096}, "config.num_devices"),
    ({"global_batch_size": 0}, "config.global_batch_size"),
    ({"label_smoothing": 1.5}, "config.label_smoothing"),
    ({"warmup_epochs": 5.0}, "config.warmup_epochs"),
    ({"model_kwargs": {"no_such_field": 1}}, "config.model_kwargs"),
    ({"method": "topkast", "sparsity.topkast.forward_sparsity": 1.5}, "config.sparsity.topkast"),
    ({"sparsity.autosparse.alpha0": 2.0}, "config.sparsity.autosparse"),
    ({"sparsity.autosparse.alpha_schedule": "step"}, "config.sparsity.autosparse.alpha_schedule"),
    ({"sparsity.autosparse.granularity": "row"}, "config.sparsity.autosparse.granularity"),
    ({"method": "str", "sparsity.str.weight_decay": -1.0}, "config.sparsity.str.weight_decay"),
    ({"sparsity.exclude": ("kernel",)}, "config.sparsity.exclude"),
  ],
)
def test_bad_config_field_raises_before_anything_is_written(overrides, field, tmp_path):
  config = digits_config()
  set_fields(config, overrides)
  workdir = tmp_path / "w"
  with pytest.raises(ValueError) as info:
    train.train_and_evaluate(config, str(workdir))
  assert field in str(info.value)
  assert not workdir.exists()


def test_unknown_field_is_refused():
  config = digits_config()
  config.learnig_rate = 0.3
  with pytest.raises(ValueError, match="config.learnig_rate: unknown field"):
    config_lib.validate(config, device_count=1)
  config = digits_config()
  config.sparsity.autosparse.alpha_0 = 0.3
  with pytest.raises(ValueError, match="config.sparsity.autosparse.alpha_0: unknown field"):
    config_lib.validate(config, device_count=1)


def test_batch_must_divide_over_devices():
  config = digits_config(global_batch_size=60)
  with pytest.raises(ValueError, match="config.global_batch_size=60"):
    config_lib.validate(config, device_count=8)
  with pytest.raises(ValueError, match="config.eval_batch_size"):
    config_lib.validate(digits_config(eval_batch_size=100), device_count=8)
  with pytest.raises(ValueError, match="processes"):
    config_lib.validate(digits_config(global_batch_size=64), device_count=1, process_count=3)


def test_cli_reports_bad_field_and_writes_nothing(tmp_path):
  workdir = tmp_path / "cli"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "autosparse_jax.train",
      f"--config={CONFIGS / 'default.py'}",
      f"--workdir={workdir}",
      "--config.method=lottery",
    ],
    capture_output=True,
    text=True,
    timeout=120,
    cwd=REPO,
  )
  assert proc.returncode != 0
  assert "config.method='lottery'" in proc.stderr
  assert not workdir.exists()


def test_missing_imagenet_says_how_to_prepare_it_and_writes_nothing(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  from autosparse_jax import data

  config = load_config("imagenet_resnet50", "tiny")
  config.data_dir = str(tmp_path / "tfds")
  workdir = tmp_path / "w"
  with pytest.raises(data.DatasetUnavailableError) as info:
    train.train_and_evaluate(config, str(workdir))
  for words in ("config.data_dir=", "ILSVRC2012_img_train.tar", "tfds build imagenet2012"):
    assert words in str(info.value)
  assert not workdir.exists()


# ---------------------------------------------------------------------------------------------
# config files


ALL_CONFIGS = [
  ("default", None),
  ("mnist_lenet300", None),
  ("mnist_lenet5", None),
  ("cifar10_resnet20", None),
  ("cifar10_resnet20", "tiny"),
  ("imagenet_resnet50", None),
  ("imagenet_resnet50", "tiny"),
  ("imagenet_mobilenet_v1", None),
  ("imagenet_mobilenet_v1", "tiny"),
]


@pytest.mark.parametrize("name, variant", ALL_CONFIGS)
def test_every_config_and_method_builds(name, variant):
  config = load_config(name, variant)
  config_lib.validate(config, device_count=1)
  assert config.method == ("autosparse")
  for method in config_lib.METHODS:
    config.method = method
    config_lib.validate(config, device_count=1)
    opt = optim.make_optimizer(config, steps_per_epoch=100, total_steps=10_000)
    assert opt.tx is not None
  if variant is None and name.startswith("imagenet"):
    assert config.half_precision and config.global_batch_size == 1024
    assert optim.peak_learning_rate(config) == pytest.approx(1.024)
    assert config.label_smoothing == 0.1 and config.momentum == 0.875
    assert config.warmup_epochs == 5 and config.num_epochs == 100


def test_weight_decay_reaches_kernels_and_thresholds_not_norms():
  import optax

  import autosparse_jax as autosparse

  config = digits_config(learning_rate=0.1, momentum=0.0, warmup_epochs=0.0, lr_schedule="constant")
  config.sparsity.autosparse.threshold_weight_decay = 0.0
  config.sparsity.autosparse.threshold_init = -3.0
  opt = optim.make_optimizer(config, steps_per_epoch=10, total_steps=100)
  params = {
    "fc": {"kernel": jax.numpy.full((4, 3), 0.5)},
    "bn": {"scale": jax.numpy.ones(3), "bias": jax.numpy.full(3, 0.5)},
  }
  state = opt.tx.init(params)
  zeros = jax.tree.map(jax.numpy.zeros_like, params)
  updates, state = opt.tx.update(zeros, state, params)
  new = optax.apply_updates(params, updates)
  wd = config.weight_decay
  latent = state.latent
  np.testing.assert_allclose(latent.weights["fc"]["kernel"], 0.5 * (1 - 0.1 * wd), rtol=1e-6)
  np.testing.assert_allclose(latent.thresholds["fc"]["kernel"], -3.0 * (1 - 0.1 * wd), rtol=1e-6)
  np.testing.assert_array_equal(new["bn"]["scale"], 1.0)
  np.testing.assert_array_equal(new["bn"]["bias"], 0.5)
  assert autosparse.find_state(state) is not None
  # decay_thresholds=False: the thresholds get the same optimizer without weight decay.
  config.sparsity.autosparse.decay_thresholds = False
  opt = optim.make_optimizer(config, steps_per_epoch=10, total_steps=100)
  _, state = opt.tx.update(zeros, opt.tx.init(params), params)
  np.testing.assert_allclose(state.latent.thresholds["fc"]["kernel"], -3.0)


def test_sparsity_and_flop_targets_build():
  config = digits_config()
  config.sparsity.autosparse.target_flops_ratio = 1 / 7
  with pytest.raises(ValueError, match="config.sparsity.autosparse: dense_macs"):
    optim.make_optimizer(config, steps_per_epoch=10, total_steps=100)
  macs = {"fc1/kernel": 19200, "fc2/kernel": 30000, "head/kernel": 1000}
  method = optim.make_optimizer(config, 10, 100, dense_macs=macs).method
  assert method.target_flops_ratio == pytest.approx(1 / 7) and method.target_ramp is not None
  config = digits_config()
  config.method = "str"
  config.sparsity.str.target_sparsity = 0.9
  method = optim.make_optimizer(config, 10, 100).method
  assert method.target_sparsity == 0.9 and float(method.target_ramp(50)) == 1.0


def test_alpha_schedule_defaults_to_the_run_length():
  config = digits_config()
  method = optim.sparsity_method(config, total_steps=1000)
  alpha = method.alpha
  assert float(alpha(0)) == pytest.approx(0.5)
  assert float(alpha(500)) == pytest.approx(0.25, abs=1e-6)  # sigmoid-cosine at T/2
  assert float(alpha(899)) > 0 and float(alpha(900)) == 0.0  # zero at 90%


# ---------------------------------------------------------------------------------------------
# tfds mock data: the CIFAR-10 and ImageNet configs' tiny variants


@pytest.fixture
def fast_compiling_rng():
  """The ``rbg`` PRNG: XLA:CPU compiles a model's init 2-3x faster than with threefry (the
  values differ, which these smoke tests do not look at)."""
  before = jax.config.jax_default_prng_impl
  jax.config.update("jax_default_prng_impl", "rbg")
  yield
  jax.config.update("jax_default_prng_impl", before)


@pytest.mark.parametrize(
  "name, overrides",
  [
    ("cifar10_resnet20", {"method": "autosparse"}),
    # Two of the four stages keep the compile short; bfloat16 compute as on a TPU.
    (
      "imagenet_resnet50",
      {"method": "dense", "half_precision": True, "model_kwargs.stage_sizes": (1, 1)},
    ),
    ("imagenet_mobilenet_v1", {"method": "gmp", "sparsity.gmp.frequency": 1}),
  ],
)
def test_tiny_variants_on_mock_data(name, overrides, tmp_path, fast_compiling_rng):
  tfds = pytest.importorskip("tensorflow_datasets")
  config = load_config(name, "tiny")
  config.global_batch_size = 8
  config.eval_batch_size = 8
  config.num_train_steps = 3
  config.num_eval_steps = 2
  config.log_every_steps = 3
  if name.startswith("imagenet"):
    config.image_size = 32
  set_fields(config, overrides)
  with tfds.testing.mock_data(num_examples=24):
    result = train.train_and_evaluate(config, str(tmp_path))
  assert result["step"] == 3 and np.isfinite(result["eval/loss"])
  assert result["eval/examples"] == 16
  summary = json.loads((tmp_path / run_summary.SUMMARY_JSON).read_text())
  assert summary["experiment"]["model"] == config.model
  assert summary["experiment"]["half_precision"] == config.half_precision
  assert len(summary["sparsity"]["layers"]) > 5
  if config.method == "dense":
    assert summary["sparsity"]["total"] == 0.0
  if config.method == "gmp":  # 3 steps of the cubic ramp from 10% to 75% of 3 steps
    assert summary["sparsity"]["total"] == pytest.approx(0.75, abs=0.01)


def test_fixed_budget_method_on_digits(tmp_path):
  config = digits_config(method="topkast_ga", num_train_steps=4, eval_every_epochs=1.0)
  result = train.train_and_evaluate(config, str(tmp_path))
  for layer in ("fc1", "fc2", "head"):
    assert result[f"sparsity/{layer}/kernel"] == pytest.approx(0.8, abs=1e-3)
  alphas = [r["alpha"] for r in logs.read_jsonl(tmp_path / logs.METRICS_FILE) if "alpha" in r]
  assert 0 < alphas[0] <= 0.5 and alphas[-1] == 0.0  # annealed, 0 from 90% of the run


# ---------------------------------------------------------------------------------------------
# sharded runs (8 fake CPU devices, in a subprocess)


def test_sharded_runs_match_single_device():
  script = Path(__file__).with_name("train_sharded_check.py")
  result = subprocess.run(
    [sys.executable, str(script)],
    capture_output=True,
    text=True,
    timeout=600,
    cwd=REPO,
    env={**os.environ, "PYTHONPATH": str(REPO)},
  )
  assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
  assert "ALL OK" in result.stdout


# ---------------------------------------------------------------------------------------------
# writers


def test_jsonl_writer_rewinds_on_resume(tmp_path):
  path = tmp_path / "metrics.jsonl"
  writer = logs.JsonlWriter(path)
  for step in (1, 2, 3, 4):
    writer.write_scalars(step, {"x": step})
  writer.close()
  with open(path, "a") as f:
    f.write('{"step": 5, "x"')  # torn by a kill
  writer = logs.JsonlWriter(path, resume_step=2)
  writer.write_scalars(3, {"x": 30.0})
  writer.close()
  assert [(r["step"], r["x"]) for r in logs.read_jsonl(path)] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_progress_and_console(caplog):
  progress = logs.Progress(total_steps=100)
  progress.mark(1)
  out = progress.update(51)
  assert out["train/steps_per_sec"] > 0 and out["train/eta_seconds"] >= 0
  assert "51/100" in progress.line(51, out) and "ETA" in progress.line(51, out)
  assert logs.format_duration(3725) == "1h02m05s" and logs.format_duration(65) == "1m05s"
  assert logs.is_per_layer("sparsity/fc1/kernel") and not logs.is_per_layer("sparsity/total")


def test_comparison_table():
  results = {
    "dense": {"eval/accuracy": 0.95, "sparsity/total": 0.0, "sparsity/fc1/kernel": 0.0},
    "autosparse": {
      "eval/accuracy": 0.94,
      "sparsity/total": 0.9,
      "sparsity/fc1/kernel": 0.85,
      "inference_macs/ratio": 0.1,
    },
  }
  table = run_summary.format_comparison(results, {"dense": 1.0, "autosparse": 2.0})
  lines = table.splitlines()
  assert lines[0].split() == ["dense", "autosparse"]
  assert lines[1].split()[-2:] == ["95.00%", "94.00%"]
  assert "90.00%" in lines[2] and "10.00%" in lines[3] and "-" in lines[3]
  assert "fc1/kernel" in table and "85.00%" in table

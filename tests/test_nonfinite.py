"""A NaN/Inf loss or gradient skips the step and is counted; nothing is corrupted."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import autosparse_jax as autosparse
from autosparse_jax import train
from autosparse_jax.models import get_model
from autosparse_jax.train import checkpoint, config_lib, logs, sharding


def test_nonfinite_step_is_skipped_and_counted():
  model = get_model("lenet_300_100", 10, hidden=(16,))
  tx = autosparse.optax_chain(optax.sgd(0.1), autosparse.AutoSparse(0.5, threshold_init=-3.0))
  state = train.create_train_state(jax.random.key(0), model, tx, (8, 8, 1))
  step = jax.jit(
    functools.partial(
      train.train_step,
      apply_fn=model.apply,
      tx=tx,
      learning_rate_fn=lambda s: 0.1,
      num_classes=10,
    )
  )
  good = {"image": jnp.ones((4, 8, 8, 1)), "label": jnp.arange(4)}
  bad = {"image": good["image"].at[0, 0, 0, 0].set(jnp.nan), "label": good["label"]}

  after_bad, _ = step(state, bad)
  assert int(after_bad.step) == 1
  assert int(after_bad.nonfinite_in_a_row) == 1 and int(after_bad.nonfinite_total) == 1
  for a, b in zip(
    jax.tree.leaves((after_bad.params, after_bad.batch_stats, after_bad.opt_state)),
    jax.tree.leaves((state.params, state.batch_stats, state.opt_state)),
    strict=True,
  ):
    np.testing.assert_array_equal(a, b)

  after_two, _ = step(after_bad, bad)
  assert int(after_two.nonfinite_in_a_row) == 2
  recovered, _ = step(after_two, good)
  assert int(recovered.nonfinite_in_a_row) == 0 and int(recovered.nonfinite_total) == 2
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(recovered.params))
  changed = [
    bool(jnp.any(a != b))
    for a, b in zip(jax.tree.leaves(recovered.params), jax.tree.leaves(state.params), strict=True)
  ]
  assert any(changed)  # the finite step did update


def test_max_consecutive_nonfinite_is_validated():
  config = config_lib.base_config()
  config.max_consecutive_nonfinite = 0
  with pytest.raises(ValueError, match="max_consecutive_nonfinite"):
    config_lib.validate(config, device_count=1)


def test_run_of_nonfinite_steps_stops_with_a_clear_error_and_finite_checkpoints(tmp_path):
  # A learning rate of 1e30 blows the first update up; every later loss is NaN/Inf.
  from fault_run import config as digits_config

  config = digits_config(learning_rate=1e30, warmup_epochs=0.0, max_consecutive_nonfinite=3)
  config.num_train_steps = 30
  with pytest.raises(FloatingPointError, match="config.max_consecutive_nonfinite = 3"):
    train.train_and_evaluate(config, str(tmp_path))
  records = [r for r in logs.read_jsonl(tmp_path / logs.METRICS_FILE) if "train/loss" in r]
  skipped = [r["train/nonfinite_skipped"] for r in records]
  assert skipped[-1] >= 3 and skipped == sorted(skipped)  # counted and logged every log step
  assert records[-1]["step"] < 30
  # Every checkpoint holds finite values only (the skipped steps changed nothing).
  ckpt = checkpoint.Checkpointer(tmp_path, 1, 10)
  exp = train.build_experiment(config)
  target = sharding.with_shardings(exp.abstract_state, exp.state_shardings)
  steps = ckpt.manager.all_steps()
  assert steps
  for step in steps:
    state, _ = ckpt.restore(step, target)
    for leaf in jax.tree.leaves(state):
      assert np.all(np.isfinite(np.asarray(leaf, np.float64))), step
  ckpt.close()

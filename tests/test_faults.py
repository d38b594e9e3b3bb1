"""Faults performed for real: SIGKILL and SIGTERM at several points of a training run (a save in
flight and a save about to commit among them), unreadable checkpoints, and a 2-process
``jax.distributed`` run. Each run is ``tests/fault_run.py`` in its own process; the runs share
a persistent compilation cache, so only the first one compiles.
"""

from __future__ import annotations

import logging
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fault_helpers import assert_same_run, committed, result_of, resumed_from, run

from autosparse_jax.train import checkpoint


@pytest.fixture(scope="module")
def env(subprocess_env):
  return subprocess_env


# ---------------------------------------------------------------------------------------------
# preemption


def test_killed_anywhere_resumes_bitwise_identical(reference, env, tmp_path):
  ref_dir, ref_result = reference
  workdir = tmp_path / "run"
  # Killed before anything was saved, then while step 3 was being committed (its files all
  # written), then with the save of step 6 in flight, then between checkpoints.
  run(workdir, env, "--kill-before-save", "2", rc=-9)
  run(workdir, env, "--kill-at-commit", "3", rc=-9)
  assert 3 not in committed(workdir)
  assert any(p.name.startswith("3.") for p in (workdir / "checkpoints").iterdir())  # the torso
  (output,) = run(workdir, env, "--kill-during-save", "6", rc=-9)
  assert re.search(r"checkpoint \S+/3 was never completed", output)
  run(workdir, env, "--kill-before-save", "8", rc=-9)
  # SIGTERM: the run saves the step it is at and exits 143 (128 + SIGTERM), as schedulers expect.
  (output,) = run(workdir, env, "--sigterm-after", "10", rc=143)
  assert "preempted at step 10" in output
  assert 10 in committed(workdir)
  (output,) = run(workdir, env)
  assert resumed_from(output) == 10
  assert result_of(output) == ref_result
  assert_same_run(workdir, ref_dir)


def test_unreadable_latest_checkpoint_is_set_aside_and_the_previous_used(reference, env, tmp_path):
  ref_dir, ref_result = reference
  workdir = tmp_path / "run"
  shutil.copytree(ref_dir, workdir)
  shutil.rmtree(workdir / "checkpoints" / "12")
  data = workdir / "checkpoints" / "9" / "state" / "ocdbt.process_0" / "d"
  biggest = max(data.iterdir(), key=lambda p: p.stat().st_size)
  biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])  # a torn write

  (output,) = run(workdir, env)
  assert re.search(r"checkpoint \S+/9 cannot be restored", output)
  assert resumed_from(output) == 6
  assert [p.name.split("-")[0] for p in (workdir / checkpoint.UNREADABLE_DIR).iterdir()] == ["9"]
  assert result_of(output) == ref_result
  assert_same_run(workdir, ref_dir)


def test_restore_newest_skips_what_cannot_be_read(tmp_path, caplog):
  state = {"w": jnp.arange(6.0).reshape(2, 3), "n": jnp.array(3, jnp.int32)}
  ckpt = checkpoint.Checkpointer(tmp_path, every_steps=1, keep=10, training=True)
  for step in (1, 2, 3, 4):
    w = state["w"] * step if step != 4 else state["w"].at[0, 0].set(jnp.nan)
    ckpt.save(step, {**state, "w": w}, {"step": step, "run": {"model": "mlp"}})
  ckpt.close()
  shutil.rmtree(tmp_path / "checkpoints" / "3" / "meta")  # 3: the metadata is gone
  # 4 holds a NaN: the training loop never saves one, so such a checkpoint is damaged.

  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
  )
  ckpt = checkpoint.Checkpointer(tmp_path, every_steps=1, keep=10)
  seen = []
  with caplog.at_level(logging.ERROR):
    restored, meta = ckpt.restore_newest(abstract, lambda m: seen.append(m["step"]))
  ckpt.close()
  assert meta["step"] == 2 and seen == [4, 2]
  np.testing.assert_array_equal(restored["w"], state["w"] * 2)
  assert "checkpoints/4 cannot be restored" in caplog.text and "NaN" in caplog.text
  assert "checkpoints/3 cannot be restored" in caplog.text
  aside = sorted(p.name.split("-")[0] for p in (tmp_path / checkpoint.UNREADABLE_DIR).iterdir())
  assert aside == ["3", "4"]

  # A checkpoint of another run is an error of the caller's, not damage: nothing is moved.
  def other_run(meta):
    raise ValueError("another run")

  ckpt = checkpoint.Checkpointer(tmp_path, every_steps=1, keep=10)
  with pytest.raises(ValueError, match="another run"):
    ckpt.restore_newest(abstract, other_run)
  ckpt.close()
  assert committed(tmp_path) == [1, 2]


# ---------------------------------------------------------------------------------------------
# multi-host: 2 processes on this machine


def test_two_processes_match_one_and_resume_across_both(reference, env, tmp_path):
  ref_dir, ref_result = reference
  workdir = tmp_path / "two"
  run(workdir, env, "--kill-before-save", "5", processes=2, rc=-9)  # the whole job dies
  # SIGTERM to process 0 only: JAX's preemption service stops both at the same step, each
  # writing its part of the checkpoint.
  outputs = run(
    workdir, env, "--sigterm-after", "6", "--fault-in-process", "0", processes=2, rc=143
  )
  stops = [int(re.search(r"preempted at step (\d+)", o).group(1)) for o in outputs]
  assert stops[0] == stops[1] and stops[0] in committed(workdir), stops
  outputs = run(workdir, env, processes=2)
  assert [resumed_from(o) for o in outputs] == stops
  # Only process 0 writes: one TensorBoard file per run, each record once (assert_same_run).
  assert len(list(workdir.glob("events.out.tfevents.*"))) == 3
  results = [result_of(o) for o in outputs]
  assert results[0] == results[1]
  for k, v in ref_result.items():
    assert results[0][k] == pytest.approx(v, rel=1e-3, abs=1e-4), k
  assert_same_run(workdir, ref_dir, exact=False)


def test_only_the_training_job_removes_an_interrupted_save(tmp_path, caplog):
  torso = tmp_path / "checkpoints" / "5.orbax-checkpoint-tmp"  # what a kill mid-save leaves
  (torso / "state").mkdir(parents=True)
  # A reader (a notebook inspecting a live run) must leave a save in flight alone.
  checkpoint.Checkpointer(tmp_path, every_steps=1, keep=3).close()
  assert torso.exists()
  with caplog.at_level(logging.WARNING):
    checkpoint.Checkpointer(tmp_path, every_steps=1, keep=3, training=True).close()
  assert "checkpoints/5 was never completed" in caplog.text
  assert not torso.exists()

"""Nothing written is silently altered, lost or raced: bit flips in checkpoint data, two jobs on
one workdir, a stale lock, a finished run re-run with another config, kills and signals at steps
off the log interval, a reader of a live run, a full disk. Each job is ``tests/fault_run.py``
in its own process (real signals, real files), sharing the session's compilation cache and the
uninterrupted reference run of ``conftest.reference``; processes meet through marker files,
never through timing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from fault_helpers import (
  REPO,
  SCRIPT,
  assert_same_run,
  committed,
  result_of,
  resumed_from,
  run,
  strip_timing,
)
from fault_run import config

from autosparse_jax import train
from autosparse_jax.train import checkpoint, errors, lock, logs, report, sharding
from autosparse_jax.train import summary as run_summary

TIMEOUT = 300  # seconds; generous: the machine may be loaded


def flip_a_bit_that_alters_a_value(workdir: Path, step: int) -> None:
  """Flips one bit of the biggest data file of checkpoint ``step`` (as a failing disk or cable
  might), at the first place from its middle where the file still decodes to finite values
  that differ from the saved ones: the damage only the checksums can see."""
  exp = train.build_experiment(config())
  target = sharding.with_shardings(exp.abstract_state, exp.state_shardings)
  reader = checkpoint.Checkpointer(workdir, every_steps=3, keep=3)
  saved = [np.asarray(x) for x in jax.tree.leaves(reader.restore(step, target)[0])]
  path = biggest_data_file(workdir / "checkpoints" / str(step))
  original = path.read_bytes()
  for offset in range(len(original) // 2, len(original), 97):
    data = bytearray(original)
    data[offset] ^= 1
    path.write_bytes(bytes(data))
    try:
      read = [np.asarray(x) for x in jax.tree.leaves(reader.restore(step, target)[0])]
    except Exception:  # noqa: BLE001, S112 -- a flip the decoder notices: not the case sought
      continue
    finite = all(np.all(np.isfinite(x)) for x in read if np.issubdtype(x.dtype, np.inexact))
    if finite and any(not np.array_equal(x, y) for x, y in zip(read, saved, strict=True)):
      reader.close()
      return
  raise AssertionError(f"no flip in {path} alters a value")


def biggest_data_file(checkpoint_dir: Path) -> Path:
  data = checkpoint_dir / "state" / "ocdbt.process_0" / "d"
  return max(data.iterdir(), key=lambda p: p.stat().st_size)


def snapshot(workdir: Path) -> dict[str, bytes]:
  return {str(p.relative_to(workdir)): p.read_bytes() for p in workdir.rglob("*") if p.is_file()}


def start(workdir: Path, env, *args: str) -> tuple[subprocess.Popen, object]:
  log = tempfile.TemporaryFile("w+")
  proc = subprocess.Popen(
    [sys.executable, str(SCRIPT), str(workdir), *args],
    env=env,
    cwd=REPO,
    stdout=log,
    stderr=subprocess.STDOUT,
    text=True,
  )
  return proc, log


def finish(proc: subprocess.Popen, log) -> tuple[int, str]:
  try:
    code = proc.wait(timeout=TIMEOUT)
  finally:
    proc.kill()
  log.seek(0)
  return code, log.read()


def wait_for(path: Path, proc: subprocess.Popen) -> None:
  deadline = time.monotonic() + TIMEOUT
  while not path.exists():
    assert proc.poll() is None, f"the job ended (exit {proc.returncode}) before {path.name}"
    assert time.monotonic() < deadline, f"no {path} after {TIMEOUT}s"
    time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# 1. altered data


def test_bit_flips_in_checkpoint_data_are_caught_by_readers_and_training(
  reference, subprocess_env, tmp_path, caplog
):
  ref_dir, ref_result = reference
  workdir = tmp_path / "run"
  shutil.copytree(ref_dir, workdir)
  for name in (run_summary.SUMMARY_JSON, run_summary.SUMMARY_TXT):
    (workdir / name).unlink()  # as if killed after its final checkpoint
  flip_a_bit_that_alters_a_value(workdir, 12)

  # Readers (a notebook, the report command) take the newest checkpoint that verifies.
  with caplog.at_level(logging.ERROR):
    state = train.load_checkpoint(config(), str(workdir))
  assert int(state.step) == 9
  assert "checkpoints/12 cannot be read" in caplog.text and "checksum mismatch" in caplog.text
  with pytest.raises(FileNotFoundError, match="checksum mismatch"):
    train.load_checkpoint(config(), str(workdir), step=12)
  rep, _ = report.checkpoint_report(workdir)
  assert rep["experiment"]["steps"] == 9
  assert committed(workdir) == [6, 9, 12]  # readers move nothing

  # The training job sets it aside and redoes steps 10-12 from checkpoint 9.
  (output,) = run(workdir, subprocess_env)
  assert "checkpoints/12 cannot be restored (ChecksumMismatch" in output
  assert resumed_from(output) == 9
  aside = [p.name.split("-")[0] for p in (workdir / checkpoint.UNREADABLE_DIR).iterdir()]
  assert aside == ["12"]
  assert result_of(output) == ref_result
  assert_same_run(workdir, ref_dir)


# ---------------------------------------------------------------------------------------------
# 2. one job per workdir


def test_second_job_on_a_live_workdir_is_refused_and_changes_nothing(
  reference, subprocess_env, tmp_path
):
  ref_dir, ref_result = reference
  workdir = tmp_path / "run"
  first, first_log = start(workdir, subprocess_env, "--pause-after", "7")
  try:
    wait_for(Path(f"{workdir}.paused"), first)  # the first job is mid-run
    before = snapshot(workdir)
    (output,) = run(workdir, subprocess_env, rc=errors.WorkdirInUse.exit_code)
    assert f"is in use by another training job: pid {first.pid} on host " in output
    assert "started 20" in output and "Traceback" not in output
    assert snapshot(workdir) == before
  finally:
    Path(f"{workdir}.resume").touch()
    code, output = finish(first, first_log)
  assert code == 0, output[-3000:]
  assert result_of(output) == ref_result
  assert_same_run(workdir, ref_dir)


def test_a_lock_file_left_by_a_dead_job_is_taken_over(tmp_path, caplog):
  # What a job killed with SIGKILL leaves: the file naming it (the kernel dropped its flock).
  dead = subprocess.run(
    [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
  )
  holder = {"host": "somewhere", "pid": int(dead.stdout), "started": 1.0e9}
  (tmp_path / lock.LOCK_FILE).write_text(json.dumps(holder))
  with caplog.at_level(logging.WARNING):
    held = lock.WorkdirLock(tmp_path).acquire()
  assert f"pid {holder['pid']} on host somewhere" in caplog.text and "taking it over" in caplog.text
  with pytest.raises(errors.WorkdirInUse, match=f"pid {os.getpid()}"):
    lock.WorkdirLock(tmp_path).acquire()  # a second holder in this process: refused
  held.release()
  lock.WorkdirLock(tmp_path).acquire().release()


# ---------------------------------------------------------------------------------------------
# 3. a changed config


def test_finished_run_with_another_config_is_refused_and_extend_keeps_the_old_reports(
  reference, subprocess_env, tmp_path
):
  ref_dir, _ = reference
  workdir = tmp_path / "run"
  shutil.copytree(ref_dir, workdir)
  before = snapshot(workdir)
  (output,) = run(workdir, subprocess_env, "--set", "num_train_steps=9", rc=2)
  assert "config.num_train_steps: run 12, now 9" in output and "nothing was changed" in output
  assert "Traceback" not in output
  with pytest.raises(errors.RunConfigChanged, match="config.learning_rate: run 0.05, now 0.5"):
    train.train_and_evaluate(config(learning_rate=0.5), str(workdir))
  with pytest.raises(errors.RunConfigChanged, match="extend only raises num_epochs"):
    train.train_and_evaluate(config(learning_rate=0.5), str(workdir), extend=True)
  assert snapshot(workdir) == before

  (output,) = run(workdir, subprocess_env, "--set", "num_train_steps=15", "--extend")
  assert resumed_from(output) == 12 and result_of(output)["step"] == 15
  for name in ("config.json", "summary.json", "summary.txt"):
    stem, suffix = name.split(".")
    assert (workdir / f"{stem}.until-step-12.{suffix}").read_bytes() == before[name]
  assert json.loads((workdir / "summary.json").read_text())["experiment"]["steps"] == 15
  ours = logs.read_jsonl(workdir / logs.METRICS_FILE)
  theirs = logs.read_jsonl(ref_dir / logs.METRICS_FILE)
  assert ours[: len(theirs)] == theirs and ours[-1]["step"] == 15


def test_the_command_refuses_a_changed_config_in_one_line(reference, subprocess_env, tmp_path):
  ref_dir, _ = reference
  workdir = tmp_path / "run"
  shutil.copytree(ref_dir, workdir)
  before = snapshot(workdir)
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "autosparse_jax.train",
      f"--config={REPO / 'configs' / 'default.py'}",
      f"--workdir={workdir}",
      "--config.learning_rate=0.5",
    ],
    env=subprocess_env,
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=TIMEOUT,
  )
  assert proc.returncode == errors.RunConfigChanged.exit_code, proc.stderr[-3000:]
  lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert "holds a run with another config" in lines[0]
  assert "config.learning_rate: run 0.05, now 0.5" in lines[0] and "--extend" in lines[0]
  assert snapshot(workdir) == before


# ---------------------------------------------------------------------------------------------
# 4, 5. resumes off the log interval, signals


def test_resumes_off_the_log_interval_report_as_the_uninterrupted_run(subprocess_env, tmp_path):
  settings = ("--set", "log_every_steps=4")  # checkpoints every 3 steps: 3, 6, 9, 12
  ref_dir = tmp_path / "reference"
  (output,) = run(ref_dir, subprocess_env, *settings)
  ref_result = result_of(output)
  workdir = tmp_path / "run"
  # SIGKILL at step 8: resumes from 6 (or 3, if the save of 6 was still in flight), inside a
  # log window (5-8 or 1-4).
  run(workdir, subprocess_env, *settings, "--kill-before-save", "8", rc=-9)
  assert json.loads((workdir / lock.LOCK_FILE).read_text())["pid"]  # left by the dead job
  # Ctrl-C at step 10: saved, a one-line message, exit 130 (128 + SIGINT).
  (output,) = run(workdir, subprocess_env, *settings, "--sigint-after", "10", rc=130)
  assert "taking it over" in output and resumed_from(output) in (3, 6)
  assert "ERROR stopped by SIGINT at step 10" in output and "Traceback" not in output
  assert 10 in committed(workdir)
  # SIGKILL after the final checkpoint, before the summary.
  (output,) = run(workdir, subprocess_env, *settings, "--kill-before-summary", rc=-9)
  assert resumed_from(output) == 10
  assert not (workdir / run_summary.SUMMARY_JSON).exists()
  # A torn last line (the eval record of step 12).
  metrics = workdir / logs.METRICS_FILE
  text = metrics.read_text()
  metrics.write_text(text[: text.rstrip("\n").rfind("\n") + 40])

  (output,) = run(workdir, subprocess_env, *settings)
  assert "line 5 is not a whole record" in output
  assert "1 record(s) up to step 12 were lost or torn; written back" in output
  assert resumed_from(output) == 12
  assert result_of(output) == ref_result
  assert_same_run(workdir, ref_dir)
  records = logs.read_jsonl(metrics)
  assert [r["step"] for r in records if "train/loss" in r] == [4, 8, 12]
  for line in metrics.read_text().splitlines():  # strict JSON throughout
    json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in metrics.jsonl"))
  assert strip_timing(records) == strip_timing(logs.read_jsonl(ref_dir / logs.METRICS_FILE))


# ---------------------------------------------------------------------------------------------
# 6. readers of a live run


def test_readers_of_a_live_run_never_fail_nor_disturb_it(subprocess_env, tmp_path):
  settings = ["--set", "checkpoint_every_steps=1", "--set", "keep_checkpoints=1"]
  settings += ["--set", "num_train_steps=40"]
  workdir = tmp_path / "run"
  job, job_log = start(workdir, subprocess_env, *settings, "--pause-after", "2")
  c = config(checkpoint_every_steps=1, keep_checkpoints=1, num_train_steps=40)
  reads = []
  try:
    wait_for(Path(f"{workdir}.paused"), job)
    reads.append(int(train.load_checkpoint(c, str(workdir)).step))  # compiles, run paused
    Path(f"{workdir}.resume").touch()
    while job.poll() is None:  # every checkpoint lives one step: reads race its deletion
      reads.append(int(train.load_checkpoint(c, str(workdir)).step))
      reads.append(report.checkpoint_report(workdir)[0]["experiment"]["steps"])
  finally:
    Path(f"{workdir}.resume").touch()
    code, output = finish(job, job_log)
  assert code == 0, output[-3000:]
  assert reads[0] == 2 and all(2 <= r <= 40 for r in reads)
  assert committed(workdir) == [40] and "cannot be restored" not in output
  assert not (workdir / checkpoint.UNREADABLE_DIR).exists()


def test_a_checkpoint_removed_while_read_makes_the_reader_take_the_next(tmp_path, monkeypatch):
  state = {"w": np.arange(6.0, dtype=np.float32)}
  ckpt = checkpoint.Checkpointer(tmp_path, every_steps=1, keep=5, training=True)
  for step in (1, 2, 3):
    ckpt.save(step, {"w": state["w"] * step}, {"step": step})
  ckpt.close()
  reader = checkpoint.Checkpointer(tmp_path, every_steps=1, keep=5)
  restore = reader.restore

  def restore_as_keep_n_deletes(step, target):  # the writer's keep-N strikes mid-read
    if step == 3:
      shutil.rmtree(tmp_path / "checkpoints" / "3")
    return restore(step, target)

  monkeypatch.setattr(reader, "restore", restore_as_keep_n_deletes)
  restored, meta, step = reader.read({"w": np.zeros(6, np.float32)})
  reader.close()
  assert step == 2 and meta["step"] == 2
  np.testing.assert_array_equal(restored["w"], state["w"] * 2)


# ---------------------------------------------------------------------------------------------
# 7. a full disk


def test_full_disk_says_so_in_one_line_and_keeps_earlier_checkpoints(
  reference, subprocess_env, tmp_path
):
  probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
  if probe.returncode != 0:
    pytest.skip(f"no user namespace here to mount a small tmpfs: {probe.stderr.decode()[:200]}")
  ref_dir, ref_result = reference
  mount = tmp_path / "small_disk"
  mount.mkdir()
  workdir = mount / "run"
  saved = tmp_path / "copied_out"
  # A 600 KiB tmpfs holds two or three checkpoints (about 200 KiB each) of the four.
  script = (
    f'mount -t tmpfs -o size=600k tmpfs "{mount}" && '
    f'"{sys.executable}" "{SCRIPT}" "{workdir}"; code=$?; '
    f'cp -r "{workdir}" "{saved}"; exit $code'
  )
  (output,) = run(workdir, subprocess_env, rc=74, prefix=("unshare", "-rm", "sh", "-c", script))
  errors_ = [line for line in output.splitlines() if line.startswith("ERROR ")]
  assert len(errors_) == 1, output[-3000:]
  # orbax's writer threads may still print their own failures; none goes through our code.
  assert not re.search(r'File "[^"]*autosparse_jax', output), output[-3000:]
  found = re.fullmatch(
    r"ERROR saving checkpoint (\S+)/checkpoints/(\d+) failed: no space left on device; the "
    r"earlier checkpoints \(([\d, ]+)\) are intact\. Free space and run the same command to "
    r"resume\.",
    errors_[0],
  )
  assert found, errors_[0]
  assert found.group(1) == str(workdir)
  intact = [int(s) for s in found.group(3).split(", ")]
  assert committed(saved) == intact and max(intact) < int(found.group(2))
  # Where there is room, the same command resumes and ends as the uninterrupted run.
  (output,) = run(saved, subprocess_env)
  assert resumed_from(output) == max(intact)
  assert result_of(output) == ref_result
  assert_same_run(saved, ref_dir)


# ---------------------------------------------------------------------------------------------
# 8. bad values


def test_a_diverging_run_stops_and_summaries_are_strict_json(tmp_path):
  c = config(learning_rate=30.0, warmup_epochs=0.0, max_consecutive_nonfinite=10**6)
  c.method = "dense"
  with pytest.raises(errors.RunDiverged, match="the training loss diverged"):
    train.train_and_evaluate(c, str(tmp_path / "run"))
  assert not (tmp_path / "run" / run_summary.SUMMARY_JSON).exists()

  report_ = {"experiment": {}, "eval": {"loss": float("nan")}, "train": {"loss": float("inf")}}
  report_["sparsity"] = {"total": 0.5, "all_params": 0.5, "kernels_size": 2, "layers": {}}
  report_["sparsity"]["kernels_nonzero"] = 1
  report_["wall_time_seconds"] = 1.0
  run_summary.write_summary(tmp_path, report_)

  def no_constants(name):
    raise AssertionError(f"{name} in summary.json")

  loaded = json.loads((tmp_path / "summary.json").read_text(), parse_constant=no_constants)
  assert loaded["eval"]["loss"] is None and loaded["train"]["loss"] is None

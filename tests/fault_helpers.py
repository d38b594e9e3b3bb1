"""Helpers of the fault tests: run ``tests/fault_run.py`` as a real process, read what it left."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest
from fault_run import config

from autosparse_jax import train
from autosparse_jax.train import logs
from autosparse_jax.train import summary as run_summary

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "fault_run.py"


def run(
  workdir: Path, env, *args: str, rc: int = 0, processes: int = 1, prefix: tuple[str, ...] = ()
) -> list[str]:
  """Runs the digits job (``processes`` of it; each command after ``prefix``) to the end or its
  fault; returns each process's output. The output goes to files, not pipes: a process
  blocked on a full pipe would stall the other at a collective."""
  port = []
  if processes > 1:
    with socket.socket() as s:
      s.bind(("localhost", 0))
      port = ["--port", str(s.getsockname()[1]), "--processes", str(processes)]
  logs_ = [tempfile.TemporaryFile("w+") for _ in range(processes)]
  procs = [
    subprocess.Popen(
      [*prefix, sys.executable, str(SCRIPT), str(workdir), *args, *port, "--process-id", str(i)],
      env=env,
      cwd=REPO,
      stdout=log,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i, log in enumerate(logs_)
  ]
  try:
    codes = [p.wait(timeout=300) for p in procs]
  finally:
    for p in procs:
      p.kill()
  outputs = []
  for log in logs_:
    log.seek(0)
    outputs.append(log.read())
    log.close()
  for code, output in zip(codes, outputs, strict=True):
    assert code == rc, f"{args}: exit {code}, expected {rc}\n{output[-3000:]}"
  return outputs


def result_of(output: str) -> dict:
  (line,) = [line for line in output.splitlines() if line.startswith("RESULT ")]
  return json.loads(line.removeprefix("RESULT "))


def resumed_from(output: str) -> int | None:
  found = re.findall(r"resuming from \S+/(\d+)", output)
  return int(found[-1]) if found else None


def committed(workdir: Path) -> list[int]:
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def strip_timing(records):
  return [{k: v for k, v in r.items() if k not in logs.TIMING_KEYS} for r in records]


def final_state(workdir: Path):
  return train.load_checkpoint(config(), str(workdir))


def assert_same_run(workdir: Path, reference: Path, exact: bool = True):
  """Same final checkpoint (every leaf of the train state), metrics and summary."""
  a, b = final_state(workdir), final_state(reference)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  leaves = zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b), strict=True)
  for (path, x), y in leaves:
    x, y = np.asarray(x), np.asarray(y)
    if exact:
      np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
    else:
      np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))
  ours = strip_timing(logs.read_jsonl(workdir / logs.METRICS_FILE))
  theirs = strip_timing(logs.read_jsonl(reference / logs.METRICS_FILE))
  assert [r["step"] for r in ours] == [r["step"] for r in theirs]
  if exact:
    assert ours == theirs
  else:
    for r, s in zip(ours, theirs, strict=True):
      assert r.keys() == s.keys()
      for k in r:
        assert r[k] == pytest.approx(s[k], rel=1e-3, abs=1e-4), (r["step"], k)
  summaries = [json.loads((d / run_summary.SUMMARY_JSON).read_text()) for d in (workdir, reference)]
  for s in summaries:
    s.pop("wall_time_seconds")
    s["experiment"].pop("processes"), s["experiment"].pop("devices")
  if exact:
    assert summaries[0] == summaries[1]

"""Run by tests/test_faults.py in its own process: the digits run of :func:`config`, with a fault.

  python tests/fault_run.py WORKDIR [FAULT] [--processes P --process-id I --port N]

FAULT, at global step N (each a real signal to this process, at a deterministic point):

* ``--kill-before-save N``: SIGKILL after step N was trained, logged and evaluated, before its
  checkpoint (for N off the checkpoint interval: a kill between checkpoints);
* ``--kill-during-save N``: SIGKILL as soon as the asynchronous save of step N has started;
* ``--kill-at-commit N``: SIGKILL when the save of step N has written everything and is about
  to commit it (orbax's atomic rename): the worst moment of a save;
* ``--sigterm-after N``: SIGTERM after step N (as a scheduler preempting the job does);
* ``--sigint-after N``: SIGINT (Ctrl-C) after step N;
* ``--kill-before-summary``: SIGKILL after the final checkpoint, before the summary is written;
* ``--pause-after N``: after step N, create ``WORKDIR.paused`` and wait until
  ``WORKDIR.resume`` exists (another process acts on the live run meanwhile).

``--set FIELD=JSON`` overrides a config field (e.g. ``--set log_every_steps=4``); ``--extend``
passes ``extend=True``. A :class:`~autosparse_jax.train.errors.TrainingError` is printed as
``ERROR <message>`` and ends the process with its exit code, as the command does.

With ``--processes P`` the run is one of P processes joined by ``jax.distributed`` on
``localhost:PORT`` (one CPU device each, gloo collectives); ``--fault-in-process I`` limits the
fault to process I (default: every process). The run's result dict is printed
to stdout as ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def config(**overrides):
  spec = importlib.util.spec_from_file_location("default", REPO / "configs" / "default.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.model_kwargs = {"hidden": (64, 32)}
  c.num_train_steps = 12
  c.log_every_steps = 1
  c.checkpoint_every_steps = 3
  c.keep_checkpoints = 3
  c.eval_every_epochs = 6 / 22  # 22 steps per epoch: evaluation at steps 6 and 12
  c.warmup_epochs = 0.1
  c.global_batch_size = 64
  c.eval_batch_size = 128
  c.num_eval_steps = 2
  for k, v in overrides.items():
    c[k] = v
  return c


def install_fault(args) -> None:
  from orbax.checkpoint._src.path import atomicity

  from autosparse_jax.train import checkpoint

  kill = lambda sig: os.kill(os.getpid(), sig)  # noqa: E731
  save = checkpoint.Checkpointer.save

  def faulty_save(self, step, state, meta, force=False):
    if step == args.kill_before_save:
      kill(signal.SIGKILL)
    started = save(self, step, state, meta, force)
    if started and step == args.kill_during_save:
      kill(signal.SIGKILL)
    if step == args.sigterm_after:
      kill(signal.SIGTERM)
    if step == args.sigint_after:
      kill(signal.SIGINT)
    if step == args.pause_after:
      self.manager.wait_until_finished()  # the workdir holds still while paused
      Path(f"{args.workdir}.paused").touch()
      while not Path(f"{args.workdir}.resume").exists():
        time.sleep(0.05)
    if step >= args.sigterm_after >= 0:
      # A multi-process job hears of the SIGTERM through JAX's coordination service a few
      # milliseconds later; slow the steps down so that it does before this short run ends.
      time.sleep(0.5)
    return started

  checkpoint.Checkpointer.save = faulty_save
  finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def faulty_finalize(self, *a, **k):
    if self._final_path.name == str(args.kill_at_commit):
      kill(signal.SIGKILL)
    return await finalize(self, *a, **k)

  atomicity.AtomicRenameTemporaryPath.finalize = faulty_finalize
  if args.kill_before_summary:
    from autosparse_jax.train import loop

    loop.write_summary = lambda *a, **k: kill(signal.SIGKILL)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("workdir")
  for fault in (
    "kill-before-save",
    "kill-during-save",
    "kill-at-commit",
    "sigterm-after",
    "sigint-after",
    "pause-after",
  ):
    parser.add_argument(f"--{fault}", type=int, default=-1)
  parser.add_argument("--kill-before-summary", action="store_true")
  parser.add_argument("--set", action="append", default=[])
  parser.add_argument("--extend", action="store_true")
  parser.add_argument("--processes", type=int, default=1)
  parser.add_argument("--process-id", type=int, default=0)
  parser.add_argument("--port", type=int, default=0)
  parser.add_argument("--fault-in-process", type=int, default=None)
  args = parser.parse_args()

  import jax
  from absl import logging

  logging.set_verbosity(logging.INFO)
  if args.processes > 1:
    jax.distributed.initialize(f"localhost:{args.port}", args.processes, args.process_id)
  if args.fault_in_process in (None, args.process_id):
    install_fault(args)
  from autosparse_jax import train
  from autosparse_jax.train import logs
  from autosparse_jax.train.errors import TrainingError

  logs.quiet_library_logs()  # as the command does
  overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
  overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
  try:
    result = train.train_and_evaluate(config(**overrides), args.workdir, extend=args.extend)
  except TrainingError as e:
    print("ERROR", e, flush=True)
    sys.exit(e.exit_code)
  print("RESULT", json.dumps(result), flush=True)


if __name__ == "__main__":
  main()

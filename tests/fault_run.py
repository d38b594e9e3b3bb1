"""Run by tests/test_faults.py in its own process: the digits run of :func:`config`, with a fault.

  python tests/fault_run.py WORKDIR [FAULT] [--processes P --process-id I --port N]

FAULT, at global step N (each a real signal to this process, at a deterministic point):

* ``--kill-before-save N``: SIGKILL after step N was trained, logged and evaluated, before its
  checkpoint (for N off the checkpoint interval: a kill between checkpoints);
* ``--kill-during-save N``: SIGKILL as soon as the asynchronous save of step N has started;
* ``--kill-at-commit N``: SIGKILL when the save of step N has written everything and is about
  to commit it (orbax's atomic rename): the worst moment of a save;
* ``--sigterm-after N``: SIGTERM after step N (as a scheduler preempting the job does).

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


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("workdir")
  for fault in ("kill-before-save", "kill-during-save", "kill-at-commit", "sigterm-after"):
    parser.add_argument(f"--{fault}", type=int, default=-1)
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

  result = train.train_and_evaluate(config(), args.workdir)
  print("RESULT", json.dumps(result), flush=True)


if __name__ == "__main__":
  main()

"""Periodic, keep-N checkpoints of the whole train state with orbax, and resume.

A checkpoint at step ``s`` (``<workdir>/checkpoints/<s>/``) holds

* ``state``: the :class:`~autosparse_jax.train.TrainState`: step, params (the sparse effective
  weights), batch statistics and the optimizer state, which holds the latent dense weights,
  the thresholds, momenta, mask state and the annealing step;
* ``meta``: JSON: the step, the data position (the global step: the input pipeline is a
  function of the step, so resuming needs nothing else) and the fields that identify the run.

Saving is asynchronous (orbax copies the arrays off the devices, then writes in the
background); a checkpoint appears only once fully written, so a run killed mid-save resumes
from the previous one. Restoring needs the abstract state (shapes, dtypes, shardings): it
keeps the NamedTuple structure and puts every array on its sharding, which may differ from
the one it was saved with (e.g. resuming on another number of devices).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"


class Checkpointer:
  """``orbax.checkpoint.CheckpointManager`` over ``<workdir>/checkpoints``.

  Args:
    workdir: the run's directory.
    every_steps: save when ``step % every_steps == 0`` (and whenever ``force=True``).
    keep: how many of the latest checkpoints to keep.
  """

  def __init__(self, workdir: str | os.PathLike, every_steps: int, keep: int):
    self.directory = Path(workdir).absolute() / CHECKPOINT_DIR
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=int(keep), save_interval_steps=int(every_steps), create=True
      ),
    )

  def latest_step(self) -> int | None:
    """The step of the newest complete checkpoint, or None."""
    return self.manager.latest_step()

  def restore_meta(self, step: int) -> dict[str, Any]:
    """Only the JSON metadata of the checkpoint at ``step``."""
    restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored.meta)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """The state (structure, shapes and shardings of ``abstract_state``) and metadata."""
    restored = self.manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
      ),
    )
    return restored.state, dict(restored.meta)

  def save(self, step: int, state: Any, meta: dict[str, Any], force: bool = False) -> bool:
    """Saves if ``step`` is due (or ``force``); returns whether a save started."""
    return self.manager.save(
      int(step),
      args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
      force=force,
    )

  def reached_preemption(self, step: int) -> bool:
    """Whether the job is being preempted (the manager then saved ``step`` regardless of the
    interval); the caller should stop."""
    return bool(self.manager.reached_preemption(int(step)))

  def wait(self) -> None:
    """Blocks until the pending asynchronous save is on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

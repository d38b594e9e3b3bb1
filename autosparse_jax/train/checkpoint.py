"""Periodic, keep-N checkpoints of the whole train state with orbax, and resume.

A checkpoint at step ``s`` (``<workdir>/checkpoints/<s>/``) holds

* ``state``: the :class:`~autosparse_jax.train.TrainState`: step, params (the sparse effective
  weights), batch statistics and the optimizer state, which holds the latent dense weights,
  the thresholds, momenta, mask state and the annealing step;
* ``meta``: JSON: the step, the data position (the global step: the input pipeline is a
  function of the step, so resuming needs nothing else) and the fields that identify the run.

Saving is asynchronous (orbax copies the arrays off the devices, then writes in the
background); a checkpoint appears only once fully written, so a run killed mid-save resumes
from the previous one (the training job reports the torso of the interrupted save and removes it). A
checkpoint that is there but cannot be read back (truncated or deleted files, non-finite
values) is reported, moved to ``<workdir>/checkpoints_unreadable/`` and the next older one is
used (:meth:`Checkpointer.restore_newest`). Restoring needs the abstract state (shapes,
dtypes, shardings): it keeps the NamedTuple structure and puts every array on its sharding,
which may differ from the one it was saved with (e.g. resuming on another number of devices).

Preemption: a multi-process job learns of it from JAX's preemption service (SIGTERM on any
host reaches every process at the same step, through orbax); a single-process job with
``training=True`` catches SIGTERM itself. Either way :meth:`Checkpointer.preempted`
turns True and the training loop saves a final checkpoint and stops.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

CHECKPOINT_DIR = "checkpoints"
UNREADABLE_DIR = "checkpoints_unreadable"


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
  floats = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in floats] or [jnp.array(True)]))


class Checkpointer:
  """``orbax.checkpoint.CheckpointManager`` over ``<workdir>/checkpoints``.

  Args:
    workdir: the run's directory.
    every_steps: save when ``step % every_steps == 0`` (and whenever ``force=True``).
    keep: how many of the latest checkpoints to keep.
    training: this is the training job that writes here (not a reader such as a notebook
      inspecting a live run): report and remove the leftovers of saves interrupted by an
      earlier kill, and, in a single-process job, catch SIGTERM until :meth:`close` and
      report it through :meth:`preempted` instead of dying (only from the main thread).
  """

  def __init__(
    self, workdir: str | os.PathLike, every_steps: int, keep: int, training: bool = False
  ):
    self.workdir = Path(workdir).absolute()
    self.directory = self.workdir / CHECKPOINT_DIR
    suffix = ocp.path.atomicity.TMP_DIR_SUFFIX
    # A reader must not touch the temporary directory of a live run's save in flight.
    for incomplete in sorted(self.directory.glob(f"*{suffix}*")) if training else []:
      logging.warning(
        "checkpoint %s/%s was never completed (the job stopped while saving it); removing it",
        self.directory,
        incomplete.name.split(suffix)[0],
      )
      if jax.process_index() == 0:
        shutil.rmtree(incomplete, ignore_errors=True)
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=int(keep),
        save_interval_steps=int(every_steps),
        create=True,
      ),
    )
    self._last_saved: int | None = None
    self._sigterm = False
    self._previous_handler = None
    if (
      training
      and jax.process_count() == 1
      and threading.current_thread() is threading.main_thread()
    ):
      self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    self._sigterm = True

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

  def restore_newest(
    self, abstract_state: Any, check_meta: Callable[[dict[str, Any]], None]
  ) -> tuple[Any, dict[str, Any]] | None:
    """The newest checkpoint that reads back whole, or None if there is none.

    ``check_meta(meta)`` runs on each candidate's metadata before its state is read and may
    raise (e.g. a checkpoint of another run); that error propagates. A checkpoint whose
    metadata or state cannot be read, or whose state holds a NaN/Inf (never saved by the
    training loop), is logged as an error, moved to
    ``<workdir>/checkpoints_unreadable/<step>-<unix time>`` (kept for inspection, out of the way
    of the step that will be saved again) and the next older one is tried.
    """
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        meta = self.restore_meta(step)
      except Exception as e:  # noqa: BLE001 -- any failure to read means: not usable
        self._set_aside(step, e)
        continue
      check_meta(meta)
      try:
        state, meta = self.restore(step, abstract_state)
        if not bool(_all_finite(state)):
          raise ValueError("the restored state holds NaN/Inf values")
      except Exception as e:  # noqa: BLE001
        self._set_aside(step, e)
        continue
      self._last_saved = step
      return state, meta
    return None

  def _set_aside(self, step: int, error: Exception) -> None:
    destination = self.workdir / UNREADABLE_DIR / f"{step}-{int(time.time())}"
    logging.error(
      "checkpoint %s/%d cannot be restored (%s: %s); moving it to %s and trying the previous one",
      self.directory,
      step,
      type(error).__name__,
      str(error).splitlines()[0][:300] if str(error) else "",
      destination,
    )
    if jax.process_index() == 0:
      destination.parent.mkdir(parents=True, exist_ok=True)
      os.replace(self.directory / str(step), destination)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"autosparse_set_aside_{step}")
    self.manager.reload()

  def save(self, step: int, state: Any, meta: dict[str, Any], force: bool = False) -> bool:
    """Saves if ``step`` is due (or ``force`` and not saved yet); returns whether a save
    started."""
    step = int(step)
    if step == self._last_saved:
      return False
    saved = self.manager.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
      force=force,
    )
    if saved:
      self._last_saved = step
    return saved

  def preempted(self, step: int) -> bool:
    """Whether the job is being preempted: JAX's preemption service reached its sync point at
    ``step`` (multi-process), or this process got SIGTERM (``training``). The caller
    should save ``step`` (``force=True``) and stop."""
    return bool(self.manager.reached_preemption(step)) or self._sigterm

  def close(self) -> None:
    """Waits for the pending save, closes the manager and gives SIGTERM back."""
    try:
      self.manager.wait_until_finished()
      self.manager.close()
    finally:
      if self._previous_handler is not None:
        signal.signal(signal.SIGTERM, self._previous_handler)
        self._previous_handler = None

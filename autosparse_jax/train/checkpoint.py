"""Periodic, keep-N checkpoints of the whole train state with orbax, and resume.

A checkpoint at step ``s`` (``<workdir>/checkpoints/<s>/``) holds

* ``state``: the :class:`~autosparse_jax.train.TrainState`: step, params (the sparse effective
  weights), batch statistics and the optimizer state, which holds the latent dense weights,
  the thresholds, momenta, mask state and the annealing step;
* ``meta``: JSON: the step, the data position (the global step: the input pipeline is a
  function of the step, so resuming needs nothing else), the fields that identify the run, what
  the training loop carries across a resume (see :mod:`autosparse_jax.train.loop`) and
  ``checksums``: two 32-bit sums of every state leaf (:mod:`autosparse_jax.train.checksum`),
  verified on every restore.

Saving is asynchronous (orbax copies the arrays off the devices, then writes in the
background); a checkpoint appears only once fully written, so a run killed mid-save resumes
from the previous one (the training job reports the torso of the interrupted save and removes
it). A checkpoint that is there but cannot be read back (truncated or deleted files, non-finite
values, a checksum that does not match: data altered on disk) is reported, moved to
``<workdir>/checkpoints_unreadable/`` and the next older one is used
(:meth:`Checkpointer.restore_newest`). Readers of a live run (:meth:`Checkpointer.read`) never
move or delete anything: a checkpoint that the writer's keep-N removes while they read it, or
that is damaged, makes them try the next newest one. A save that fails (a full disk) raises
:class:`~autosparse_jax.train.errors.CheckpointWriteError` saying so in one line.

Restoring needs the abstract state (shapes, dtypes, shardings): it keeps the NamedTuple
structure and puts every array on its sharding, which may differ from the one it was saved
with (e.g. resuming on another number of devices).

Preemption: a multi-process job learns of it from JAX's preemption service (SIGTERM on any
host reaches every process at the same step, through orbax); a single-process job with
``training=True`` catches SIGTERM itself. SIGINT (Ctrl-C) is treated the same way (in a
multi-process job it is passed on as a SIGTERM to this process). Either way
:meth:`Checkpointer.preempted` turns True and the training loop saves a final checkpoint and
stops; :attr:`Checkpointer.stop_signal` says which signal it was.
"""

from __future__ import annotations

import errno
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

from autosparse_jax.train import checksum
from autosparse_jax.train.errors import CheckpointWriteError

CHECKPOINT_DIR = "checkpoints"
UNREADABLE_DIR = "checkpoints_unreadable"


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
  floats = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in floats] or [jnp.array(True)]))


def _no_space(error: BaseException) -> OSError | None:
  """The ``OSError`` of a full disk (or quota) among ``error``'s causes, if any."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
      return error
    if "No space left on device" in str(error) or "Disk quota exceeded" in str(error):
      return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    error = error.__cause__ or error.__context__
  return None


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
      earlier kill, and, in a single-process job, catch SIGTERM and SIGINT until :meth:`close`
      and report them through :meth:`preempted` instead of dying (only from the main thread).
  """

  def __init__(
    self, workdir: str | os.PathLike, every_steps: int, keep: int, training: bool = False
  ):
    self.workdir = Path(workdir).absolute()
    self.directory = self.workdir / CHECKPOINT_DIR
    self.every_steps = int(every_steps)
    if not training and not self.directory.is_dir():
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
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
    options = ocp.CheckpointManagerOptions(
      max_to_keep=int(keep), save_interval_steps=self.every_steps, create=training
    )
    for attempt in range(20):
      try:  # orbax lists the checkpoints: a live run's keep-N may remove one meanwhile
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        break
      except OSError:  # a step directory gone (or going) between listing and reading it
        if training or attempt == 19:
          raise
    self._last_saved: int | None = None
    self._in_flight: int | None = None
    self._failed = False
    self.stop_signal: int | None = None
    self._previous_handlers: dict[int, Any] = {}
    if training and threading.current_thread() is threading.main_thread():
      # Multi-process: SIGTERM belongs to JAX's preemption service; SIGINT is passed on to it.
      signals = (signal.SIGTERM, signal.SIGINT) if jax.process_count() == 1 else (signal.SIGINT,)
      for signum in signals:
        self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

  def _on_signal(self, signum, frame) -> None:
    del frame
    self.stop_signal = signum
    if jax.process_count() > 1:
      os.kill(os.getpid(), signal.SIGTERM)

  def latest_step(self) -> int | None:
    """The step of the newest complete checkpoint, or None."""
    return self.manager.latest_step()

  def restore_meta(self, step: int) -> dict[str, Any]:
    """Only the JSON metadata of the checkpoint at ``step``."""
    restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored.meta)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """The state (structure, shapes and shardings of ``abstract_state``) and metadata, as
    stored (not verified: see :meth:`restore_newest` and :meth:`read`)."""
    restored = self.manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
      ),
    )
    return restored.state, dict(restored.meta)

  def _restore_verified(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """:meth:`restore`, then the checks: finite values, the stored checksums."""
    state, meta = self.restore(step, abstract_state)
    if not bool(_all_finite(state)):
      raise ValueError("the restored state holds NaN/Inf values")
    if "checksums" in meta:
      checksum.verify(state, meta["checksums"])
    else:
      logging.warning(
        "checkpoint %s/%d has no checksums (saved by an older version): not verified",
        self.directory,
        step,
      )
    return state, meta

  def restore_newest(
    self, abstract_state: Any, check_meta: Callable[[dict[str, Any]], None]
  ) -> tuple[Any, dict[str, Any]] | None:
    """The training job's restore: the newest checkpoint that reads back whole, or None.

    ``check_meta(meta)`` runs on each candidate's metadata before its state is read and may
    raise (e.g. a checkpoint of another run); that error propagates. A checkpoint whose
    metadata or state cannot be read, whose state holds a NaN/Inf (never saved by the training
    loop) or differs from its checksums is logged as an error, moved to
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
        state, meta = self._restore_verified(step, abstract_state)
      except Exception as e:  # noqa: BLE001
        self._set_aside(step, e)
        continue
      self._last_saved = step
      return state, meta
    return None

  def read(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any], int]:
    """A reader's restore (a notebook, ``report``, possibly of a live run): ``(state, meta,
    step)`` of the checkpoint at ``step``, or of the newest one that reads back whole and
    verified. Nothing is moved or deleted. A checkpoint removed while it is read (the live
    run's keep-N) or damaged is skipped for the next newest one; with ``step`` given, its
    failure is raised.

    Raises:
      FileNotFoundError: no checkpoint (at ``step``; or none readable).
    """
    tried: set[int] = set()
    while True:
      on_disk = self._steps_on_disk()
      if step is not None:
        if step not in on_disk:
          raise FileNotFoundError(
            f"no checkpoint at step {step} in {self.directory}; there are {on_disk}"
          )
        steps = [step]
      else:
        steps = [s for s in reversed(on_disk) if s not in tried]
      if not steps:
        raise FileNotFoundError(
          f"no readable checkpoint in {self.directory}"
          + (f" (tried {sorted(tried)})" if tried else "")
        )
      candidate = steps[0]
      tried.add(candidate)
      try:
        state, meta = self._restore_verified(candidate, abstract_state)
        return state, meta, candidate
      except Exception as e:  # noqa: BLE001 -- gone or damaged: the next newest one
        # keep-N removes a checkpoint only once a newer one is there.
        gone = not (self.directory / str(candidate)).exists() or any(
          s > candidate for s in self._steps_on_disk()
        )
        reason = "the live run removed it" if gone else f"{type(e).__name__}: {e}"
        if step is not None:
          raise FileNotFoundError(
            f"checkpoint {self.directory}/{step} cannot be read ({reason})"
          ) from None
        (logging.info if gone else logging.error)(
          "checkpoint %s/%d cannot be read (%s); trying the next newest one",
          self.directory,
          candidate,
          reason.splitlines()[0][:300],
        )

  def _steps_on_disk(self) -> list[int]:
    """The committed checkpoints' steps, listed afresh (orbax names a checkpoint by its step
    only once it is complete)."""
    try:
      return sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit())
    except FileNotFoundError:
      return []

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

  def _write_failed(self, error: BaseException) -> None:
    """Raises :class:`CheckpointWriteError` for a failed save (of a full disk: one line
    saying so); any other error propagates as it is."""
    full = _no_space(error)
    if full is None and not isinstance(error, OSError):
      raise error
    step = self._in_flight
    self._failed = True
    try:  # let orbax's other writer threads of this save end before the job does
      self.manager.close()
    except Exception:  # noqa: BLE001, S110 -- they fail the same way; the message follows
      pass
    try:
      self.manager.reload()
      intact = [s for s in self.manager.all_steps() if s != step]
    except Exception:  # noqa: BLE001 -- the message matters more than the list
      intact = []
    reason = "no space left on device" if full is not None else str(error)
    kept = (
      f"the earlier checkpoints ({', '.join(map(str, sorted(intact)))}) are intact"
      if intact
      else "no earlier checkpoint exists"
    )
    raise CheckpointWriteError(
      f"saving checkpoint {self.directory}/{step} failed: {reason}; {kept}. "
      + ("Free space and run the same command to resume." if full is not None else "")
    ) from None

  def save(self, step: int, state: Any, meta: dict[str, Any], force: bool = False) -> bool:
    """Saves if ``step`` is a multiple of ``every_steps`` (or ``force``) and not saved yet;
    returns whether a save started. The meta gets the state's ``checksums``.

    Raises:
      CheckpointWriteError: this save or the previous one (asynchronous) failed.
    """
    step = int(step)
    if step == self._last_saved or not (force or step % self.every_steps == 0):
      return False
    meta = {**meta, "checksums": checksum.tree_checksums(state)}
    try:
      self.manager.wait_until_finished()  # a failure of the previous save surfaces here
      self._in_flight = step
      saved = self.manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=True,
      )
    except Exception as e:  # noqa: BLE001 -- see _write_failed
      self._write_failed(e)
    if saved:
      self._last_saved = step
    return saved

  def preempted(self, step: int) -> bool:
    """Whether the job is being stopped: JAX's preemption service reached its sync point at
    ``step`` (multi-process), or this process got SIGTERM or SIGINT (``training``). The caller
    should save ``step`` (``force=True``) and stop."""
    if self.stop_signal is not None and jax.process_count() == 1:
      return True
    if bool(self.manager.reached_preemption(step)):
      self.stop_signal = self.stop_signal or signal.SIGTERM
      return True
    return False

  def close(self) -> None:
    """Waits for the pending save, closes the manager and gives the signals back.

    Raises:
      CheckpointWriteError: the pending save failed.
    """
    try:
      if not self._failed:  # after a failed save, the manager is closed already
        self.manager.wait_until_finished()
        self.manager.close()
    except Exception as e:  # noqa: BLE001 -- see _write_failed
      self._write_failed(e)
    finally:
      for signum, handler in self._previous_handlers.items():
        signal.signal(signum, handler)
      self._previous_handlers = {}

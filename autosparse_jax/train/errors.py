"""Errors that end a training job on purpose, each with its one-line message and exit code.

A command's top-level handler catches :class:`TrainingError`, prints ``str(error)`` (one line,
no traceback) and exits with ``error.exit_code``:

====================  ====  ==================================================================
error                 exit  meaning
====================  ====  ==================================================================
RunDiverged           1     the loss diverged or was NaN/Inf too long; checkpoints are finite
RunConfigChanged      2     the workdir holds a run with another config; nothing was written
CheckpointWriteError  74    a save failed (e.g. disk full); the earlier checkpoints are intact
WorkdirInUse          75    another job runs on the workdir (temporary: retry later)
RunStopped            130   SIGINT (Ctrl-C): the step reached was saved; the same command resumes
RunStopped            143   SIGTERM (preemption): saved as above; schedulers requeue on 143
====================  ====  ==================================================================

74 and 75 are ``sysexits.h``'s ``EX_IOERR`` and ``EX_TEMPFAIL``; 128 + N is the shell's code
for a process ended by signal N, which schedulers (Slurm, Kubernetes, ...) read as "stopped,
not failed".
"""

from __future__ import annotations


class TrainingError(Exception):
  """An expected end of a training job: ``str(self)`` says what happened and what to do."""

  exit_code = 1


class RunDiverged(TrainingError, FloatingPointError):
  """The training loss diverged (or was NaN/Inf for too many steps in a row)."""

  exit_code = 1


class RunConfigChanged(TrainingError, ValueError):
  """The workdir holds a run whose config differs from this one; nothing was changed."""

  exit_code = 2


class CheckpointWriteError(TrainingError, OSError):
  """Saving a checkpoint (or the run's records) failed, e.g. for lack of space."""

  exit_code = 74


class WorkdirInUse(TrainingError):
  """Another job holds the workdir's lock."""

  exit_code = 75


class RunStopped(TrainingError):
  """The job was stopped by a signal after saving the step it reached.

  Attributes:
    signum: the signal (``signal.SIGTERM`` or ``signal.SIGINT``).
    step: the step saved.
  """

  def __init__(self, signum: int, step: int, message: str):
    super().__init__(message)
    self.signum = int(signum)
    self.step = int(step)

  @property
  def exit_code(self) -> int:  # type: ignore[override]
    return 128 + self.signum

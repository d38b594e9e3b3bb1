"""One training job per workdir: an advisory lock on ``<workdir>/job.lock``, held for the run.

The lock is ``flock`` on the file, so the kernel (or the NFSv4 server, by lease) releases it when
the holding process dies in any way, ``kill -9`` and a crashed host included: a later job finds
the file, takes the lock and reports that it took over from the dead job named in it. The file
names the holder (host, pid, start time) so that a refused job can say who runs there.

On a file system without ``flock`` (some FUSE mounts) the file alone is the lock: a holder on
this host whose pid is gone is stale and taken over; a holder on another host is only assumed
alive, and the message says to remove the file if that job is known to be dead.

A multi-process job shares one lock: process 0 takes it and tells every process the outcome,
so all of them refuse, or all go on.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from autosparse_jax.train.errors import WorkdirInUse

LOCK_FILE = "job.lock"


def _describe(holder: dict[str, Any]) -> str:
  started = holder.get("started")
  when = (
    time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started))
    if isinstance(started, int | float)
    else "at an unknown time"
  )
  return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {when}"


def _read(path: Path) -> dict[str, Any]:
  try:
    holder = json.loads(path.read_text() or "{}")
  except (OSError, ValueError):
    return {}
  return holder if isinstance(holder, dict) else {}


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class WorkdirLock:
  """The lock of ``workdir`` for this job (:meth:`acquire`, then :meth:`release`).

  Raises (from :meth:`acquire`):
    WorkdirInUse: another live job holds it; the message names that job.
  """

  def __init__(self, workdir: str | os.PathLike):
    self.path = Path(workdir) / LOCK_FILE
    self._fd: int | None = None

  def acquire(self) -> WorkdirLock:
    error = ""
    if jax.process_index() == 0:
      try:
        self._acquire_here()
      except WorkdirInUse as e:
        error = str(e)
    if jax.process_count() > 1:
      refused = multihost_utils.broadcast_one_to_all(np.int32(bool(error)))
      if int(refused) and not error:
        error = f"{self.path.parent} is in use by {_describe(_read(self.path))}"
    if error:
      raise WorkdirInUse(error)
    return self

  def _acquire_here(self) -> None:
    self.path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      flock = True
    except BlockingIOError:
      os.close(fd)
      raise WorkdirInUse(
        f"{self.path.parent} is in use by another training job: {_describe(_read(self.path))} "
        f"(lock {self.path}); wait for it to end or use another --workdir"
      ) from None
    except OSError as e:
      if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        os.close(fd)
        raise
      flock = False
    previous = _read(self.path)
    if previous and not flock and not self._stale_without_flock(previous):
      os.close(fd)
      raise WorkdirInUse(
        f"{self.path.parent} is in use by {_describe(previous)} (lock {self.path}, a file "
        "system without flock); if that job is dead, remove the lock file"
      )
    if previous:
      logging.warning(
        "workdir lock %s was left by a job that is gone (%s); taking it over",
        self.path,
        _describe(previous),
      )
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
    os.fsync(fd)
    self._fd = fd

  @staticmethod
  def _stale_without_flock(holder: dict[str, Any]) -> bool:
    if holder.get("host") != socket.gethostname():
      return False
    pid = holder.get("pid")
    return not isinstance(pid, int) or (pid != os.getpid() and not _pid_alive(pid))

  def release(self) -> None:
    """Empties the file (so that the next job sees no holder) and releases the lock."""
    if self._fd is None:
      return
    try:
      os.ftruncate(self._fd, 0)
    except OSError:
      pass  # a full disk cannot refuse a truncate, but a vanished mount can
    finally:
      os.close(self._fd)  # releases the flock
      self._fd = None

  def __enter__(self) -> WorkdirLock:
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()

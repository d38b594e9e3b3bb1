"""Metric writers (console, JSON lines, TensorBoard), a progress meter and the lines on stdout.

clu's ``metric_writers`` import TensorFlow; these follow their interface
(``write_scalars(step, scalars)``, ``write_hparams(hparams)``, ``flush()``, ``close()``):

* :class:`ConsoleWriter`: one absl log line per call; keys of per-layer statistics (those
  with a param path, ``sparsity/<path>``, ``tau/<path>``) are left out to keep it readable.
* :class:`JsonlWriter`: ``metrics.jsonl`` in the workdir, one strict JSON object per call,
  ``{"step": s, "time": unix seconds, <key>: value, ...}``, every key (NaN/Inf as ``null``).
  On resume it first drops the records of steps after the restored step, so that the file
  reads as one run, and writes back the records the checkpoint carries that a kill tore.
* :class:`TensorBoardWriter`: event files through the pure-Python ``tensorboard`` package
  (scalars and the hparams plugin). On resume it writes a ``SessionLog.START`` at the restored
  step, which makes TensorBoard discard the old events of later steps.

:func:`create_writers` gives all three on process 0 and nothing on the other processes.
"""

from __future__ import annotations

import json
import logging as logging_std
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from absl import logging

METRICS_FILE = "metrics.jsonl"
TIMING_KEYS = ("time", "train/steps_per_sec", "train/eta_seconds", "train/elapsed_seconds")
"""Record keys that depend on wall time (everything else in a record is deterministic)."""


class MetricWriter(Protocol):
  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None: ...

  def write_hparams(self, hparams: Mapping[str, Any]) -> None: ...

  def flush(self) -> None: ...

  def close(self) -> None: ...


def _to_float(value: Any) -> float:
  return float(np.asarray(value))


def is_per_layer(key: str) -> bool:
  """``sparsity/fc1/kernel`` and ``tau/fc1/kernel`` are per-layer; ``sparsity/total`` not."""
  return key.count("/") >= 2


class ConsoleWriter:
  """absl ``logging.info`` lines ``[step] key=value, ...`` (per-layer keys left out)."""

  def __init__(self, per_layer: bool = False):
    self.per_layer = per_layer

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    items = [
      f"{k}={_to_float(v):.6g}" for k, v in scalars.items() if self.per_layer or not is_per_layer(k)
    ]
    logging.info("[%d] %s", step, ", ".join(items))

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    logging.info("hparams: %s", ", ".join(f"{k}={v}" for k, v in hparams.items()))

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


def _strict(value: float) -> float | None:
  """NaN/Inf as JSON ``null`` (strict JSON has no NaN)."""
  return value if math.isfinite(value) else None


def read_jsonl(path: str | os.PathLike, warn: bool = True) -> list[dict[str, Any]]:
  """The records of a ``metrics.jsonl`` (``null`` values read as NaN); a line that is not JSON
  (torn by a killed writer) is skipped with a warning naming it."""
  records = []
  path = Path(path)
  if not path.exists():
    return records
  for number, line in enumerate(path.read_text().splitlines(), 1):
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      if warn:
        logging.warning("%s line %d is not a whole record (torn by a kill?); skipped", path, number)
      continue
    records.append({k: float("nan") if v is None else v for k, v in record.items()})
  return records


class JsonlWriter:
  """Appends one JSON object per ``write_scalars`` call to ``path`` (NaN/Inf as ``null``).

  Args:
    path: the file (created with its directory).
    resume_step: drop the existing records with ``step > resume_step`` first (a resumed run
      rewrites them); None keeps the file as it is.
    carried: the records written up to ``resume_step`` since the checkpoint before it (kept in
      the checkpoint): any of them missing from the file (a torn last line) is written back.

  :attr:`recent` lists the records written since :meth:`clear_recent`.
  """

  def __init__(
    self,
    path: str | os.PathLike,
    resume_step: int | None = None,
    carried: Sequence[Mapping[str, Any]] = (),
  ):
    self.path = Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self.recent: list[dict[str, Any]] = []
    if resume_step is not None and self.path.exists():
      lines = self.path.read_text().splitlines()
      read = read_jsonl(self.path)
      kept = [r for r in read if r.get("step", -1) <= resume_step]
      carried = [dict(r) for r in carried]
      as_read = [{k: float("nan") if v is None else v for k, v in r.items()} for r in carried]
      in_file, in_carried = _keys(kept), _keys(as_read)
      missing = [c for c, r in zip(carried, as_read, strict=True) if _key(r) not in in_file]
      if missing:
        logging.warning(
          "%s: %d record(s) up to step %d were lost or torn; written back from the checkpoint",
          self.path,
          len(missing),
          resume_step,
        )
      records = [r for r in kept if _key(r) not in in_carried] + carried
      records.sort(key=lambda r: r["step"])
      if len(records) != len(lines) or missing:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(json.dumps(_null_nan(r)) + "\n" for r in records))
        os.replace(tmp, self.path)
    self._file = open(self.path, "a")  # noqa: SIM115 -- closed in close()

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    record = {"step": int(step), "time": time.time()}
    record.update({k: _strict(_to_float(v)) for k, v in scalars.items()})
    self._file.write(json.dumps(record, allow_nan=False) + "\n")
    self.recent.append(record)

  def clear_recent(self) -> None:
    self.recent = []

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    del hparams  # the workdir's config.json holds them

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    if not self._file.closed:
      self._file.close()


def _null_nan(record: Mapping[str, Any]) -> dict[str, Any]:
  return {k: _strict(v) if isinstance(v, float) else v for k, v in record.items()}


def _key(record: Mapping[str, Any]) -> str:
  """A record's identity (NaN equal to NaN)."""
  return json.dumps(_null_nan(record), sort_keys=True)


def _keys(records: Sequence[Mapping[str, Any]]) -> set[str]:
  return {_key(r) for r in records}


class TensorBoardWriter:
  """TensorBoard event files in ``logdir`` (needs the ``tensorboard`` package, not TF)."""

  def __init__(self, logdir: str | os.PathLike, resume_step: int | None = None):
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    self._event_pb2 = event_pb2
    self._summary_pb2 = summary_pb2
    self._writer = EventFileWriter(os.fspath(logdir))
    if resume_step:
      # Tells TensorBoard to discard events of steps >= resume_step + 1 from the old run.
      self._add(
        event_pb2.Event(
          step=int(resume_step) + 1,
          session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START),
        )
      )

  def _add(self, event) -> None:
    event.wall_time = time.time()
    self._writer.add_event(event)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    values = [
      self._summary_pb2.Summary.Value(tag=k, simple_value=_to_float(v)) for k, v in scalars.items()
    ]
    self._add(
      self._event_pb2.Event(step=int(step), summary=self._summary_pb2.Summary(value=values))
    )

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    from tensorboard.plugins.hparams import summary_v2 as hp

    clean = {
      k: v if isinstance(v, bool | int | float | str) else str(v) for k, v in hparams.items()
    }
    self._add(self._event_pb2.Event(step=0, summary=hp.hparams_pb(clean)))

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


class MultiWriter:
  """Forwards every call to each of ``writers``."""

  def __init__(self, writers: Sequence[MetricWriter]):
    self.writers = list(writers)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    for w in self.writers:
      w.write_scalars(step, scalars)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    for w in self.writers:
      w.write_hparams(hparams)

  def flush(self) -> None:
    for w in self.writers:
      w.flush()

  def close(self) -> None:
    for w in self.writers:
      w.close()

  @property
  def recent_records(self) -> list[dict[str, Any]]:
    """The ``metrics.jsonl`` records written since :meth:`clear_recent` (none off process 0)."""
    return [r for w in self.writers if isinstance(w, JsonlWriter) for r in w.recent]

  def clear_recent(self) -> None:
    for w in self.writers:
      if isinstance(w, JsonlWriter):
        w.clear_recent()


def create_writers(
  workdir: str | os.PathLike,
  *,
  process_index: int = 0,
  resume_step: int | None = None,
  carried: Sequence[Mapping[str, Any]] = (),
  tensorboard: bool = True,
) -> MultiWriter:
  """Console + ``metrics.jsonl`` (``carried`` as in :class:`JsonlWriter`) + TensorBoard on
  process 0; no writer elsewhere.

  TensorBoard is skipped with a warning when the ``tensorboard`` package is missing.
  """
  if process_index != 0:
    return MultiWriter([])
  writers: list[MetricWriter] = [
    ConsoleWriter(),
    JsonlWriter(Path(workdir) / METRICS_FILE, resume_step, carried),
  ]
  if tensorboard:
    try:
      writers.append(TensorBoardWriter(workdir, resume_step))
    except ImportError:
      logging.warning("tensorboard is not installed: no event files (pip install tensorboard)")
  return MultiWriter(writers)


class _LibraryFilter(logging_std.Filter):
  NOISY = (f"{os.sep}orbax{os.sep}", f"{os.sep}jax{os.sep}_src{os.sep}")

  def filter(self, record: logging_std.LogRecord) -> bool:
    if not any(n in record.pathname for n in self.NOISY):
      return True
    if record.levelno < logging_std.WARNING:
      return False
    if record.exc_info or record.exc_text or "\n" in record.getMessage():
      # orbax logs each failure of its background threads with a traceback; the failure
      # reaches the caller as an exception, which says what happened in one line.
      record.msg, record.args = record.getMessage().splitlines()[0][:300], ()
      record.exc_info, record.exc_text = None, None
    return True


def quiet_library_logs() -> None:
  """Hides orbax's and jax's INFO lines (one per save, compile, ...) from the absl handler and
  the root logger's, and shortens their warnings and errors to one line without traceback."""
  for handler in (logging.get_absl_handler(), *logging_std.getLogger().handlers):
    if not any(isinstance(f, _LibraryFilter) for f in handler.filters):
      handler.addFilter(_LibraryFilter())


def say(text: str) -> None:
  """Prints a line a person reads (progress, the summary) on stdout, flushed; logs and errors
  go to stderr."""
  print(text, flush=True)


def format_duration(seconds: float) -> str:
  """``3725`` -> ``'1h02m05s'``."""
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
  """Steps per second and time to go, measured between calls.

  Call :meth:`mark` after the first step (mostly compilation) so that the first rate is the
  steady state.
  """

  def __init__(self, total_steps: int):
    self.total_steps = int(total_steps)
    self._start = time.monotonic()
    self._last: tuple[int, float] | None = None

  def mark(self, step: int) -> None:
    """Starts the next measurement at ``step`` (e.g. after the compiling first step)."""
    self._last = (int(step), time.monotonic())

  def update(self, step: int) -> dict[str, float]:
    """Scalars for step ``step`` (steps done): steps/s since the last call and the ETA."""
    now = time.monotonic()
    out = {"train/elapsed_seconds": now - self._start}
    if self._last is not None and step > self._last[0] and now > self._last[1]:
      rate = (step - self._last[0]) / (now - self._last[1])
      out["train/steps_per_sec"] = rate
      out["train/eta_seconds"] = (self.total_steps - step) / rate
    self._last = (int(step), now)
    return out

  def line(self, step: int, scalars: Mapping[str, float]) -> str:
    """``step 200/1000 (20.0%): loss 0.312, accuracy 91.4%, sparsity 45.1%, 35.1 steps/s, ETA
    22s`` (the loss, accuracy and sparsity where ``scalars`` has them)."""
    text = f"step {step}/{self.total_steps} ({100.0 * step / max(self.total_steps, 1):.1f}%)"
    shown = [
      f"{name} {fmt(scalars[key])}"
      for name, key, fmt in (
        ("loss", "train/loss", lambda v: f"{v:.4g}"),
        ("accuracy", "train/accuracy", lambda v: f"{100 * v:.1f}%"),
        ("sparsity", "sparsity/total", lambda v: f"{100 * v:.1f}%"),
      )
      if key in scalars
    ]
    if shown:
      text += ": " + ", ".join(shown)
    if "train/steps_per_sec" in scalars:
      text += f", {scalars['train/steps_per_sec']:.3g} steps/s"
      text += f", ETA {format_duration(scalars['train/eta_seconds'])}"
    return text

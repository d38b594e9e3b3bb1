"""What makes a resumed run the same run: the config check, and what a checkpoint carries.

**The config.** A workdir's ``config.json`` is its run's config, written once. A job started on
a workdir that holds one with another config is refused (:class:`RunConfigChanged`, listing
the fields that differ) before anything is written, deleted or relabelled; fields that change
where or how the run executes but not what it computes (:data:`OPERATIONAL_FIELDS`) may
differ. The one documented change is ``extend``: a longer run (``num_epochs`` or
``num_train_steps`` raised, nothing else changed) continues from the newest checkpoint with the
schedules of the new length; the earlier ``config.json`` and ``summary.*`` are kept as
``config.until-step-<S>.json`` and ``summary.until-step-<S>.*`` (``S`` the earlier length).

**The carry.** A checkpoint's meta holds, besides the state, what the loop's reports need to go
on as if never stopped (:func:`carry` and :func:`restore_carry`): the per-step metrics of the
log window in progress (so that the first record after a resume averages the same steps), the
last logged training metrics (for the summary of a run resumed after its final checkpoint),
the training-cost meter, and the ``metrics.jsonl`` records written since the previous
checkpoint (to repair a record torn or lost by a kill).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import jax
import ml_collections
from absl import logging

from autosparse_jax.train import config_lib
from autosparse_jax.train.errors import RunConfigChanged
from autosparse_jax.train.experiment import total_train_steps

CONFIG_FILE = "config.json"
OPERATIONAL_FIELDS = (
  "data_dir",
  "num_workers",
  "num_devices",
  "sharding",
  "fsdp_min_size",
  "checkpoint_every_steps",
  "keep_checkpoints",
  "tensorboard",
)
"""Config fields a resumed run may change: where the data is, devices, sharding, checkpoints."""
LENGTH_FIELDS = ("num_epochs", "num_train_steps")
"""Config fields that ``extend`` may raise."""
ARCHIVED = (CONFIG_FILE, "summary.json", "summary.txt")


def _flat(config_json: str) -> dict[str, Any]:
  def flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
      if isinstance(v, dict) and v:
        out.update(flatten(v, f"{prefix}{k}."))
      else:
        out[f"{prefix}{k}"] = v
    return out

  # Through the same parser, so that a stored and a given config compare alike (tuples, None).
  config = config_lib.config_from_json(config_json)
  return flatten(json.loads(config.to_json_best_effort()))


def write_config(workdir: Path, config: ml_collections.ConfigDict) -> None:
  """Writes ``<workdir>/config.json`` (atomically) if there is none."""
  path = workdir / CONFIG_FILE
  if path.exists():
    return
  tmp = path.with_name(f".{CONFIG_FILE}.tmp")
  tmp.write_text(config.to_json_best_effort(indent=2) + "\n")
  os.replace(tmp, path)


def check_same_run(
  workdir: Path,
  config: ml_collections.ConfigDict,
  steps_per_epoch: int,
  extend: bool,
  archive: bool = True,
) -> None:
  """Refuses a config that differs from the workdir's run (see the module docstring); with
  ``extend`` and only a longer run asked for, keeps the earlier config and summary aside (if
  ``archive``; without, nothing is written: a check before taking the workdir's lock).

  Raises:
    RunConfigChanged: the fields that differ, and how to start a new run or extend this one.
  """
  path = workdir / CONFIG_FILE
  if not path.exists():
    return
  text = path.read_text()
  stored, given = _flat(text), _flat(config.to_json_best_effort())
  differ = sorted(
    k
    for k in stored.keys() | given.keys()
    if stored.get(k) != given.get(k) and k not in OPERATIONAL_FIELDS
  )
  if not differ:
    return
  before = total_train_steps(config_lib.config_from_json(text), steps_per_epoch)
  after = total_train_steps(config, steps_per_epoch)
  if extend and set(differ) <= set(LENGTH_FIELDS) and after > before:
    if not archive:
      return
    if jax.process_index() == 0:
      for name in ARCHIVED:
        stem, _, suffix = name.rpartition(".")
        if (workdir / name).exists():
          os.replace(workdir / name, workdir / f"{stem}.until-step-{before}.{suffix}")
    logging.warning(
      "extending the run in %s from %d to %d steps (the schedules follow the new length from "
      "the newest checkpoint on); its earlier config and summary are kept as "
      "*.until-step-%d.*",
      workdir,
      before,
      after,
      before,
    )
    return
  listed = "; ".join(f"config.{k}: run {stored.get(k)!r}, now {given.get(k)!r}" for k in differ)
  hint = (
    "to train it longer, change only num_epochs or num_train_steps and pass extend=True "
    "(the command's --extend)"
  )
  if extend:
    hint = f"extend only raises num_epochs or num_train_steps ({before} steps now, {after} asked)"
  raise RunConfigChanged(
    f"{workdir} holds a run with another config ({listed}); nothing was changed. "
    f"Use another --workdir for a new run, or the run's own config ({path}); {hint}"
  )


class Carry(NamedTuple):
  """What a checkpoint carries for the loop's reports (see the module docstring)."""

  window: list[dict[str, float]]
  last_train: dict[str, float]
  cost_meter: dict[str, float] | None
  records: list[dict[str, Any]]


def carry(
  window: list[dict[str, Any]], last_train: dict[str, float], meter, records: list[dict]
) -> dict[str, Any]:
  """The meta entries of a checkpoint (``window``: this log window's per-step metrics, on
  device; ``meter``: a ``RunningTrainingCost`` or None; ``records``: the ``metrics.jsonl``
  records since the previous checkpoint)."""
  fetched = jax.device_get(window)
  return {
    "log_window": [{k: float(v) for k, v in m.items()} for m in fetched],
    "last_train": dict(last_train),
    "cost_meter": None
    if meter is None
    else {"cost": meter.cost, "steps": meter.steps, "last_step": meter.last_step},
    "records": list(records),
  }


def restore_carry(meta: dict[str, Any]) -> Carry:
  """:func:`carry`'s entries from a restored checkpoint's meta (empty where absent)."""
  return Carry(
    window=list(meta.get("log_window", [])),
    last_train=dict(meta.get("last_train", {})),
    cost_meter=meta.get("cost_meter"),
    records=list(meta.get("records", [])),
  )

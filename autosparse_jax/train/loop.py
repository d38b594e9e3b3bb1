"""The training loop: ``train_and_evaluate(config, workdir)``.

One jitted step over a device mesh (data parallel, or FSDP with ``config.sharding='fsdp'``),
global batches assembled from each process's rows, warmup + cosine learning rate, label
smoothing, weight decay on kernels, batch norm, optional bfloat16 compute, evaluation every
``eval_every_epochs``, orbax checkpoints with automatic resume, metric writers, and a final
summary in the workdir. The optimizer is ``autosparse.optax_chain(base, method)`` built from the
config by :mod:`autosparse_jax.train.optim`; ``method='dense'`` is the dense baseline.

Everything in a run is a function of the config and the step: the data pipeline is indexed by
the global step, and the step function derives any randomness from ``fold_in(seed, step)``. So
a run resumed from a checkpoint continues exactly as the uninterrupted run would have (bitwise
on the same hardware and device count), and reports the same records and summary (what the
reports need travels in the checkpoint: :mod:`autosparse_jax.train.resume`).

One job per workdir (:mod:`autosparse_jax.train.lock`); a workdir's run keeps its config
(:func:`autosparse_jax.train.resume.check_same_run`). A job ends on purpose with one of
:mod:`autosparse_jax.train.errors` (a signal, a diverged loss, a failed save, ...).

Workdir layout: ``checkpoints/<step>/``, ``config.json``, ``job.lock``, ``metrics.jsonl``,
TensorBoard ``events.out.tfevents.*``, ``parameter_overview.txt``, ``summary.json``,
``summary.txt``, ``sparsity_per_layer.png``, ``training_curves.png``.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import ml_collections
from absl import logging

from autosparse_jax.selection import path_string
from autosparse_jax.train import checkpoint, compiled, config_lib, lock, logs, resume, sharding
from autosparse_jax.train.compiled import evaluate
from autosparse_jax.train.errors import (
  CheckpointWriteError,
  RunConfigChanged,
  RunDiverged,
  RunStopped,
)
from autosparse_jax.train.experiment import (
  Experiment,
  build_experiment,
  experiment_info,
  training_cost_meter,
)
from autosparse_jax.train.plots import write_plots
from autosparse_jax.train.summary import (
  SUMMARY_JSON,
  SUMMARY_TXT,
  build_summary,
  write_summary,
)


def _flat_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  def flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
      if isinstance(v, dict):
        out.update(flatten(v, f"{prefix}{k}."))
      else:
        out[f"{prefix}{k}"] = v
    return out

  return flatten(config.to_dict())


def _check_resumable(stored: dict[str, Any], config: ml_collections.ConfigDict, workdir) -> None:
  current = config_lib.run_identity(config)
  differ = {k: (stored.get(k), v) for k, v in current.items() if stored.get(k) != v}
  if differ:
    details = ", ".join(f"config.{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in differ.items())
    raise RunConfigChanged(
      f"{workdir} holds a checkpoint of a different run ({details}); use another --workdir "
      "or the same settings"
    )


DIVERGED_LOSS_FACTOR = 100.0
"""A log window whose mean training loss exceeds this many times ``ln(num_classes)`` (the loss
of a uniform guess) stops the run as diverged (:class:`RunDiverged`)."""


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  stop_at_step: int | None = None,
  extend: bool = False,
) -> dict[str, float]:
  """Trains and evaluates the experiment of ``config``, resuming from ``workdir`` if it holds a
  checkpoint.

  Args:
    config: the experiment (see :func:`autosparse_jax.train.config_lib.base_config`).
    workdir: where checkpoints, metrics, TensorBoard events and the summary go. One job at a
      time (``<workdir>/job.lock``).
    stop_at_step: return after this global step as a killed job would (no final checkpoint,
      evaluation or summary); the next call resumes from the latest checkpoint.
    extend: the workdir's run may be continued with a larger ``num_epochs`` or
      ``num_train_steps`` (see :mod:`autosparse_jax.train.resume`).

  Returns:
    The final metrics: ``eval/accuracy``, ``eval/loss`` (``eval/top5_accuracy``),
    ``train/loss``, ``train/accuracy``, ``sparsity/total``, ``sparsity/<kernel>``,
    ``tau/<kernel>`` and ``alpha`` where the method has them, and ``step``. After
    ``stop_at_step``: the last logged metrics.

  Raises:
    ValueError: a bad config field (before anything is compiled or written).
    RunConfigChanged: the workdir holds a run with another config (nothing is written).
    WorkdirInUse: another job runs on the workdir.
    RunStopped: SIGTERM or SIGINT; the step reached was saved first.
    RunDiverged: the loss diverged or was NaN/Inf too long.
    CheckpointWriteError: a save failed (e.g. no space left); earlier checkpoints are intact.
  """
  started = time.time()
  if "://" in str(workdir):
    raise ValueError(
      f"workdir={workdir!r}: URLs are not supported; mount the bucket (e.g. gcsfuse) or use a "
      "shared file system and pass its path"
    )
  exp = build_experiment(config)
  workdir = Path(workdir)
  resume.check_same_run(workdir, config, exp.steps_per_epoch, extend, archive=False)
  job_lock = lock.WorkdirLock(workdir).acquire()
  try:
    resume.check_same_run(workdir, config, exp.steps_per_epoch, extend)
    ckpt = checkpoint.Checkpointer(
      workdir, config.checkpoint_every_steps, config.keep_checkpoints, training=True
    )
    try:
      outcome = _train_loop(exp, workdir, ckpt, stop_at_step)
    finally:
      ckpt.close()
    if ckpt.stop_signal is not None and not outcome.finished:
      name = signal.Signals(ckpt.stop_signal).name
      raise RunStopped(
        ckpt.stop_signal,
        outcome.step,
        f"stopped by {name} at step {outcome.step}, saved in {ckpt.directory}/{outcome.step}; "
        "the same command resumes",
      )
    if not outcome.finished:
      return outcome.last_train
    return _finish(exp, workdir, outcome, time.time() - started)
  finally:
    job_lock.release()


def _finish(exp: Experiment, workdir: Path, outcome, seconds: float) -> dict[str, float]:
  """The result dict, and the summary and plots (unless the run had finished before)."""
  total = exp.total_steps
  shapes = {
    path_string(p): tuple(x.shape)
    for p, x in jax.tree_util.tree_flatten_with_path(exp.abstract_state.params)[0]
  }
  summary = build_summary(
    experiment=experiment_info(exp, total),
    shapes=shapes,
    dense_macs=exp.dense_macs,
    nonzero=outcome.nonzero,
    summary=outcome.state_summary,
    eval_metrics=outcome.eval_metrics,
    train_metrics=outcome.last_train,
    wall_time=seconds + outcome.earlier_seconds,
    training_cost_ratio=outcome.training_ratio,
  )
  result = {
    **outcome.eval_metrics,
    **outcome.state_summary,
    **{k: v for k, v in outcome.last_train.items() if k in ("train/loss", "train/accuracy")},
    "step": float(total),
  }
  result.pop("epoch", None)
  if "inference_macs" in summary:
    result["inference_macs/ratio"] = summary["inference_macs"]["ratio"]
  if "training_cost" in summary:
    result["training_cost/ratio"] = summary["training_cost"]["ratio"]
  if jax.process_index() == 0:
    if outcome.start_step == total and (workdir / SUMMARY_JSON).exists():
      logging.info("the run in %s had finished: %s is left as it is", workdir, SUMMARY_JSON)
      return result
    text = write_summary(workdir, summary)
    logs.say(f"\n{text.rstrip()}\n(written to {workdir / SUMMARY_TXT})")
    try:
      write_plots(workdir, summary, logs.read_jsonl(workdir / logs.METRICS_FILE))
    except Exception as e:  # noqa: BLE001 -- the plots are a report, not the training
      logging.warning("could not write the plots: %s", e)
  return result


class _LoopOutcome(NamedTuple):
  """What the loop leaves: ``finished`` False when stopped early (then only ``last_train``)."""

  finished: bool
  last_train: dict[str, float]
  step: int
  start_step: int
  earlier_seconds: float = 0.0  # wall time of the runs before a resume, up to their checkpoint
  eval_metrics: dict[str, float] = {}
  state_summary: dict[str, float] = {}
  nonzero: dict[str, int] = {}
  training_ratio: float | None = None


def _train_loop(
  exp: Experiment, workdir: Path, ckpt: checkpoint.Checkpointer, stop_at_step: int | None
) -> _LoopOutcome:
  """Restores or initialises the state, trains to the end (or ``stop_at_step``, or a
  preemption), evaluates, and measures the final sparsity."""
  config = exp.config
  target = sharding.with_shardings(exp.abstract_state, exp.state_shardings)
  with jax.set_mesh(exp.mesh):
    restored = ckpt.restore_newest(
      target, lambda meta: _check_resumable(meta.get("run", {}), config, workdir)
    )

  is_main = jax.process_index() == 0
  logging.info(
    "devices: %d (%s), processes: %d, mesh %s, sharding %s",
    jax.device_count(),
    jax.devices()[0].platform,
    jax.process_count(),
    dict(exp.mesh.shape),
    config.sharding,
  )
  logging.info("train: %s; eval: %s", exp.train_ds, exp.eval_ds)
  fns = compiled.compile_functions(exp)
  total = exp.total_steps
  if restored is not None:
    state, meta = restored
    start_step = int(meta["data_step"])
    earlier = float(meta.get("wall_time_seconds", 0.0))
    logging.info("resuming from %s/%d", ckpt.directory, start_step)
    if int(state.step) != start_step:
      raise ValueError(f"checkpoint {start_step}: state step {int(state.step)} != data step")
    if start_step > total:
      raise RunConfigChanged(
        f"{ckpt.directory} holds step {start_step}, past this config's {total} steps; use "
        "another --workdir or the run's own config"
      )
    carried = resume.restore_carry(meta)
  else:
    with jax.set_mesh(exp.mesh):
      state = fns.init(jax.random.key(config.seed))
    start_step, earlier = 0, 0.0
    carried = resume.Carry([], {}, None, [])
  started = time.time()

  writer = logs.create_writers(
    workdir,
    process_index=jax.process_index(),
    resume_step=start_step,
    carried=carried.records,
    tensorboard=config.tensorboard,
  )
  if is_main:
    resume.write_config(workdir, config)
    overview = _parameter_overview(exp.abstract_state.params, exp.state_shardings.params)
    (workdir / "parameter_overview.txt").write_text(overview + "\n")
    logging.info("parameters:\n%s", overview)
  writer.write_hparams(_flat_config(config))

  meta_run = config_lib.run_identity(config)
  progress = logs.Progress(total)
  cost_meter = _training_cost_meter(exp, carried.cost_meter)
  window: list[dict[str, Any]] = list(carried.window)
  last: dict[str, float] = dict(carried.last_train)

  def meta_at(step: int) -> dict[str, Any]:
    """A checkpoint's metadata: the data position, the run's identity, the time spent, and
    what the reports carry across a resume."""
    seconds = earlier + time.time() - started
    return {
      "step": step,
      "data_step": step,
      "run": meta_run,
      "wall_time_seconds": seconds,
      **resume.carry(window, last, cost_meter, writer.recent_records),
    }

  def save(step: int, force: bool = False) -> None:
    if ckpt.save(step, state, meta_at(step), force=force):
      writer.clear_recent()
      _flush(writer, ckpt)  # the records up to a checkpoint survive a kill

  logging.info(
    "training %s %s on %s for %d steps (%d per epoch), from step %d",
    config.method,
    config.model,
    config.dataset,
    total,
    exp.steps_per_epoch,
    start_step,
  )
  diverged_loss = DIVERGED_LOSS_FACTOR * math.log(max(exp.train_ds.num_classes, 2))
  eval_metrics: dict[str, float] = {}
  eval_step_done = -1
  train_iter = exp.train_ds.iterate(start_step)
  step = start_step
  try:
    with jax.set_mesh(exp.mesh):
      for step in range(start_step + 1, total + 1):
        batch = sharding.global_batch(next(train_iter), exp.mesh)
        state, metrics = fns.train(state, batch)
        window.append(metrics)
        if step == start_step + 1:
          jax.block_until_ready(metrics)
          progress.mark(step)
        if step % config.log_every_steps == 0 or step == total:
          scalars = compiled.mean_train_metrics(window)
          window = []
          scalars.update({k: float(v) for k, v in jax.device_get(fns.summary(state)).items()})
          scalars.update(_flop_scalars(exp, cost_meter, step, scalars))
          in_a_row, total_skipped = jax.device_get(
            (state.nonfinite_in_a_row, state.nonfinite_total)
          )
          scalars["train/nonfinite_skipped"] = float(total_skipped)
          timing = progress.update(step)
          writer.write_scalars(step, {**scalars, **timing})
          if is_main:
            logs.say(progress.line(step, {**scalars, **timing}))
          last = scalars
          _check_divergence(step, scalars, in_a_row, diverged_loss, config, ckpt)
        if step % exp.eval_every_steps == 0 or step == total:
          eval_metrics = evaluate(fns.eval, state, exp.eval_ds, exp.mesh, config.num_eval_steps)
          eval_metrics["epoch"] = step / exp.steps_per_epoch
          writer.write_scalars(step, eval_metrics)
          eval_step_done = step
        save(step, force=step == total)
        if ckpt.preempted(step):
          save(step, force=True)
          logging.warning(
            "preempted at step %d: checkpoint saved, stopping; the same command resumes", step
          )
          return _LoopOutcome(False, last, step, start_step, earlier)
        if stop_at_step is not None and step >= stop_at_step:
          return _LoopOutcome(False, last, step, start_step, earlier)
      _flush(writer, ckpt)
      if eval_step_done != total:
        eval_metrics = evaluate(fns.eval, state, exp.eval_ds, exp.mesh, config.num_eval_steps)
      final_summary = {k: float(v) for k, v in jax.device_get(fns.summary(state)).items()}
      nonzero = {k: int(v) for k, v in jax.device_get(fns.nonzero(state.params)).items()}
  finally:
    train_iter.close()
    if sys.exc_info()[1] is None:
      _flush(writer, ckpt, close=True)
    else:  # an error in flight (a full disk, say) tells what happened; this would hide it
      try:
        writer.close()
      except OSError as e:
        logging.warning("the metric files could not be closed either: %s", e)
  training_ratio = cost_meter.ratio if cost_meter is not None and cost_meter.steps else None
  return _LoopOutcome(
    True, last, total, start_step, earlier, eval_metrics, final_summary, nonzero, training_ratio
  )


def _flush(writer: logs.MultiWriter, ckpt: checkpoint.Checkpointer, close: bool = False) -> None:
  """``writer.flush()`` (or ``close()``); a failure (a full disk) as one CheckpointWriteError."""
  try:
    writer.close() if close else writer.flush()
  except OSError as e:
    raise CheckpointWriteError(
      f"writing the metrics in {ckpt.workdir} failed: {e.strerror or e}; the checkpoints in "
      f"{ckpt.directory} are intact and the same command resumes from the newest"
    ) from None


def _check_divergence(step, scalars, in_a_row, diverged_loss, config, ckpt) -> None:
  """Raises :class:`RunDiverged` for too many NaN/Inf steps in a row or a diverged loss."""
  newest = f"the newest checkpoint ({ckpt.latest_step()}) is from before"
  if in_a_row >= config.max_consecutive_nonfinite:
    raise RunDiverged(
      f"step {step}: the loss, a gradient or an update was NaN/Inf for {int(in_a_row)} "
      f"steps in a row (config.max_consecutive_nonfinite = "
      f"{config.max_consecutive_nonfinite}); those steps were skipped, so the params and "
      "the last checkpoint are finite. "
      "Lower the learning rate, check the data, or raise the limit."
    )
  loss = scalars.get("train/loss", 0.0)
  if math.isfinite(loss) and loss > diverged_loss:
    raise RunDiverged(
      f"step {step}: the training loss diverged (mean {loss:.4g} over the last log window, "
      f"above {DIVERGED_LOSS_FACTOR:g} x ln(classes) = {diverged_loss:.4g}); {newest}. "
      "Lower the learning rate or check the data."
    )


def _training_cost_meter(exp: Experiment, carried: dict[str, float] | None):
  """The run's :class:`~autosparse_jax.flops.RunningTrainingCost` (None without MAC counts);
  a resumed run takes it from its checkpoint."""
  if not exp.dense_macs:
    return None
  meter = training_cost_meter(exp.config, exp.dense_macs)
  if carried is not None:
    meter.cost, meter.steps = carried["cost"], carried["steps"]
    meter.last_step = carried["last_step"]
  return meter


def _flop_scalars(exp: Experiment, meter, step: int, scalars: dict[str, float]) -> dict:
  """``flops/inference_ratio`` and ``flops/training_ratio`` from the logged ``sparsity/<path>``
  (and ``alpha``) of this log step; nothing without MAC counts."""
  from autosparse_jax import flops

  if meter is None:
    return {}
  density = flops.densities_from_record(scalars)
  return {
    "flops/inference_ratio": flops.inference_ratio_from_density(exp.dense_macs, density),
    "flops/training_ratio": meter.update(step, density, scalars.get("alpha")),
  }


def _parameter_overview(abstract_params: Any, shardings: Any) -> str:
  """clu's parameter table (name, shape, dtype, size) and the prunable kernel count."""
  from clu import parameter_overview

  table = parameter_overview.get_parameter_overview(abstract_params, include_stats=False)
  kernels = [x for x in jax.tree.leaves(abstract_params) if len(x.shape) >= 2]
  count = sum(math.prod(x.shape) for x in kernels)
  sharded = sum(1 for s in jax.tree.leaves(shardings) if not s.is_fully_replicated)
  return (
    f"{table}\nKernels (ndim >= 2): {len(kernels)}, {count:,} weights; sharded params: {sharded}"
  )

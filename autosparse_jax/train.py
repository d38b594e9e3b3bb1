"""The training loop: ``train_and_evaluate(config, workdir)``.

One jitted step over a device mesh (data parallel, or FSDP with ``config.sharding='fsdp'``),
global batches assembled from each process's rows, warmup + cosine learning rate, label
smoothing, weight decay on kernels, batch norm, optional bfloat16 compute, evaluation every
``eval_every_epochs``, orbax checkpoints with automatic resume, metric writers, and a final
summary in the workdir. The optimizer is ``autosparse.optax_chain(base, method)`` built from the
config by :mod:`autosparse_jax.optim`; ``method='dense'`` is the dense baseline.

Everything in a run is a function of the config and the step: the data pipeline is indexed by
the global step, and the step function derives any randomness from ``fold_in(seed, step)``. So
a run resumed from a checkpoint continues exactly as the uninterrupted run would have (bitwise
on the same hardware and device count).

Workdir layout: ``checkpoints/<step>/``, ``config.json``, ``metrics.jsonl``, TensorBoard
``events.out.tfevents.*``, ``parameter_overview.txt``, ``summary.json``, ``summary.txt``,
``sparsity_per_layer.png``, ``training_curves.png``.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

import autosparse_jax as autosparse
from autosparse_jax import checkpoint, config_lib, data, logs, optim, report, sharding
from autosparse_jax.models import get_model
from autosparse_jax.selection import path_string


class TrainState(NamedTuple):
  """Everything a training run carries from step to step (and checkpoints).

  Attributes:
    step: int32 scalar, the number of steps taken (also the data position).
    params: the model's params, the sparse effective weights.
    batch_stats: batch-norm running statistics (``{}`` for models without batch norm).
    opt_state: the optimizer state (latent weights, thresholds, momenta, ...).
    nonfinite_in_a_row: int32, steps skipped in a row because the loss or a gradient was
      NaN/Inf (reset by a finite step).
    nonfinite_total: int32, all steps skipped so far.
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  nonfinite_in_a_row: jax.Array
  nonfinite_total: jax.Array


def _variables(params: Any, batch_stats: Any) -> dict[str, Any]:
  return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def create_train_state(
  rng: jax.Array, model: nn.Module, tx: autosparse.SparseTransformation, input_shape: tuple
) -> TrainState:
  """A fresh state: ``model.init`` on one example of ``input_shape`` (H, W, C), ``tx.init``,
  and params that are already the effective weights of step 0 (``tx.effective_params``)."""
  variables = model.init(rng, jnp.zeros((1, *input_shape), jnp.float32), train=False)
  opt_state = tx.init(variables["params"])
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=tx.effective_params(variables["params"], opt_state),
    batch_stats=variables.get("batch_stats", {}),
    opt_state=opt_state,
    nonfinite_in_a_row=jnp.zeros((), jnp.int32),
    nonfinite_total=jnp.zeros((), jnp.int32),
  )


def cross_entropy_loss(
  logits: jax.Array, labels: jax.Array, num_classes: int, label_smoothing: float = 0.0
) -> jax.Array:
  """Mean softmax cross-entropy against (smoothed) one-hot labels."""
  targets = jax.nn.one_hot(labels, num_classes)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  *,
  apply_fn: Callable,
  tx: optax.GradientTransformation,
  learning_rate_fn: optax.Schedule,
  num_classes: int,
  label_smoothing: float = 0.0,
  seed: int = 0,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on ``batch`` (``image``, ``label``); returns the state and metrics.

  Metrics: ``train/loss`` (with label smoothing), ``train/accuracy`` (top-1 on the batch),
  ``train/learning_rate`` (the rate this step used). Randomness (e.g. dropout) comes from
  ``fold_in(key(seed), step)``: a function of the step only.
  """
  rng = jax.random.fold_in(jax.random.key(seed), state.step)

  def loss_fn(params):
    out = apply_fn(
      _variables(params, state.batch_stats),
      batch["image"],
      train=True,
      mutable=["batch_stats"] if state.batch_stats else False,
      rngs={"dropout": rng},
    )
    logits, new_model_state = out if state.batch_stats else (out, {})
    loss = cross_entropy_loss(logits, batch["label"], num_classes, label_smoothing)
    return loss, (logits, new_model_state)

  (loss, (logits, new_model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # A NaN/Inf loss, gradient or update skips the step: params, batch statistics and the
  # optimizer state (latent weights, thresholds) stay as they were; the data moves on.
  finite = jnp.isfinite(loss) & jnp.all(
    jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves((grads, updates))])
  )
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
  skipped = (~finite).astype(jnp.int32)
  new_state = TrainState(
    step=state.step + 1,
    params=keep(params, state.params),
    batch_stats=keep(new_model_state.get("batch_stats", state.batch_stats), state.batch_stats),
    opt_state=keep(opt_state, state.opt_state),
    nonfinite_in_a_row=jnp.where(finite, 0, state.nonfinite_in_a_row + 1),
    nonfinite_total=state.nonfinite_total + skipped,
  )
  metrics = {
    "train/loss": loss,
    "train/accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
    "train/learning_rate": jnp.asarray(learning_rate_fn(state.step), jnp.float32),
  }
  return new_state, metrics


def eval_step(
  state: TrainState, batch: dict[str, jax.Array], *, apply_fn: Callable, num_classes: int
) -> dict[str, jax.Array]:
  """Sums over the real rows of ``batch`` (``mask`` = 1): loss, top-1 and top-5 hits, count."""
  logits = apply_fn(_variables(state.params, state.batch_stats), batch["image"], train=False)
  mask = batch.get("mask", jnp.ones(batch["label"].shape, jnp.float32))
  labels = batch["label"]
  loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  out = {
    "loss": jnp.sum(loss * mask),
    "correct": jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
    "count": jnp.sum(mask),
  }
  if num_classes > 5:
    top5 = jax.lax.top_k(logits, 5)[1]
    out["correct_top5"] = jnp.sum(jnp.any(top5 == labels[:, None], axis=-1) * mask)
  return out


def summarize_eval(sums: list[dict[str, Any]]) -> dict[str, float]:
  """``eval/loss``, ``eval/accuracy``, ``eval/top5_accuracy`` from :func:`eval_step` sums."""
  total = {k: float(np.sum([np.float64(s[k]) for s in sums])) for k in sums[0]}
  count = max(total["count"], 1.0)
  out = {
    "eval/loss": total["loss"] / count,
    "eval/accuracy": total["correct"] / count,
    "eval/examples": total["count"],
  }
  if "correct_top5" in total:
    out["eval/top5_accuracy"] = total["correct_top5"] / count
  return out


class Experiment(NamedTuple):
  """What :func:`build_experiment` makes from a config, before anything runs or is written."""

  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  train_ds: data.Dataset
  eval_ds: data.Dataset
  model: nn.Module
  optimizer: optim.Optimizer
  steps_per_epoch: int
  total_steps: int
  eval_every_steps: int
  abstract_state: TrainState
  state_shardings: TrainState
  dense_macs: dict[str, int] | None


def total_train_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """``num_train_steps`` if > 0, else ``num_epochs * steps_per_epoch`` (at least 1)."""
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  return max(1, int(round(config.num_epochs * steps_per_epoch)))


def make_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
  """``get_model(config.model, num_classes, **config.model_kwargs)``, bf16 if half precision."""
  kwargs = dict(config.model_kwargs)
  if config.half_precision:
    kwargs.setdefault("dtype", jnp.bfloat16)
  try:
    return get_model(config.model, num_classes, **kwargs)
  except TypeError as e:
    raise ValueError(f"config.model_kwargs={kwargs!r}: {e}") from None


def dense_macs(model: nn.Module, input_shape: tuple) -> dict[str, int] | None:
  """Dense multiply-accumulates per example of each kernel, by param path ('fc1/kernel'), from
  :func:`autosparse_jax.flops.count_macs` (traced, nothing computed); None if it fails."""
  from autosparse_jax import flops

  example = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  try:
    variables = jax.eval_shape(
      functools.partial(model.init, train=False), jax.random.key(0), example
    )
    counts = flops.count_macs(
      functools.partial(model.apply, train=False), variables, example, batch_size=1
    )
  except Exception as e:  # noqa: BLE001 -- the FLOP count is a report, not the training
    logging.warning("could not count the model's MACs: %s", e)
    return None
  return {k.removeprefix("params/"): int(v) for k, v in counts.items()}


def state_shardings(
  abstract_state: TrainState, tx: optax.GradientTransformation, mesh, config
) -> TrainState:
  """Shardings of every state leaf (see :mod:`autosparse_jax.sharding`)."""
  fsdp = config.sharding == "fsdp"
  params = sharding.param_shardings(abstract_state.params, mesh, fsdp, config.fsdp_min_size)
  rep = sharding.replicated(mesh)
  return TrainState(
    step=rep,
    params=params,
    batch_stats=jax.tree.map(lambda _: rep, abstract_state.batch_stats),
    opt_state=sharding.optimizer_state_shardings(tx, abstract_state.opt_state, params, mesh),
    nonfinite_in_a_row=rep,
    nonfinite_total=rep,
  )


def build_experiment(config: ml_collections.ConfigDict) -> Experiment:
  """Validates ``config`` and builds data, model, optimizer, mesh and the abstract state.

  Nothing is compiled or written (the datasets are opened; CIFAR-10/MNIST are read into
  memory).

  Raises:
    ValueError: a bad config field, named.
    DatasetUnavailableError: the dataset is not on disk.
  """
  config_lib.validate(config, device_count=jax.device_count(), process_count=jax.process_count())
  dataset_kwargs = dict(
    seed=config.seed,
    image_size=config.image_size,
    data_dir=config.data_dir,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    num_workers=config.num_workers,
  )
  datasets = {}
  for train_, split_field, batch_field in (
    (True, "train_split", "global_batch_size"),
    (False, "eval_split", "eval_batch_size"),
  ):
    try:
      datasets[train_] = data.make_dataset(
        config.dataset,
        config[split_field],
        global_batch_size=config[batch_field],
        train=train_,
        **dataset_kwargs,
      )
    except data.DatasetUnavailableError as e:
      raise data.DatasetUnavailableError(
        f"config.dataset={config.dataset!r}, config.data_dir={config.data_dir!r}: {e}"
      ) from None
    except ValueError as e:
      raise ValueError(
        f"config.dataset={config.dataset!r}, config.{split_field}={config[split_field]!r} "
        f"(config.image_size, config.{batch_field}, config.seed): {e}"
      ) from None
  train_ds, eval_ds = datasets[True], datasets[False]
  steps_per_epoch = train_ds.steps_per_epoch
  total_steps = total_train_steps(config, steps_per_epoch)
  eval_every = max(1, int(round(config.eval_every_epochs * steps_per_epoch)))
  model = make_model(config, train_ds.num_classes)
  macs = dense_macs(model, train_ds.input_shape)
  optimizer = optim.make_optimizer(config, steps_per_epoch, total_steps, macs)
  init = functools.partial(
    create_train_state, model=model, tx=optimizer.tx, input_shape=train_ds.input_shape
  )
  try:
    abstract = jax.eval_shape(init, jax.random.key(config.seed))
  except ValueError as e:
    if "prunable" in str(e):
      raise ValueError(f"config.sparsity.exclude={config.sparsity.exclude!r}: {e}") from None
    raise
  mesh = sharding.make_mesh(config.num_devices)
  shardings = state_shardings(abstract, optimizer.tx, mesh, config)
  return Experiment(
    config=config,
    mesh=mesh,
    train_ds=train_ds,
    eval_ds=eval_ds,
    model=model,
    optimizer=optimizer,
    steps_per_epoch=steps_per_epoch,
    total_steps=total_steps,
    eval_every_steps=eval_every,
    abstract_state=abstract,
    state_shardings=shardings,
    dense_macs=macs,
  )


class _Functions(NamedTuple):
  init: Callable
  train: Callable
  eval: Callable
  summary: Callable
  nonzero: Callable


def _compile_functions(exp: Experiment) -> _Functions:
  config, mesh = exp.config, exp.mesh
  rep = sharding.replicated(mesh)
  batch = sharding.batch_sharding(mesh)
  shardings = exp.state_shardings
  init = jax.jit(
    functools.partial(
      create_train_state, model=exp.model, tx=exp.optimizer.tx, input_shape=exp.train_ds.input_shape
    ),
    out_shardings=shardings,
  )
  train = jax.jit(
    functools.partial(
      train_step,
      apply_fn=exp.model.apply,
      tx=exp.optimizer.tx,
      learning_rate_fn=exp.optimizer.learning_rate,
      num_classes=exp.train_ds.num_classes,
      label_smoothing=float(config.label_smoothing),
      seed=int(config.seed),
    ),
    in_shardings=(shardings, batch),
    out_shardings=(shardings, rep),
    donate_argnums=(0,),
  )
  evaluate = jax.jit(
    functools.partial(eval_step, apply_fn=exp.model.apply, num_classes=exp.eval_ds.num_classes),
    in_shardings=(shardings, batch),
    out_shardings=rep,
  )

  def summary(state):
    out = autosparse.summary(state.params, state.opt_state)
    out.pop("step", None)  # the annealing count; the record has the global step
    return out

  summary_fn = jax.jit(summary, in_shardings=(shardings,), out_shardings=rep)
  nonzero = jax.jit(report.nonzero_counts, in_shardings=(shardings.params,), out_shardings=rep)
  return _Functions(init, train, evaluate, summary_fn, nonzero)


def evaluate(
  eval_fn: Callable, state: TrainState, eval_ds: data.Dataset, mesh, num_steps: int = -1
) -> dict[str, float]:
  """One pass over ``eval_ds`` (its first ``num_steps`` batches if > 0)."""
  sums = []
  iterator = eval_ds.iterate()
  try:
    for i, batch in enumerate(iterator):
      if 0 < num_steps <= i:
        break
      sums.append(eval_fn(state, sharding.global_batch(batch, mesh)))
  finally:
    iterator.close()
  return summarize_eval(jax.device_get(sums))


def _mean_train_metrics(window: list[dict[str, jax.Array]]) -> dict[str, float]:
  fetched = jax.device_get(window)
  out = {
    k: float(np.mean([np.float64(m[k]) for m in fetched])) for k in fetched[0] if "rate" not in k
  }
  out["train/learning_rate"] = float(fetched[-1]["train/learning_rate"])
  return out


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
    raise ValueError(
      f"{workdir} holds a checkpoint of a different run ({details}); use another --workdir "
      "or the same settings"
    )


def _experiment_info(exp: Experiment, steps: int) -> dict[str, Any]:
  c = exp.config
  return {
    "model": c.model,
    "dataset": c.dataset,
    "method": c.method,
    "steps": int(steps),
    "epochs": steps / exp.steps_per_epoch,
    "global_batch_size": c.global_batch_size,
    "peak_learning_rate": optim.peak_learning_rate(c),
    "weight_decay": optim.method_weight_decay(c),
    "devices": int(exp.mesh.size),
    "processes": jax.process_count(),
    "sharding": c.sharding,
    "half_precision": bool(c.half_precision),
  }


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, *, stop_at_step: int | None = None
) -> dict[str, float]:
  """Trains and evaluates the experiment of ``config``, resuming from ``workdir`` if it holds a
  checkpoint.

  Args:
    config: the experiment (see :func:`autosparse_jax.config_lib.base_config`).
    workdir: where checkpoints, metrics, TensorBoard events and the summary go.
    stop_at_step: return after this global step as a killed job would (no final checkpoint,
      evaluation or summary); the next call resumes from the latest checkpoint.

  Returns:
    The final metrics: ``eval/accuracy``, ``eval/loss`` (``eval/top5_accuracy``),
    ``train/loss``, ``train/accuracy``, ``sparsity/total``, ``sparsity/<kernel>``,
    ``tau/<kernel>`` and ``alpha`` where the method has them, and ``step``. After
    ``stop_at_step``: the last logged metrics.

  Raises:
    ValueError: a bad config field (before anything is compiled or written), or a workdir
      holding a checkpoint of a different run.
  """
  started = time.time()
  if "://" in str(workdir):
    raise ValueError(
      f"workdir={workdir!r}: URLs are not supported; mount the bucket (e.g. gcsfuse) or use a "
      "shared file system and pass its path"
    )
  exp = build_experiment(config)
  workdir = Path(workdir)
  ckpt = checkpoint.Checkpointer(
    workdir, config.checkpoint_every_steps, config.keep_checkpoints, training=True
  )
  try:
    outcome = _train_loop(exp, workdir, ckpt, stop_at_step)
  finally:
    ckpt.close()
  if not outcome.finished:
    return outcome.last_train
  total = exp.total_steps
  shapes = {
    path_string(p): tuple(x.shape)
    for p, x in jax.tree_util.tree_flatten_with_path(exp.abstract_state.params)[0]
  }
  summary = report.build_summary(
    experiment=_experiment_info(exp, total),
    shapes=shapes,
    dense_macs=exp.dense_macs,
    nonzero=outcome.nonzero,
    summary=outcome.state_summary,
    eval_metrics=outcome.eval_metrics,
    train_metrics=outcome.last_train,
    wall_time=time.time() - started + outcome.earlier_seconds,
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
    text = report.write_summary(workdir, summary)
    logging.info("summary (%s):\n%s", workdir / report.SUMMARY_TXT, text)
    try:
      report.write_plots(workdir, summary, logs.read_jsonl(workdir / logs.METRICS_FILE))
    except Exception as e:  # noqa: BLE001 -- the plots are a report, not the training
      logging.warning("could not write the plots: %s", e)
  return result


class _LoopOutcome(NamedTuple):
  """What the loop leaves: ``finished`` False when stopped early (then only ``last_train``)."""

  finished: bool
  last_train: dict[str, float]
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
  fns = _compile_functions(exp)
  if restored is not None:
    state, meta = restored
    start_step = int(meta["data_step"])
    earlier = float(meta.get("wall_time_seconds", 0.0))
    logging.info("resuming from %s/%d", ckpt.directory, start_step)
    if int(state.step) != start_step:
      raise ValueError(f"checkpoint {start_step}: state step {int(state.step)} != data step")
  else:
    with jax.set_mesh(exp.mesh):
      state = fns.init(jax.random.key(config.seed))
    start_step, earlier = 0, 0.0
  started = time.time()

  writer = logs.create_writers(
    workdir,
    process_index=jax.process_index(),
    resume_step=start_step,
    tensorboard=config.tensorboard,
  )
  if is_main:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    overview = _parameter_overview(exp.abstract_state.params, exp.state_shardings.params)
    (workdir / "parameter_overview.txt").write_text(overview + "\n")
    logging.info("parameters:\n%s", overview)
  writer.write_hparams(_flat_config(config))

  meta_run = config_lib.run_identity(config)

  def meta_at(step: int) -> dict[str, Any]:
    """A checkpoint's metadata: the data position, the run's identity, the time spent."""
    seconds = earlier + time.time() - started
    return {"step": step, "data_step": step, "run": meta_run, "wall_time_seconds": seconds}

  total = exp.total_steps
  logging.info(
    "training %s %s on %s for %d steps (%d per epoch), from step %d",
    config.method,
    config.model,
    config.dataset,
    total,
    exp.steps_per_epoch,
    start_step,
  )
  progress = logs.Progress(total)
  cost_meter = _training_cost_meter(exp, workdir, start_step)
  window: list[dict[str, jax.Array]] = []
  last: dict[str, float] = {}
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
          scalars = _mean_train_metrics(window)
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
            logging.info("%s", progress.line(step, timing))
          last = scalars
          if in_a_row >= config.max_consecutive_nonfinite:
            raise FloatingPointError(
              f"step {step}: the loss, a gradient or an update was NaN/Inf for {int(in_a_row)} "
              f"steps in a row (config.max_consecutive_nonfinite = "
              f"{config.max_consecutive_nonfinite}); those steps were skipped, so the params and "
              "the last checkpoint are finite. "
              "Lower the learning rate, check the data, or raise the limit."
            )
        if step % exp.eval_every_steps == 0 or step == total:
          eval_metrics = evaluate(fns.eval, state, exp.eval_ds, exp.mesh, config.num_eval_steps)
          eval_metrics["epoch"] = step / exp.steps_per_epoch
          writer.write_scalars(step, eval_metrics)
          eval_step_done = step
        meta = meta_at(step)
        if ckpt.save(step, state, meta):
          writer.flush()  # the records up to a checkpoint survive a kill
        if ckpt.preempted(step):
          ckpt.save(step, state, meta, force=True)
          writer.flush()
          logging.warning(
            "preempted at step %d: checkpoint saved, stopping; the same command resumes", step
          )
          return _LoopOutcome(False, last, earlier)
        if stop_at_step is not None and step >= stop_at_step:
          return _LoopOutcome(False, last, earlier)
      writer.flush()

      ckpt.save(total, state, meta_at(total), force=True)
      if eval_step_done != total:
        eval_metrics = evaluate(fns.eval, state, exp.eval_ds, exp.mesh, config.num_eval_steps)
      final_summary = {k: float(v) for k, v in jax.device_get(fns.summary(state)).items()}
      nonzero = {k: int(v) for k, v in jax.device_get(fns.nonzero(state.params)).items()}
  finally:
    train_iter.close()
    writer.close()
  training_ratio = cost_meter.ratio if cost_meter is not None and cost_meter.steps else None
  return _LoopOutcome(True, last, earlier, eval_metrics, final_summary, nonzero, training_ratio)


def backward_sparsity(config: ml_collections.ConfigDict) -> float | None:
  """TopKAST's backward sparsity (default: its forward sparsity); None for other methods."""
  if config.method not in ("topkast", "topkast_ga"):
    return None
  block = config.sparsity[config.method]
  value = block.backward_sparsity
  return float(block.forward_sparsity if value is None else value)


def _training_cost_meter(exp: Experiment, workdir: Path, start_step: int):
  """The run's :class:`~autosparse_jax.flops.RunningTrainingCost` (None without MAC counts);
  a resumed run replays the logged records up to ``start_step``."""
  from autosparse_jax import flops

  if not exp.dense_macs:
    return None
  meter = flops.RunningTrainingCost(
    exp.dense_macs, exp.config.method, backward_sparsity(exp.config)
  )
  metrics = workdir / logs.METRICS_FILE
  if start_step and metrics.exists():
    meter.replay(logs.read_jsonl(metrics), up_to_step=start_step)
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


def load_checkpoint(
  config: ml_collections.ConfigDict,
  workdir: str,
  step: int | None = None,
  *,
  experiment: Experiment | None = None,
) -> TrainState:
  """The train state saved in ``workdir`` at ``step`` (default: the latest), on this job's
  devices with the shardings ``config`` asks for (for notebooks, export and tests).
  ``experiment``: :func:`build_experiment` of ``config`` if already built."""
  exp = build_experiment(config) if experiment is None else experiment
  ckpt = checkpoint.Checkpointer(workdir, config.checkpoint_every_steps, config.keep_checkpoints)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {ckpt.directory}")
    target = sharding.with_shardings(exp.abstract_state, exp.state_shardings)
    state, _ = ckpt.restore(step, target)
  finally:
    ckpt.close()
  return state


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


__all__ = [
  "Experiment",
  "TrainState",
  "build_experiment",
  "create_train_state",
  "cross_entropy_loss",
  "eval_step",
  "evaluate",
  "load_checkpoint",
  "train_and_evaluate",
  "train_step",
]

"""An experiment built from a config: data, model, optimizer, mesh, abstract state; checkpoint
loading for readers (``load_checkpoint``)."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging

from autosparse_jax import data
from autosparse_jax.models import get_model
from autosparse_jax.train import checkpoint, config_lib, optim, sharding
from autosparse_jax.train.state import TrainState, create_train_state


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
    raise config_lib.ConfigError(f"config.model_kwargs={kwargs!r}: {e}") from None


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
  """Shardings of every state leaf (see :mod:`autosparse_jax.train.sharding`)."""
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
    ConfigError: a bad config field, named.
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
      raise config_lib.ConfigError(
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
      raise config_lib.ConfigError(
        f"config.sparsity.exclude={config.sparsity.exclude!r}: {e}"
      ) from None
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


def backward_sparsity(config: ml_collections.ConfigDict) -> float | None:
  """TopKAST's backward sparsity (default: its forward sparsity); None for other methods."""
  if config.method not in ("topkast", "topkast_ga", "topkast_pp"):
    return None
  block = config.sparsity[config.method]
  value = block.backward_sparsity
  return float(block.forward_sparsity if value is None else value)


def training_cost_meter(config: ml_collections.ConfigDict, dense_macs: dict[str, int]):
  """A :class:`~autosparse_jax.flops.RunningTrainingCost` for the run of ``config``: its method,
  TopKAST's backward sparsity, RigL's ``update_every``."""
  from autosparse_jax import flops

  block = config.sparsity.get(config.method)
  return flops.RunningTrainingCost(
    dense_macs,
    config.method,
    backward_sparsity(config),
    update_every=block.get("update_every") if block is not None else None,
  )


def load_checkpoint(
  config: ml_collections.ConfigDict,
  workdir: str,
  step: int | None = None,
  *,
  experiment: Experiment | None = None,
) -> TrainState:
  """The train state saved in ``workdir`` at ``step`` (default: the newest that reads back whole
  and matches its checksums), on this job's devices with the shardings ``config`` asks for (for
  notebooks, export and tests). Safe on a live run: nothing is written, and a checkpoint that
  the run's keep-N removes while it is read makes it take the next newest one.
  ``experiment``: :func:`build_experiment` of ``config`` if already built.

  Raises:
    FileNotFoundError: no (readable) checkpoint, or none at ``step``.
  """
  return read_checkpoint(config, workdir, step, experiment=experiment)[0]


def read_checkpoint(
  config: ml_collections.ConfigDict,
  workdir: str,
  step: int | None = None,
  *,
  experiment: Experiment | None = None,
) -> tuple[TrainState, dict[str, Any], int]:
  """:func:`load_checkpoint`, with the checkpoint's metadata and step."""
  exp = build_experiment(config) if experiment is None else experiment
  ckpt = checkpoint.Checkpointer(workdir, config.checkpoint_every_steps, config.keep_checkpoints)
  try:
    target = sharding.with_shardings(exp.abstract_state, exp.state_shardings)
    return ckpt.read(target, step)
  finally:
    ckpt.close()


def experiment_info(exp: Experiment, steps: int) -> dict[str, Any]:
  """What the summary says about the run: model, data, method, steps, optimizer, devices."""
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

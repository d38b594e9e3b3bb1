"""The jitted functions of an experiment: state init, train step, evaluation, summaries.

Each is ``jax.jit`` over the experiment's mesh with the state's shardings (the train step
donates the state); :func:`evaluate` runs one pass over an eval set.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import numpy as np

import autosparse_jax as autosparse
from autosparse_jax import data
from autosparse_jax.train import sharding
from autosparse_jax.train.experiment import Experiment
from autosparse_jax.train.state import (
  TrainState,
  create_train_state,
  eval_step,
  summarize_eval,
  train_step,
)
from autosparse_jax.train.summary import nonzero_counts


class Functions(NamedTuple):
  """The jitted functions of :func:`compile_functions`."""

  init: Callable
  train: Callable
  eval: Callable
  summary: Callable
  nonzero: Callable


def compile_functions(exp: Experiment) -> Functions:
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
  nonzero = jax.jit(nonzero_counts, in_shardings=(shardings.params,), out_shardings=rep)
  return Functions(init, train, evaluate, summary_fn, nonzero)


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


def mean_train_metrics(window: list[dict[str, jax.Array]]) -> dict[str, float]:
  """The mean of each metric over the window's steps (float64); the last learning rate."""
  fetched = jax.device_get(window)
  out = {
    k: float(np.mean([np.float64(m[k]) for m in fetched])) for k in fetched[0] if "rate" not in k
  }
  out["train/learning_rate"] = float(fetched[-1]["train/learning_rate"])
  return out

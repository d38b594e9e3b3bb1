"""The train state and its step functions: ``create_train_state``, ``train_step``, ``eval_step``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import autosparse_jax as autosparse


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

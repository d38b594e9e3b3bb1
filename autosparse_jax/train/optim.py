"""The optimizer a config describes: learning-rate schedule, base optimizer, sparse method.

``make_optimizer(config, steps_per_epoch, total_steps)`` gives
``autosparse.optax_chain(base, method, prunable)`` where

* ``base`` = [clip by global norm] -> weight decay on kernels -> SGD with momentum (or AdamW,
  whose decay is decoupled after Adam's scaling). The decay mask selects leaves whose path ends
  in ``kernel``: batch norm scales/biases and dense biases are never decayed (STR's
  ``no_bn_decay``). The chain applies ``base`` to the thresholds tree too, which has the
  params' structure, so the thresholds of pruned kernels are decayed with them: that is STR's
  sparsity pressure. ``config.sparsity.<method>.decay_thresholds=False`` gives the thresholds
  the same optimizer without weight decay instead, and ``threshold_weight_decay`` adds decay on
  the thresholds alone.
* the learning rate: linear warmup from 0 over ``warmup_epochs``, then cosine decay to 0 at
  ``total_steps`` (or constant); the peak is ``learning_rate * global_batch_size /
  base_batch_size`` when ``base_batch_size > 0``.
* ``method`` from ``config.method`` and ``config.sparsity.<method>``. Alpha schedules default
  to ``decay_steps = total_steps`` and ``zero_at = 90%`` of it; gradual magnitude pruning to
  pruning from 10% to 75% of training.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import ml_collections
import optax

import autosparse_jax as autosparse
from autosparse_jax.selection import path_string
from autosparse_jax.train.config_lib import ConfigError

ALPHA_ZERO_AT_FRACTION = 0.9
GMP_BEGIN_FRACTION = 0.1
GMP_END_FRACTION = 0.75

_ALPHA_SCHEDULES = {
  "sigmoid_cosine": autosparse.sigmoid_cosine_decay,
  "cosine": autosparse.cosine_decay,
  "linear": autosparse.linear_decay,
}


class Optimizer(NamedTuple):
  """What :func:`make_optimizer` builds.

  Attributes:
    tx: the full optimizer, ``optax_chain(base, method, prunable)``.
    learning_rate: the schedule ``step -> lr`` (for logging).
    method: the sparse-training method object.
    prunable: the leaf selection passed to the chain (None: every kernel).
  """

  tx: optax.GradientTransformation
  learning_rate: optax.Schedule
  method: Any
  prunable: Any


def peak_learning_rate(config: ml_collections.ConfigDict) -> float:
  """``learning_rate``, scaled linearly by ``global_batch_size / base_batch_size`` if set."""
  scale = config.global_batch_size / config.base_batch_size if config.base_batch_size else 1.0
  return float(config.learning_rate) * scale


def learning_rate_schedule(
  config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int
) -> optax.Schedule:
  """Linear warmup from 0 over ``warmup_epochs``, then cosine decay to 0 or constant."""
  peak = peak_learning_rate(config)
  warmup = int(round(config.warmup_epochs * steps_per_epoch))
  if warmup >= total_steps:
    raise ConfigError(
      f"config.warmup_epochs={config.warmup_epochs}: {warmup} warmup steps leave none of the "
      f"{total_steps} training steps for the decay"
    )
  if config.lr_schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, total_steps, end_value=0.0)
  if config.lr_schedule == "constant":
    if not warmup:
      return optax.constant_schedule(peak)
    return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup]
    )
  raise ConfigError(f"config.lr_schedule={config.lr_schedule!r}: must be 'cosine' or 'constant'")


def kernel_mask(tree: Any) -> Any:
  """True at leaves whose '/'-joined path ends in ``kernel`` (a mask for weight decay)."""
  return jax.tree_util.tree_map_with_path(
    lambda path, _: path_string(path).rsplit("/", 1)[-1] == "kernel", tree
  )


def base_optimizer(
  config: ml_collections.ConfigDict, learning_rate: optax.Schedule, weight_decay: float
) -> optax.GradientTransformation:
  """[clip] -> weight decay on kernels -> SGD with momentum, or AdamW (decoupled decay)."""
  parts = []
  if config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  if config.optimizer == "sgd":
    if weight_decay > 0:
      parts.append(optax.add_decayed_weights(weight_decay, mask=kernel_mask))
    momentum = config.momentum or None
    parts.append(optax.sgd(learning_rate, momentum=momentum, nesterov=bool(config.nesterov)))
  elif config.optimizer == "adamw":
    parts.append(
      optax.adamw(
        learning_rate,
        b1=config.momentum,
        b2=config.adam_b2,
        eps=config.adam_eps,
        weight_decay=weight_decay,
        mask=kernel_mask,
      )
    )
  else:
    raise ConfigError(f"config.optimizer={config.optimizer!r}: must be 'sgd' or 'adamw'")
  return optax.chain(*parts) if len(parts) > 1 else parts[0]


def method_weight_decay(config: ml_collections.ConfigDict) -> float:
  """``config.sparsity.<method>.weight_decay`` if set, else ``config.weight_decay``."""
  override = config.sparsity[config.method].get("weight_decay")
  return float(config.weight_decay if override is None else override)


def _alpha(block: ml_collections.ConfigDict, total_steps: int) -> Callable:
  decay_steps = block.alpha_decay_steps or total_steps
  zero_at = block.alpha_zero_at
  if zero_at is None:
    zero_at = int(ALPHA_ZERO_AT_FRACTION * total_steps)
  if block.alpha_schedule == "constant":
    return autosparse.constant(block.alpha0, zero_at=zero_at)
  try:
    make = _ALPHA_SCHEDULES[block.alpha_schedule]
  except KeyError:
    raise ValueError(
      f"alpha_schedule: must be one of {(*_ALPHA_SCHEDULES, 'constant')}, "
      f"got {block.alpha_schedule!r}"
    ) from None
  return make(block.alpha0, decay_steps, zero_at=zero_at)


def sparsity_method(
  config: ml_collections.ConfigDict,
  total_steps: int,
  threshold_optimizer: optax.GradientTransformation | None = None,
  dense_macs: dict[str, int] | None = None,
) -> Any:
  """The method object of ``config.method`` from ``config.sparsity.<method>``.

  ``dense_macs`` (per-layer dense MACs by param path) is needed by ``target_flops_ratio``.

  Raises:
    ConfigError: ``config.sparsity.<method>: <argument>: <why>``.
  """
  name = config.method
  block = config.sparsity[name]
  try:
    if name == "dense":
      return autosparse.Dense()
    if name in ("autosparse", "str"):
      target = block.target_sparsity
      flops_ratio = block.target_flops_ratio
      ramp = None
      if target is not None or flops_ratio is not None:
        ramp = autosparse.ramp(0, int(block.target_ramp_steps or max(1, total_steps // 2)))
      kwargs = dict(
        threshold_init=float(block.threshold_init),
        granularity=block.granularity,
        threshold_weight_decay=float(block.threshold_weight_decay) or None,
        threshold_optimizer=threshold_optimizer,
        target_sparsity=None if target is None else float(target),
        target_flops_ratio=None if flops_ratio is None else float(flops_ratio),
        dense_macs=dense_macs if flops_ratio is not None else None,
        target_ramp=ramp,
        max_layer_sparsity=float(block.max_layer_sparsity),
      )
      if name == "str":
        return autosparse.STR(**kwargs)
      return autosparse.AutoSparse(
        alpha=_alpha(block, total_steps), ga_on_threshold=bool(block.ga_on_threshold), **kwargs
      )
    if name in ("topkast", "topkast_ga", "topkast_pp"):
      topkast = autosparse.TopKAST(
        forward_sparsity=float(block.forward_sparsity),
        backward_sparsity=(
          None if block.backward_sparsity is None else float(block.backward_sparsity)
        ),
        alpha=_alpha(block, total_steps) if name == "topkast_ga" else None,
        penalty=float(block.penalty),
        budget=_budget(block),
      )
      if name == "topkast_pp":
        return autosparse.Powerprop(topkast, exponent=float(block.exponent))
      return topkast
    if name in DYNAMIC_METHODS:
      return dynamic_method(name, block, total_steps)
    if name == "gmp":
      begin = block.begin_step
      end = block.end_step
      begin = int(GMP_BEGIN_FRACTION * total_steps) if begin is None else int(begin)
      end = max(int(GMP_END_FRACTION * total_steps), begin + 1) if end is None else int(end)
      return autosparse.GradualMagnitude(
        target_sparsity=float(block.target_sparsity),
        begin_step=begin,
        end_step=end,
        frequency=int(block.frequency),
        initial_sparsity=float(block.initial_sparsity),
        budget=_budget(block),
      )
  except (ValueError, TypeError) as e:
    raise ConfigError(f"config.sparsity.{name}: {e}") from None
  raise ConfigError(f"config.method={name!r}: unknown method")


DYNAMIC_METHODS = ("rigl", "rigl_ga", "set", "mest", "mest_ga")
DST_END_FRACTION = 0.75  # RigL's T_end: the last 25% of training keeps its masks


def _budget(block: ml_collections.ConfigDict) -> autosparse.Budget:
  return autosparse.Budget(block.budget, dense_first_layer=bool(block.dense_first_layer))


def dynamic_method(name: str, block: ml_collections.ConfigDict, total_steps: int) -> Any:
  """RigL, SET or MEST (``*_ga``: with GA) from ``config.sparsity.<name>``."""
  end = block.end_step
  common = dict(
    sparsity=float(block.sparsity),
    end_step=int(DST_END_FRACTION * total_steps) if end is None else int(end),
    update_every=int(block.update_every),
    begin_step=int(block.begin_step),
    budget=_budget(block),
    alpha=_alpha(block, total_steps) if name.endswith("_ga") else None,
    seed=int(block.seed),
  )
  if name.startswith("mest"):
    return autosparse.MEST(
      mutation=float(block.mutation),
      soft_bound=bool(block.soft_bound),
      score_lambda=float(block.score_lambda),
      **common,
    )
  cls = autosparse.SET if name == "set" else autosparse.RigL
  return cls(drop_fraction=float(block.drop_fraction), drop_schedule=block.drop_schedule, **common)


def prunable_selection(config: ml_collections.ConfigDict) -> Any:
  """``kernels(exclude=config.sparsity.exclude)``, or None (every kernel) when empty."""
  exclude = tuple(config.sparsity.exclude or ())
  if not exclude:
    return None
  try:
    return autosparse.kernels(exclude=exclude)
  except ValueError as e:
    raise ConfigError(f"config.sparsity.exclude: {e}") from None


def make_optimizer(
  config: ml_collections.ConfigDict,
  steps_per_epoch: int,
  total_steps: int,
  dense_macs: dict[str, int] | None = None,
) -> Optimizer:
  """The optimizer of ``config`` for a run of ``total_steps`` steps (``dense_macs``: for a
  FLOP target)."""
  schedule = learning_rate_schedule(config, steps_per_epoch, total_steps)
  weight_decay = method_weight_decay(config)
  base = base_optimizer(config, schedule, weight_decay)
  block = config.sparsity[config.method]
  threshold_optimizer = None
  if not block.get("decay_thresholds", True):
    threshold_optimizer = base_optimizer(config, schedule, 0.0)
  method = sparsity_method(config, total_steps, threshold_optimizer, dense_macs)
  prunable = prunable_selection(config)
  tx = autosparse.optax_chain(base, method, prunable)
  return Optimizer(tx, schedule, method, prunable)

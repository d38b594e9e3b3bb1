"""Sparse training as one optax ``GradientTransformation``.

The params the user holds (and the model runs with) are the effective sparse weights
``W_eff``; the dense latent weights ``W`` and the thresholds ``s`` live in the optimizer state.
One update runs, over the latent tree,

1. the method's mask stage: ``g = dL/dW_eff`` -> weight gradient, mask ``M``, ``dL/ds``;
2. gradient annealing: ``dL/dW = g * (M + alpha_t * (1 - M))``;
3. the base optimizer on ``W`` (params' structure) and, with its own state, on ``s``;

then re-materialises ``W_eff`` from the new latent state and emits
``updates = W_eff_new - params``, so ``optax.apply_updates(params, updates) == W_eff_new``
(pruned entries are exact zeros). Leaves that are not pruned get the base optimizer's update
unchanged.

Every state leaf is a scalar or lies in a tree with the params' structure, so
``optax.tree_map_params`` derives the state's shardings from the params' (the thresholds and
scalars fall to ``transform_non_params``) and checkpointers save it like any optax state.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from autosparse_jax import methods
from autosparse_jax.selection import Prunable, select_leaves
from autosparse_jax.stages import GradientAnnealingState, LatentParams, _flat, init_thresholds


class SparseTrainingState(NamedTuple):
  """State of :func:`optax_chain`.

  Attributes:
    latent: dense latent weights (a copy of every param, pruned or not) and thresholds.
    mask: the mask stage's state.
    annealing: step count and the last ``alpha_t``.
    base: the base optimizer's state for the latent weights.
    thresholds: the threshold optimizer's state.
    controller: the sparsity controller's state (``optax.EmptyState()`` without a target).
    layers_at_ceiling: how many layers the last update held at ``max_layer_sparsity``.
  """

  latent: LatentParams
  mask: Any
  annealing: GradientAnnealingState
  base: Any
  thresholds: Any
  controller: Any
  layers_at_ceiling: jax.Array


def _is_params_placeholder(params: Any) -> bool:
  # optax.tree_map_params calls init with an empty placeholder tree standing for the params.
  return not jax.tree.leaves(params)


def _hold_at_ceiling(threshold_updates, thresholds, weights, ceiling: float | None):
  """Stops the thresholds of a layer from rising (whatever pushes them: gradient, weight decay
  or the controller) when, with its new weights ``W'`` and the updated thresholds ``s + u``,
  its sparsity ``1 - mean(|W'| > sigmoid(s + u))`` would exceed ``ceiling``: then ``u`` becomes
  ``min(u, 0)``. The test is on the mask the update produces, not the previous one, so no
  threshold update, however large, takes a layer past the ceiling and silently disconnects
  the network. Returns the updates and how many layers are held."""
  held = jnp.zeros((), jnp.int32)
  if ceiling is None:
    return threshold_updates, held
  treedef, (ws, ss, us) = _flat(weights, thresholds, threshold_updates)
  out = []
  for w, s, u in zip(ws, ss, us, strict=True):
    if u is None:
      out.append(None)
      continue
    tau = jax.nn.sigmoid(optax.apply_updates(s, u)).astype(w.dtype)
    kept = jnp.sum(jnp.abs(w) > tau, dtype=jnp.int32)
    full = kept < w.size * (1.0 - ceiling)  # i.e. 1 - kept / size > ceiling, without rounding
    held = held + full.astype(jnp.int32)
    out.append(jnp.where(full, jnp.minimum(u, 0.0), u))
  return treedef.unflatten(out), held


def optax_chain(
  base: optax.GradientTransformation,
  method: methods.Method,
  prunable: Prunable = None,
) -> optax.GradientTransformationExtraArgs:
  """Wraps ``base`` so that it trains a sparse model with ``method``.

  Args:
    base: any optax optimizer (sgd, adamw, a chain with clipping, ...). It sees the latent
      weights and, with a separate state, the thresholds, both in the params' tree structure,
      so masks keyed on param names (``adamw(mask=...)``) apply to both.
    method: :class:`AutoSparse`, :func:`STR`, :class:`TopKAST`, :class:`GradualMagnitude` or
      :class:`Dense` (which returns ``base`` itself).
    prunable: which leaves to prune: None (every kernel with ndim >= 2), a list of
      ``(regex, bool)`` rules over '/'-joined key paths (first match wins), or a callable
      ``(path, leaf) -> bool`` such as :func:`autosparse_jax.kernels`.

  Returns:
    A ``GradientTransformationExtraArgs`` whose ``update`` requires ``params``; extra keyword
    arguments are forwarded to ``base``.
  """
  if isinstance(method, methods.Dense):
    return optax.with_extra_args_support(base)
  if not isinstance(method, methods.AutoSparse | methods.TopKAST | methods.GradualMagnitude):
    raise ValueError(
      f"method: expected AutoSparse, STR(...), TopKAST, GradualMagnitude or Dense, got {method!r}"
    )
  parts = method.components(prunable)
  base = optax.with_extra_args_support(base)
  threshold_tx = parts.threshold_optimizer or base
  if parts.threshold_weight_decay:
    threshold_tx = optax.chain(
      optax.add_decayed_weights(parts.threshold_weight_decay), threshold_tx
    )

  controller = parts.controller or optax.identity()

  def init(params):
    if _is_params_placeholder(params):
      thresholds = jnp.zeros((), jnp.float32)  # a non-params leaf for tree_map_params
    else:
      flags = select_leaves(params, prunable)
      if parts.threshold_init is None:
        thresholds = jax.tree.map(lambda _: None, params)
      else:
        thresholds = init_thresholds(params, flags, parts.threshold_init, parts.granularity)
    # A copy, so that donating params and state together never donates one buffer twice.
    latent = LatentParams(jax.tree.map(jnp.copy, params), thresholds)
    return SparseTrainingState(
      latent=latent,
      mask=parts.stage.init(latent),
      annealing=parts.annealing.init(params),
      base=base.init(latent.weights),
      thresholds=threshold_tx.init(thresholds),
      controller=controller.init(params),
      layers_at_ceiling=jnp.zeros((), jnp.int32),
    )

  def update(grads, state, params=None, **extra_args):
    if params is None:
      raise ValueError(
        "params: optax_chain's update needs the current params (the effective weights): "
        "call tx.update(grads, state, params)"
      )
    latent = state.latent
    masked, mask_state = parts.stage.update(grads, state.mask, latent)
    latent_grads, annealing = parts.annealing.update(masked, state.annealing)
    w_updates, base_state = base.update(
      latent_grads.weights, state.base, latent.weights, **extra_args
    )
    s_updates, threshold_state = threshold_tx.update(
      latent_grads.thresholds, state.thresholds, latent.thresholds, **extra_args
    )
    s_updates, controller_state = controller.update(s_updates, state.controller, params)
    new_weights = optax.apply_updates(latent.weights, w_updates)
    s_updates, at_ceiling = _hold_at_ceiling(
      s_updates, latent.thresholds, new_weights, parts.max_layer_sparsity
    )
    new_latent = LatentParams(new_weights, optax.apply_updates(latent.thresholds, s_updates))
    # The params after this update are the model of step `annealing.count`.
    effective, mask_state = parts.stage.sparsify(new_latent, mask_state, annealing.count)
    leaves, treedef = jax.tree.flatten(params)
    out = [
      u if e is None else (e - p).astype(p.dtype)
      for p, u, e in zip(
        leaves, treedef.flatten_up_to(w_updates), treedef.flatten_up_to(effective), strict=True
      )
    ]
    new_state = SparseTrainingState(
      new_latent, mask_state, annealing, base_state, threshold_state, controller_state, at_ceiling
    )
    return treedef.unflatten(out), new_state

  return optax.GradientTransformationExtraArgs(init, update)

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
unchanged. ``tx.init`` cannot change the params, so training starts from
``params = tx.effective_params(params, tx.init(params))``.

Every state leaf is a scalar or lies in a tree with the params' structure, so
``optax.tree_map_params`` derives the state's shardings from the params' (the thresholds and
scalars fall to ``transform_non_params``) and checkpointers save it like any optax state.
Only param-shaped leaves carry the params' metadata (``nnx`` Variables and their sharding);
thresholds and other small leaves are plain arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.tree_util import SequenceKey

from autosparse_jax import counting, dynamic, methods
from autosparse_jax.metadata import plain, with_param_metadata, with_sharding_of
from autosparse_jax.selection import Prunable, path_string, select_leaves
from autosparse_jax.stages import GradientAnnealingState, LatentParams, _flat, init_thresholds


class SparseTrainingState(NamedTuple):
  """State of :func:`optax_chain`.

  Attributes:
    latent: dense latent weights (a copy of every param, pruned or not) and thresholds.
    mask: the mask stage's state.
    annealing: step count and the last ``alpha_t``.
    base: the base optimizer's state for the latent weights.
    thresholds: the threshold optimizer's state, as a :class:`ThresholdOptimizerState`.
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


@jax.tree_util.register_pytree_with_keys_class
class ThresholdOptimizerState:
  """The threshold optimizer's state, held as its flat leaves (``inner`` rebuilds it).

  When the thresholds are trained by a copy of the base optimizer, their state repeats the
  base's names (``count``, ``learning_rate``, ...); flat, it leaves
  ``optax.tree_utils.tree_get(state, name)`` and ``tree_set`` one answer: the base's. The chain
  copies the base's injected hyperparameters into it at every update, so that
  ``tree_set(state, learning_rate=...)`` reaches the thresholds too.
  """

  def __init__(self, leaves: list[Any], treedef: Any):
    self.leaves = list(leaves)
    self.treedef = treedef

  @classmethod
  def wrap(cls, inner: Any) -> ThresholdOptimizerState:
    leaves, treedef = jax.tree.flatten(inner)
    return cls(leaves, treedef)

  @property
  def inner(self) -> Any:
    return self.treedef.unflatten(self.leaves)

  def tree_flatten_with_keys(self):
    return [(SequenceKey(i), x) for i, x in enumerate(self.leaves)], self.treedef

  @classmethod
  def tree_unflatten(cls, treedef, leaves):
    return cls(leaves, treedef)

  def __repr__(self) -> str:
    return f"ThresholdOptimizerState({self.inner!r})"


class SparseTransformation(optax.GradientTransformationExtraArgs):
  """What :func:`optax_chain` returns: an optax ``GradientTransformationExtraArgs`` (``init``,
  ``update``) and ``effective_params(params, opt_state)``, the params ``W_eff`` of the model
  that ``opt_state`` describes (for a fresh state: the sparse model of step 0)."""

  effective_params: Callable[[Any, Any], Any]

  def __new__(cls, init, update, effective_params):
    tx = super().__new__(cls, init, update)
    tx.effective_params = effective_params
    return tx


def _is_params_placeholder(params: Any) -> bool:
  # optax.tree_map_params calls init with an empty placeholder object standing for the params.
  return type(params).__name__ == "_ParamsPlaceholder" and not jax.tree.leaves(params)


def _find_state(opt_state: Any) -> SparseTrainingState | None:
  is_state = lambda x: isinstance(x, SparseTrainingState)  # noqa: E731
  for node in jax.tree.leaves(opt_state, is_leaf=is_state):
    if is_state(node):
      return node
  return None


def _check_finite(params: Any) -> None:
  """Refuses NaN/Inf in concrete (not traced) floating-point params: the latent weights would
  carry them through every step."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if isinstance(leaf, jax.core.Tracer) or not jnp.issubdtype(leaf.dtype, jnp.inexact):
      continue
    if leaf.size and not bool(jnp.all(jnp.isfinite(leaf))):
      raise ValueError(
        f"params: {path_string(path)!r} holds NaN or Inf at init; sparse training needs finite "
        "initial weights"
      )


_UNSUPPORTED_BASES = {
  "ScheduleFreeState": (
    "schedule-free optimizers (optax.contrib.schedule_free_*) are not supported as base: "
    "their evaluation params are an average of dense iterates, which the chain cannot sparsify"
  ),
  "LookaheadState": (
    "optax.lookahead is not supported as base: it needs LookaheadParams (fast and slow "
    "weights), and the chain's latent weights are a plain tree"
  ),
}
_UNSUPPORTED_MODULES = {
  "optax.contrib._schedule_free": "ScheduleFreeState",
  "optax._src.lookahead": "LookaheadState",
}


def _refuse_unsupported_base(base: optax.GradientTransformation, state: Any = None) -> None:
  if state is None:
    kind = _UNSUPPORTED_MODULES.get(getattr(base.init, "__module__", ""))
    if kind:
      raise ValueError(f"base: {_UNSUPPORTED_BASES[kind]}; see the README's 'Optax patterns'")
    return
  is_unsupported = lambda x: type(x).__name__ in _UNSUPPORTED_BASES  # noqa: E731
  for node in jax.tree.leaves(state, is_leaf=is_unsupported):
    if is_unsupported(node):
      raise ValueError(
        f"base: {_UNSUPPORTED_BASES[type(node).__name__]}; see the README's 'Optax patterns'"
      )


def _has_hyperparams(x: Any) -> bool:
  return isinstance(x, tuple) and "hyperparams" in getattr(x, "_fields", ())


def _sync_hyperparams(source: Any, target: Any) -> Any:
  """Copies the ``inject_hyperparams`` values of ``source`` (the base's state) into ``target``
  (the same optimizer's state for the thresholds), in order."""
  found = [x for x in jax.tree.leaves(source, is_leaf=_has_hyperparams) if _has_hyperparams(x)]
  if not found:
    return target
  values = iter(x.hyperparams for x in found)
  return jax.tree.map(
    lambda x: x._replace(hyperparams=next(values)) if _has_hyperparams(x) else x,
    target,
    is_leaf=_has_hyperparams,
  )


def _after(updates: Any, threshold_grads: Any) -> Any:
  """``updates``, each pruned leaf's made to depend on its threshold gradient without changing
  a value: ``u * (1 + 0 * tanh(sum(dL/ds)))`` is ``u`` for any finite or infinite ``dL/ds`` (a
  NaN one makes it NaN, as it makes the thresholds and ``W_eff``).

  ``dL/ds`` is a sum over the old latent ``W``, which the update overwrites in place when the
  state is donated. Unordered with that write, the sum made XLA keep a copy of every kernel;
  with the write depending on the sum, the sum runs first and no copy is made."""
  treedef, (us, ts) = _flat(updates, threshold_grads)
  out = []
  for u, t in zip(us, ts, strict=True):
    if t is not None:
      u = u * (1.0 + 0.0 * jnp.tanh(jnp.sum(t))).astype(u.dtype)
    out.append(u)
  return treedef.unflatten(out)


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
    kept = counting.count_above(w, tau)
    full = kept < w.size * (1.0 - ceiling)  # i.e. 1 - kept / size > ceiling, without rounding
    held = held + full.astype(jnp.int32)
    out.append(jnp.where(full, jnp.minimum(u, 0.0), u))
  return treedef.unflatten(out), held


def optax_chain(
  base: optax.GradientTransformation,
  method: methods.Method,
  prunable: Prunable = None,
) -> SparseTransformation:
  """Wraps ``base`` so that it trains a sparse model with ``method``.

  Start training from the effective weights, not the dense initial ones::

    opt_state = tx.init(params)
    params = tx.effective_params(params, opt_state)  # W_eff of step 0

  Args:
    base: any optax optimizer (sgd, adamw, a chain with clipping, ...). It sees the latent
      weights and, with a separate state, the thresholds, both in the params' tree structure,
      so masks keyed on param names (``adamw(mask=...)``) apply to both.
    method: any object with ``components(prunable)`` (:class:`autosparse_jax.methods.Method`):
      :class:`AutoSparse`, :func:`STR`, :class:`TopKAST`, :class:`GradualMagnitude`,
      :class:`RigL`, :class:`SET`, :class:`MEST`, :class:`Powerprop`, a user's own, or
      :class:`Dense` (``base`` itself, with ``effective_params`` returning the params).
    prunable: which leaves to prune: None (every kernel with ndim >= 2), a list of
      ``(regex, bool)`` rules over '/'-joined key paths (first match wins), or a callable
      ``(path, leaf) -> bool`` such as :func:`autosparse_jax.kernels`.

  Returns:
    A :class:`SparseTransformation` (an ``optax.GradientTransformationExtraArgs``) whose
    ``update`` requires ``params``; extra keyword arguments are forwarded to ``base``.

  Raises:
    ValueError: for a base optax cannot combine with the chain (schedule-free, lookahead);
      ``init`` raises for an unsupported base found inside a combination, a selection that
      picks no kernel, a complex kernel, or NaN/Inf in concrete params.
  """
  if isinstance(method, methods.Dense):
    dense = optax.with_extra_args_support(base)
    return SparseTransformation(dense.init, dense.update, lambda params, opt_state: params)
  if not callable(getattr(method, "components", None)):
    raise ValueError(
      "method: expected an object with components(prunable) (AutoSparse, STR(...), TopKAST, "
      f"GradualMagnitude, RigL, SET, MEST, Powerprop, Dense or your own), got {method!r}"
    )
  _refuse_unsupported_base(base)
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
      # optax.tree_map_params: the thresholds and their optimizer state are non-params leaves.
      thresholds = jnp.zeros((), jnp.float32)
      latent = LatentParams(params, thresholds)
      threshold_state = thresholds
      mask_state = parts.stage.init(latent)
    else:
      flags = select_leaves(params, prunable)
      _check_finite(params)
      arrays = plain(params)
      if parts.threshold_init is None:
        thresholds = jax.tree.map(lambda _: None, arrays)
      else:
        thresholds = init_thresholds(arrays, flags, parts.threshold_init, parts.granularity)
      # A copy, so that donating params and state together never donates one buffer twice.
      weights = (parts.latent_init or (lambda p: jax.tree.map(jnp.copy, p)))(params)
      latent = LatentParams(weights, thresholds)
      threshold_state = ThresholdOptimizerState.wrap(threshold_tx.init(thresholds))
      mask_state = parts.stage.init(LatentParams(plain(latent.weights), thresholds))
      mask_state = with_param_metadata(mask_state, params)
    base_state = base.init(latent.weights)
    _refuse_unsupported_base(base, base_state)
    return SparseTrainingState(
      latent=latent,
      mask=mask_state,
      annealing=parts.annealing.init(params),
      base=base_state,
      thresholds=threshold_state,
      controller=controller.init(params),
      layers_at_ceiling=jnp.zeros((), jnp.int32),
    )

  def effective_params(params, opt_state):
    state = _find_state(opt_state)
    if state is None:
      raise ValueError(
        "opt_state: holds no SparseTrainingState; pass the state made by this "
        "transformation's init (or by an optimizer wrapping it)"
      )
    state = plain(state)
    effective, _ = parts.stage.sparsify(state.latent, state.mask, state.annealing.step)
    leaves, treedef = jax.tree.flatten(plain(params))
    out = [
      p if e is None else e.astype(p.dtype)
      for p, e in zip(leaves, treedef.flatten_up_to(effective), strict=True)
    ]
    return treedef.unflatten(out)

  def update(grads, state, params=None, **extra_args):
    if params is None:
      raise ValueError(
        "params: optax_chain's update needs the current params (the effective weights): "
        "call tx.update(grads, state, params)"
      )
    latent = state.latent
    masked, mask_state = parts.stage.update(grads, state.mask, latent)
    latent_grads, annealing = parts.annealing.update(masked, state.annealing)
    latent_grads = latent_grads._replace(
      thresholds=with_sharding_of(latent_grads.thresholds, latent.thresholds)
    )
    w_updates, base_state = base.update(
      latent_grads.weights, state.base, latent.weights, **extra_args
    )
    threshold_state = state.thresholds.inner
    if parts.threshold_optimizer is None:
      threshold_state = _sync_hyperparams(state.base, threshold_state)
    s_updates, threshold_state = threshold_tx.update(
      latent_grads.thresholds, threshold_state, latent.thresholds, **extra_args
    )
    s_updates, controller_state = controller.update(s_updates, state.controller, params)
    new_weights = optax.apply_updates(latent.weights, _after(w_updates, latent_grads.thresholds))
    s_updates, at_ceiling = _hold_at_ceiling(
      s_updates, latent.thresholds, new_weights, parts.max_layer_sparsity
    )

    def when_rewired(fn, operands):
      """``fn(operands)``, on the steps the masks may have changed only (``parts.rewired``)."""
      if parts.rewired is None:
        return fn(operands)
      due = parts.rewired(state.mask, mask_state)
      return jax.lax.cond(due, fn, lambda x: x, operands)

    if parts.entering is not None:  # the method's rule for weights joining the forward set
      new_weights = when_rewired(lambda w: parts.entering(state.mask, mask_state, w), new_weights)
    new_latent = LatentParams(new_weights, optax.apply_updates(latent.thresholds, s_updates))
    # The params after this update are the model of step `annealing.step`.
    effective, mask_state = parts.stage.sparsify(new_latent, mask_state, annealing.step)
    if parts.regrown is not None:  # grown/dropped weights restart at zero, moments too

      def reset(operands):
        weights, effective, base_state = operands
        fresh = parts.regrown(state.mask, mask_state)
        return (
          dynamic.zero_where(weights, fresh, params),
          dynamic.zero_where(effective, fresh, params),
          dynamic.reset_moments(base, base_state, fresh, params),
        )

      weights, effective, base_state = when_rewired(
        reset, (new_latent.weights, effective, base_state)
      )
      new_latent = new_latent._replace(weights=weights)
    leaves, treedef = jax.tree.flatten(params)
    out = [
      u if e is None else (e - p).astype(p.dtype)
      for p, u, e in zip(
        leaves, treedef.flatten_up_to(w_updates), treedef.flatten_up_to(effective), strict=True
      )
    ]
    new_state = SparseTrainingState(
      new_latent,
      mask_state,
      annealing,
      base_state,
      ThresholdOptimizerState.wrap(threshold_state),
      controller_state,
      at_ceiling,
    )
    return treedef.unflatten(out), new_state

  return SparseTransformation(init, update, effective_params)

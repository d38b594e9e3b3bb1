"""Dynamic sparse training's mask stage: hard masks that drop and grow connections.

RigL, SET and MEST (:mod:`autosparse_jax.dst`) share one stage, :func:`prune_and_grow`. Each
pruned layer holds a boolean mask ``M`` with an exact number of ones; ``W_eff = W * M``. On
an update step ``t`` (``t >= begin``, ``(t - begin) % every == 0``, ``t <= last``) every layer

1. keeps the ``n_keep`` active weights with the largest drop score (RigL, SET: ``|W|``; MEST:
   ``|W| + lambda |g M|``) and drops the rest;
2. grows the ``n_total - n_keep`` not-kept weights with the largest grow score (RigL: the
   dense gradient ``|g|``; SET, MEST: uniform random), so a weight dropped in this update may
   come back, as in RigL's code.

``(n_keep, n_total)`` come from the method's ``counts(step, n_active, k_budget, size)``. The stage
passes the dense gradient ``g = dL/dW_eff`` on with the mask of the step; the annealing stage
after it gives the inactive weights ``alpha_t g`` (0 without GA). Counts are exact: the sets
are cut by :func:`autosparse_jax.topk.cutoffs`, ties broken by flat index.

:func:`changed` and :func:`reset_moments` serve the chain's reset of the weights that were
grown or dropped: latent weight and every moment of the base optimizer restart at zero.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from autosparse_jax import counting, topk
from autosparse_jax.budgets import Budget
from autosparse_jax.selection import Prunable, select_leaves
from autosparse_jax.stages import MaskedGradients, MaskStage

Params = Any
_TINY = float(jnp.finfo(jnp.float32).tiny)  # ranks an active zero weight above inactive ones
# (step, n_active, k_budget, size) -> (n_keep, n_total), traced int32 scalars.
Counts = Callable[[jax.Array, jax.Array, int, int], tuple[jax.Array, jax.Array]]
# (w, g, mask, key) -> score, larger is kept / grown first.
Score = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


class DynamicMaskState(NamedTuple):
  """``masks``: boolean ``M``, the params' structure and shapes (all True at leaves that are
  not pruned), so that ``optax.tree_map_params`` gives it the params' shardings; ``step``:
  steps taken."""

  masks: Params
  step: jax.Array


def magnitude_score(w, g, m, key):
  """``|W|`` (RigL's and SET's drop score)."""
  del g, m, key
  return jnp.abs(w.astype(jnp.float32))


def gradient_score(w, g, m, key):
  """``|g|``, the dense gradient at ``W_eff`` (RigL's grow score)."""
  del w, m, key
  return jnp.abs(g.astype(jnp.float32))


def random_score(w, g, m, key):
  """Uniform random in ``(0, 1)`` (SET's and MEST's grow score)."""
  del g, m
  return jax.random.uniform(key, w.shape, jnp.float32, minval=_TINY)


def cosine_drop_fraction(drop0: float, end_step: int) -> Callable[[jax.Array], jax.Array]:
  """RigL's ``f(t) = drop0 * (1 + cos(pi min(t, T_end) / T_end)) / 2``."""

  def fraction(step):
    t = jnp.minimum(jnp.asarray(step, jnp.float32), end_step)
    return drop0 * 0.5 * (1.0 + jnp.cos(jnp.pi * t / max(end_step, 1)))

  return fraction


def budget_layers(weights: Params, prunable: Prunable, budget: Budget, sparsity: float):
  """``(treedef, leaves, counts)``: the keep count of each leaf that is pruned (selected and
  not kept dense by the budget), ``None`` at the others."""
  leaves, treedef = jax.tree.flatten(weights)
  flags = select_leaves(weights, prunable)
  idx = [i for i, f in enumerate(flags) if f]
  ks = budget.keep_counts([leaves[i].shape for i in idx], sparsity)
  counts: list[int | None] = [None] * len(leaves)
  for i, k in zip(idx, ks, strict=True):
    counts[i] = k if k < leaves[i].size else None
  return treedef, leaves, counts


def _select(scores: list[jax.Array], ks: list[jax.Array]) -> list[jax.Array]:
  """Exact top-k masks of non-negative scores (one joint search)."""
  return [topk.mask(s, c) for s, c in zip(scores, topk.cutoffs(scores, ks), strict=True)]


def prune_and_grow(
  *,
  sparsity: float,
  budget: Budget,
  counts: Counts,
  drop_score: Score,
  grow_score: Score,
  begin_step: int,
  every: int,
  last_step: int,
  seed: int = 0,
  prunable: Prunable = None,
) -> MaskStage:
  """The drop-and-grow mask stage (see the module docstring).

  The initial masks are random with the budget's exact per-layer counts (RigL's ``random``
  mask init); random scores use ``fold_in(PRNGKey(seed), step + 1)``, so no key is stored.
  """
  if every < 1:
    raise ValueError(f"update_every: must be a positive number of steps, got {every}")
  if begin_step < 0:
    raise ValueError(f"begin_step: must be >= 0, got {begin_step}")

  due = rewires_at(begin_step, every, last_step)

  def key_at(step, layer):
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), step), layer)

  def init(latent):
    if not jax.tree.leaves(latent.weights):  # optax.tree_map_params' placeholder
      return DynamicMaskState(latent.weights, jnp.zeros((), jnp.int32))
    treedef, leaves, ks = budget_layers(latent.weights, prunable, budget, sparsity)
    idx = [i for i, k in enumerate(ks) if k is not None]
    scores = [random_score(leaves[i], None, None, key_at(0, i)) for i in idx]
    masks: list[Any] = [jnp.ones(w.shape, bool) for w in leaves]
    for i, m in zip(idx, _select(scores, [ks[i] for i in idx]), strict=True):
      masks[i] = m
    return DynamicMaskState(treedef.unflatten(masks), jnp.zeros((), jnp.int32))

  def rewire(step, leaves, gs, ms, ks, idx):
    keeps, totals, drops = [], [], []
    for i in idx:
      w, g, m = leaves[i], gs[i], ms[i]
      n_keep, n_total = counts(step, counting.count(m), ks[i], w.size)
      keeps.append(n_keep)
      totals.append(n_total)
      s = jnp.maximum(drop_score(w, g, m, key_at(step + 1, 2 * i)), _TINY)
      drops.append(jnp.where(m, s, 0.0))
    kept = _select(drops, keeps)
    grows = []
    for i, k in zip(idx, kept, strict=True):
      s = jnp.maximum(grow_score(leaves[i], gs[i], ms[i], key_at(step + 1, 2 * i + 1)), _TINY)
      grows.append(jnp.where(k, 0.0, s))
    grown = _select(grows, [t - k for k, t in zip(keeps, totals, strict=True)])
    return [k | g for k, g in zip(kept, grown, strict=True)]

  def update(grads, state, latent):
    treedef, leaves, ks = budget_layers(latent.weights, prunable, budget, sparsity)
    gs = treedef.flatten_up_to(grads)
    ms = treedef.flatten_up_to(state.masks)
    idx = [i for i, k in enumerate(ks) if k is not None]
    step = state.step
    old = [ms[i] for i in idx]
    new = jax.lax.cond(
      due(step), lambda o: rewire(step, leaves, gs, ms, ks, idx), lambda o: list(o), old
    )
    nones = treedef.unflatten([None] * len(leaves))
    forward = treedef.unflatten([m if k is not None else None for m, k in zip(ms, ks, strict=True)])
    masked = MaskedGradients(grads, forward, nones, nones)
    new_ms = list(ms)
    for i, m in zip(idx, new, strict=True):
      new_ms[i] = m
    return masked, DynamicMaskState(treedef.unflatten(new_ms), optax.safe_increment(step))

  def sparsify(latent, state, step):
    del step
    treedef, leaves, ks = budget_layers(latent.weights, prunable, budget, sparsity)
    ms = treedef.flatten_up_to(state.masks)
    eff = [
      None if k is None else jnp.where(m, w, 0) for w, m, k in zip(leaves, ms, ks, strict=True)
    ]
    return treedef.unflatten(eff), state

  return MaskStage(init, update, sparsify)


def rewires_at(begin_step: int, every: int, last_step: int) -> Callable[[jax.Array], jax.Array]:
  """``due(t)``: the update of step ``t`` rewires, ``t >= begin``, ``(t - begin) % every == 0``
  and ``t <= last``."""

  def due(step):
    return (step >= begin_step) & ((step - begin_step) % every == 0) & (step <= last_step)

  return due


def rewired(begin_step: int, every: int, last_step: int) -> Callable[[Any, Any], jax.Array]:
  """The chain's ``rewired(old, new)`` hook for :func:`prune_and_grow`: whether the update that
  went from mask state ``old`` to ``new`` rewired the masks. On the other steps the chain skips
  the reset of grown weights (:func:`changed`, :func:`cap_grown`) and its passes."""
  due = rewires_at(begin_step, every, last_step)
  return lambda old, new: due(old.step)


def changed(old: DynamicMaskState, new: DynamicMaskState) -> Params:
  """The entries grown or dropped between two states (all False at leaves not pruned)."""
  leaves, treedef = jax.tree.flatten(old.masks)
  news = treedef.flatten_up_to(new.masks)
  return treedef.unflatten([a != b for a, b in zip(leaves, news, strict=True)])


def cap_grown(old: DynamicMaskState, new: DynamicMaskState, weights: Params) -> Params:
  """With Gradient Annealing a connection that is grown enters with the value GA trained it to
  while it was inactive; it is capped at the smallest magnitude its layer kept:
  ``w <- sign(w) min(|w|, min_{kept} |w|)`` on grown entries (``M_new & ~M_old``), so that it
  joins at the bottom of the active set instead of swamping the few active weights (without
  the cap, RigL+GA on LeNet-300-100 at 98% ended at 25.6% test error, RigL at 4.2%). A layer
  that kept nothing gets its grown weights at zero. Other entries are unchanged."""
  olds, treedef = jax.tree.flatten(old.masks)
  out = []
  for o, n, w in zip(
    olds, treedef.flatten_up_to(new.masks), treedef.flatten_up_to(weights), strict=True
  ):
    magnitude = jnp.abs(w)
    cap = jnp.min(jnp.where(o & n, magnitude, jnp.inf))
    cap = jnp.where(jnp.isfinite(cap), cap, jnp.zeros_like(cap))
    out.append(jnp.where(n & ~o, jnp.sign(w) * jnp.minimum(magnitude, cap), w))
  return treedef.unflatten(out)


def zero_where(tree: Params, fresh: Params, params: Params) -> Params:
  """``tree`` (the params' structure, ``None`` at leaves it leaves out) with the entries marked
  in ``fresh`` set to zero."""
  _, treedef = jax.tree.flatten(params)
  out = [
    x if x is None or f is None else jnp.where(f, jnp.zeros_like(x), x)
    for x, f in zip(treedef.flatten_up_to(tree), treedef.flatten_up_to(fresh), strict=True)
  ]
  return treedef.unflatten(out)


def reset_moments(
  base: optax.GradientTransformation, state: Any, fresh: Params, params: Params
) -> Any:
  """Zeroes, in every tree of ``state`` that has the params' structure (momentum, Adam's
  ``mu`` and ``nu``, ... of any optax base, found by :func:`optax.tree_map_params`), the
  entries marked in ``fresh`` (params' structure, ``None`` at leaves to leave alone)."""
  leaves, treedef = jax.tree.flatten(params)
  flags = treedef.unflatten(
    [jnp.zeros((), bool) if f is None else f for f in treedef.flatten_up_to(fresh)]
  )

  def reset(x, f):
    if not isinstance(x, jax.Array) or x.shape != f.shape or not f.ndim:
      return x
    return jnp.where(f, jnp.zeros_like(x), x)

  return optax.tree_map_params(base, reset, state, flags)

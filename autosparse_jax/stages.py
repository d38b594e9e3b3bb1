"""The stages of a sparse-training update, each an optax-style ``init``/``update`` pair.

The chain (:func:`autosparse_jax.optax_chain`) runs them over the *latent* tree
:class:`LatentParams` (dense weights ``W`` and thresholds ``s``):

1. a mask stage (:func:`threshold_mask`, :func:`topk_mask`, :func:`magnitude_mask`) turns the
   gradient at the effective weights, ``g = dL/dW_eff``, into :class:`MaskedGradients`: the
   weight gradient before annealing, the forward mask and the threshold gradients. It also
   knows how to ``sparsify`` latent weights into effective ones;
2. :func:`gradient_annealing` scales the masked part of the weight gradient by ``alpha_t``;
3. the base optimizer updates weights and thresholds.

Leaves that are not pruned carry ``None`` in the mask and threshold trees and pass through.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from autosparse_jax import counting, schedules, topk
from autosparse_jax.budgets import Budget
from autosparse_jax.selection import Prunable, select_leaves

Params = Any
GRANULARITIES = ("layer", "channel")


class LatentParams(NamedTuple):
  """The latent state a sparse model is trained in.

  Attributes:
    weights: dense latent weights ``W``, a tree with the params' structure.
    thresholds: threshold parameters ``s`` (``tau = sigmoid(s)``), the params' structure with
      ``None`` at leaves that are not pruned by a threshold.
  """

  weights: Params
  thresholds: Params


class MaskedGradients(NamedTuple):
  """What a mask stage hands to :func:`gradient_annealing`.

  Attributes:
    weights: gradient w.r.t. the latent weights before annealing (zero outside the set of
      weights that may receive gradient at all, e.g. TopKAST's backward set).
    masks: boolean forward mask ``M`` per pruned leaf, ``None`` elsewhere.
    thresholds: ``dL/ds`` from the kept weights, ``None`` where there is no threshold.
    masked_thresholds: the same sum over the masked weights, which
      ``gradient_annealing(ga_on_threshold=True)`` adds scaled by ``alpha_t``.
  """

  weights: Params
  masks: Params
  thresholds: Params
  masked_thresholds: Params


class MaskStage(NamedTuple):
  """A ``GradientTransformation`` (``init``, ``update``) plus ``sparsify``.

  ``update(grads, state, latent) -> (MaskedGradients, state)``;
  ``sparsify(latent, state, step) -> (effective_weights, state)`` gives ``W_eff`` (the params'
  structure, ``None`` at leaves not pruned) for the model at ``step``.
  """

  init: Callable[[LatentParams], Any]
  update: Callable[..., tuple[MaskedGradients, Any]]
  sparsify: Callable[[LatentParams, Any, jax.Array], tuple[Params, Any]]


class GradientAnnealingState(NamedTuple):
  # Not named ``count``: ``optax.tree_utils.tree_get(state, "count")`` finds the base's.
  step: jax.Array  # steps taken
  alpha: jax.Array  # alpha_t used by the last update (alpha_0 before the first)


def _flat(tree: Params, *others: Params) -> tuple[Any, list[list[Any]]]:
  """The leaves of ``tree`` and of each of ``others`` cut at ``tree``'s leaves, so that a
  ``None`` in ``others`` (a leaf that is not pruned) lines up with a leaf of ``tree``."""
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, [leaves] + [treedef.flatten_up_to(o) for o in others]


def _reduce_axes(threshold: jax.Array) -> tuple[int, ...]:
  """The kernel axes one threshold covers: those where it has size 1 (all but the channels)."""
  return tuple(i for i, n in enumerate(threshold.shape) if n == 1)


def soft_threshold(w: jax.Array, s: jax.Array) -> jax.Array:
  """``W_eff = sign(W) * max(|W| - sigmoid(s), 0)``; ``s`` broadcasts against ``W``."""
  tau = jax.nn.sigmoid(s).astype(w.dtype)
  return jnp.sign(w) * jax.nn.relu(jnp.abs(w) - tau)


def init_thresholds(params: Params, flags: list[bool], value: float, granularity: str) -> Params:
  """Threshold parameters ``s = value`` for each flagged leaf: one per layer (shape
  ``(1,) * ndim``) or one per output channel (the last kernel axis, shape
  ``(1, ..., 1, C)``); ``None`` at the other leaves."""
  if granularity not in GRANULARITIES:
    raise ValueError(f"granularity: expected one of {GRANULARITIES}, got {granularity!r}")
  leaves, treedef = jax.tree.flatten(params)

  def make(w, pruned):
    if not pruned:
      return None
    shape = (1,) * w.ndim if granularity == "layer" else (1,) * (w.ndim - 1) + (w.shape[-1],)
    return jnp.full(shape, value, jnp.float32)

  return treedef.unflatten([make(w, f) for w, f in zip(leaves, flags, strict=True)])


def _signed_sum(g, w, tau, axes, *, kept: bool) -> jax.Array:
  """``sum(sign(W) * g)`` over the kept weights ``|W| > tau`` (or the others), over ``axes``.

  The 0/1 of the mask is :func:`autosparse_jax.counting.step`'s arithmetic where ``tau`` allows
  (the same terms: ``x * 1 = x``), so that the sum fuses with it on XLA:CPU instead of reading a
  select written out first; a select otherwise. Both in branches that read ``g`` and ``W``
  themselves, as operands shared with the rest of the update would be written out first."""
  tau = tau.astype(w.dtype).astype(jnp.float32)

  def signed(g, w):
    return jnp.sign(w).astype(jnp.float32) * g.astype(jnp.float32)

  def fused(g, w):
    on = counting.step(jnp.abs(w.astype(jnp.float32)), tau)
    return jnp.sum(signed(g, w) * (on if kept else 1.0 - on), axis=axes, keepdims=True)

  def selected(g, w):
    m = jnp.abs(w.astype(jnp.float32)) > tau
    return jnp.sum(jnp.where(m if kept else ~m, signed(g, w), 0.0), axis=axes, keepdims=True)

  return counting.fused_or_compared(w, tau, fused, selected, g, w)


def threshold_mask() -> MaskStage:
  """STR's soft-threshold mask stage, for every leaf that has a threshold.

  With ``tau = sigmoid(s)``, ``M = |W| > tau`` and ``g = dL/dW_eff``:

  * weight gradient (before annealing): ``g``; :func:`gradient_annealing` makes it
    ``g * (M + alpha_t (1 - M))``, and ``alpha_t = 0`` is exactly ``dL/dW``;
  * ``dL/ds = -sigmoid'(s) * sum(sign(W) * g * M)`` over the layer (or each output channel);
  * ``masked_thresholds``: the same sum over ``1 - M``, for ``ga_on_threshold``.
  """

  def init(latent):
    del latent
    return optax.EmptyState()

  def update(grads, state, latent):
    treedef, (gs, ws, ss) = _flat(grads, latent.weights, latent.thresholds)
    masks, kept, masked = [], [], []
    for g, w, s in zip(gs, ws, ss, strict=True):
      if s is None:
        for out in (masks, kept, masked):
          out.append(None)
        continue
      tau = jax.nn.sigmoid(s)
      m = jnp.abs(w) > tau.astype(w.dtype)
      axes = _reduce_axes(s)
      slope = -tau * (1.0 - tau)  # d sigmoid(s) / ds, negated: a larger tau shrinks |W_eff|
      masks.append(m)
      kept.append(slope * _signed_sum(g, w, tau, axes, kept=True))
      masked.append(slope * _signed_sum(g, w, tau, axes, kept=False))
    unflat = treedef.unflatten
    return MaskedGradients(grads, unflat(masks), unflat(kept), unflat(masked)), state

  def sparsify(latent, state, step):
    del step
    treedef, (ws, ss) = _flat(latent.weights, latent.thresholds)
    eff = [None if s is None else soft_threshold(w, s) for w, s in zip(ws, ss, strict=True)]
    return treedef.unflatten(eff), state

  return MaskStage(init, update, sparsify)


def _check_sparsity(value: float, name: str) -> float:
  if not isinstance(value, int | float) or not 0.0 <= value < 1.0:
    raise ValueError(f"{name}: a sparsity must be a number in [0, 1), got {value!r}")
  return float(value)


def _pruned_leaves(weights: Params, prunable: Prunable):
  flags = select_leaves(weights, prunable)
  leaves, treedef = jax.tree.flatten(weights)
  return treedef, leaves, flags


class TopKState(NamedTuple):
  """Per pruned leaf, the :class:`autosparse_jax.topk.Cutoff` of the forward and backward sets
  of the current latent weights (``None`` elsewhere), found once per step by ``sparsify``
  (starting from the previous step's cuts), and how many passes that search took."""

  forward: Params
  backward: Params
  passes: jax.Array


def topk_mask(
  forward_sparsity: float,
  backward_sparsity: float | None = None,
  *,
  penalty: float = 0.0,
  prunable: Prunable = None,
  budget: Budget | None = None,
) -> MaskStage:
  """TopKAST's mask stage: per layer, forward set ``A`` = the top ``1 - forward_sparsity``
  fraction of ``|W|``, backward set ``B`` (containing ``A``) the top ``1 - backward_sparsity``.

  ``W_eff = W * 1[A]``. The weight gradient is ``g`` on ``B`` and 0 elsewhere;
  :func:`gradient_annealing` then scales ``B \\ A`` by ``alpha_t`` (plain TopKAST: alpha = 1).
  ``penalty`` adds the gradient of TopKAST's regulariser
  ``penalty / 2 * (|W_A|^2 + |W_{B\\A}|^2 / D)`` with ``D = 1 - forward_sparsity``.
  Sets are exact counts (``round(density * size)`` entries, ties broken by flat index), found
  shard-locally by :mod:`autosparse_jax.topk`; with a ``budget`` the sparsities are overall
  ones, spread over the layers by :meth:`autosparse_jax.budgets.Budget.keep_counts`.
  """
  forward = _check_sparsity(forward_sparsity, "forward_sparsity")
  backward = (
    forward
    if backward_sparsity is None
    else _check_sparsity(backward_sparsity, "backward_sparsity")
  )
  if backward > forward:
    raise ValueError(
      f"backward_sparsity: must be <= forward_sparsity ({forward}) so that the backward set "
      f"contains the forward set, got {backward}"
    )
  if penalty < 0:
    raise ValueError(f"penalty: must be >= 0, got {penalty}")
  density = 1.0 - forward

  def search(latent, previous=None):
    """The cuts of A and B of every pruned leaf, in one joint search (each kernel read once
    per pass for both budgets), warm-started from ``previous``'s cuts; None elsewhere."""
    treedef, leaves, flags = _pruned_leaves(latent.weights, prunable)
    ws = [w for w, f in zip(leaves, flags, strict=True) if f]
    sparsities = (forward,) if backward == forward else (forward, backward)
    if budget is None:
      counts = [topk.keep_count(w.size, s) for s in sparsities for w in ws]
    else:
      counts = [k for s in sparsities for k in budget.keep_counts([w.shape for w in ws], s)]
    start = None
    if previous is not None:
      sets = (previous.forward, previous.backward)[: len(sparsities)]
      start = [
        c.value
        for cuts in sets
        for c, f in zip(treedef.flatten_up_to(cuts), flags, strict=True)
        if f
      ]
    found = topk.search(ws * len(sparsities), counts, start)
    cuts = iter(found.cuts)
    sets = []
    for _ in sparsities:
      sets.append(treedef.unflatten([next(cuts) if f else None for f in flags]))
    if len(sets) == 1:  # B = A, held as a copy: state leaves sharing a buffer cannot be donated
      sets.append(jax.tree.map(jnp.copy, sets[0]))
    return TopKState(*sets, found.passes)

  def masks(leaves, cuts):
    return [None if c is None else topk.mask(w, c) for w, c in zip(leaves, cuts, strict=True)]

  def init(latent):
    if not jax.tree.leaves(latent.weights):  # optax.tree_map_params' placeholder
      return TopKState(*[jnp.zeros((), jnp.int32) for _ in range(3)])
    return search(latent)

  def update(grads, state, latent):
    leaves, treedef = jax.tree.flatten(latent.weights)
    gs = treedef.flatten_up_to(grads)
    fwd = masks(leaves, treedef.flatten_up_to(state.forward))
    bwd = fwd if backward == forward else masks(leaves, treedef.flatten_up_to(state.backward))
    out = []
    for g, w, a, b in zip(gs, leaves, fwd, bwd, strict=True):
      if a is None:
        out.append(g)
        continue
      g = jnp.where(b, g, jnp.zeros_like(g))
      if penalty:
        scale = jnp.where(a, penalty, jnp.where(b, penalty / density, 0.0)).astype(w.dtype)
        g = g + scale * w
      out.append(g)
    nones = treedef.unflatten([None] * len(leaves))
    return MaskedGradients(treedef.unflatten(out), treedef.unflatten(fwd), nones, nones), state

  def sparsify(latent, state, step):
    del step
    state = search(latent, state)  # cached for the next update, whose latent this is
    leaves, treedef = jax.tree.flatten(latent.weights)
    fwd = masks(leaves, treedef.flatten_up_to(state.forward))
    eff = [None if m is None else jnp.where(m, w, 0) for w, m in zip(leaves, fwd, strict=True)]
    return treedef.unflatten(eff), state

  return MaskStage(init, update, sparsify)


class MagnitudeMaskState(NamedTuple):
  masks: Params  # boolean, the params' structure (all True at leaves that are not pruned)


def magnitude_mask(
  sparsity: Callable[[jax.Array], jax.Array],
  *,
  begin_step: int,
  end_step: int,
  frequency: int,
  prunable: Prunable = None,
  budget: Budget | None = None,
  final_sparsity: float | None = None,
) -> MaskStage:
  """Gradual magnitude pruning's mask stage (Zhu & Gupta, 2017): hard masks.

  At the steps ``begin_step + i * frequency <= end_step`` the mask of each layer becomes the
  top ``1 - sparsity(step)`` fraction of the surviving ``|W|``; in between it is fixed. With a
  ``budget``, layer ``l`` instead keeps ``round(n_l (1 - s_l sparsity(step) / final_sparsity))``,
  ``s_l`` its sparsity in the budget at ``final_sparsity`` (exact counts at the end).
  Pruned weights get no gradient and stay zero in ``W_eff = W * M``; once pruned, a weight
  never returns (its masked magnitude is 0, below every survivor).
  """
  if begin_step < 0 or end_step < begin_step:
    raise ValueError(
      f"begin_step, end_step: need 0 <= begin_step <= end_step, got {begin_step}, {end_step}"
    )
  if frequency < 1:
    raise ValueError(f"frequency: must be a positive number of steps, got {frequency}")

  def init(latent):
    state = MagnitudeMaskState(jax.tree.map(lambda w: jnp.ones_like(w, bool), latent.weights))
    if begin_step == 0 and jax.tree.leaves(latent.weights):  # step 0 is a pruning step
      _, state = sparsify(latent, state, jnp.zeros((), jnp.int32))
    return state

  def update(grads, state, latent):
    treedef, leaves, flags = _pruned_leaves(latent.weights, prunable)
    gs = treedef.flatten_up_to(grads)
    ms = treedef.flatten_up_to(state.masks)
    masks = [m if f else None for m, f in zip(ms, flags, strict=True)]
    out = [g if m is None else jnp.where(m, g, 0) for g, m in zip(gs, masks, strict=True)]
    nones = treedef.unflatten([None] * len(leaves))
    return MaskedGradients(treedef.unflatten(out), treedef.unflatten(masks), nones, nones), state

  def sparsify(latent, state, step):
    treedef, leaves, flags = _pruned_leaves(latent.weights, prunable)
    ms = treedef.flatten_up_to(state.masks)
    idx = [i for i, f in enumerate(flags) if f]

    def prune(old):  # only on mask-update steps: the surviving weights' top-k
      survivors = [jnp.where(m, leaves[i], 0) for m, i in zip(old, idx, strict=True)]
      target = sparsity(step)
      if budget is None:
        ks = [topk.keep_count(w.size, target) for w in survivors]
      else:
        finals = budget.keep_counts([w.shape for w in survivors], final_sparsity)
        scale = target / final_sparsity if final_sparsity else 0.0
        ks = [
          topk.keep_count(w.size, (1 - k / w.size) * scale)
          for w, k in zip(survivors, finals, strict=True)
        ]
      return [topk.mask(w, c) for w, c in zip(survivors, topk.cutoffs(survivors, ks), strict=True)]

    boundary = (step >= begin_step) & (step <= end_step) & ((step - begin_step) % frequency == 0)
    new = jax.lax.cond(boundary, prune, lambda old: old, [ms[i] for i in idx])
    for i, m in zip(idx, new, strict=True):
      ms[i] = m
    eff = [jnp.where(m, w, 0) if f else None for w, m, f in zip(leaves, ms, flags, strict=True)]
    return treedef.unflatten(eff), MagnitudeMaskState(treedef.unflatten(ms))

  return MaskStage(init, update, sparsify)


def gradient_annealing(
  alpha: schedules.ScalarOrSchedule, *, ga_on_threshold: bool = False
) -> optax.GradientTransformation:
  """Gradient Annealing: ``dL/dW = g * (M + alpha_t * (1 - M))``.

  Maps :class:`MaskedGradients` to a :class:`LatentParams` tree of gradients. Pruned weights
  keep receiving ``alpha_t`` of their gradient, so they can grow back while ``alpha_t > 0``;
  ``alpha = 0`` is STR exactly, ``alpha = 1`` a straight-through estimator. With
  ``ga_on_threshold`` the threshold gradient also gets ``alpha_t`` times the masked weights'
  contribution.
  """
  schedule = schedules.as_schedule(alpha)

  def init(params):
    del params
    step = jnp.zeros((), jnp.int32)
    return GradientAnnealingState(step, jnp.asarray(schedule(step), jnp.float32))

  def update(masked: MaskedGradients, state, params=None):
    del params
    a = jnp.asarray(schedule(state.step), jnp.float32)
    treedef, (gs, ms, ts, xs) = _flat(
      masked.weights, masked.masks, masked.thresholds, masked.masked_thresholds
    )
    weights, thresholds = [], []
    for g, m, t, x in zip(gs, ms, ts, xs, strict=True):
      weights.append(g if m is None else jnp.where(m, g, a.astype(g.dtype) * g))
      thresholds.append(t + a * x if (ga_on_threshold and t is not None) else t)
    grads = LatentParams(treedef.unflatten(weights), treedef.unflatten(thresholds))
    return grads, GradientAnnealingState(optax.safe_increment(state.step), a)

  return optax.GradientTransformation(init, update)

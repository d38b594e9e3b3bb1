"""FLOP accounting for sparse models: dense, inference and training multiply-accumulates.

Units. A MAC is one multiply-accumulate; ``FLOPs = 2 * MACs`` (:func:`macs_to_flops`).
STR and the MobileNet paper quote MACs (ResNet-50: 4.09G, MobileNetV1: 569M); RigL quotes
FLOPs (ResNet-50: 8.2G). Every function here returns MACs unless its name says otherwise.

Dense cost (:func:`count_macs`), for ONE example, of every conv and dense layer whose kernel is
a leaf of the params tree, found by tracing the model (``jax.make_jaxpr``):

* ``conv_general_dilated``: ``MACs = prod(output shape) * prod(kernel window) * C_in / G``,
  where ``C_in / G`` is the kernel's input-feature size (``G = feature_group_count``; a
  depthwise 3x3 conv costs ``H_out * W_out * C * 9``). Padding and dilation zeros count, as in
  every published table.
* ``dot_general`` with exactly one operand a param leaf:
  ``MACs = prod(output shape) * prod(contracting sizes)``; Dense ``(B, n) @ (n, m)`` is
  ``B * n * m``.
* Both are divided by the example batch size. Ops without a kernel (pooling, batch norm,
  activations, the residual adds) are not counted. STR's ResNet-50 table adds its average
  pool as an extra row, ``7 * 7 * 2048 = 100,352`` (:func:`global_avg_pool_macs`): dense
  ResNet-50 = 4,089,184,256 conv+dense MACs + 100,352 = 4,089,284,608.

Inference cost (:func:`inference_macs`): ``sum_l d_l * M_l (+ extras)``, with ``M_l`` the
dense MACs of layer l and ``d_l = nnz(W_l) / size(W_l) = 1 - s_l`` its density, measured from
the actual zeros of the params (the sparse model computes with ``W_eff``, exact zeros). This
is the cost of a sparse kernel that skips every zero weight; it ignores activation sparsity.

Training cost per step (:func:`training_macs_per_step`), the RigL convention: each layer runs
three products of about one forward's cost each, at the density it needs:

* forward ``y = x * W_eff``: ``d^fwd_l * M_l``;
* activation gradient ``dL/dx = dL/dy * W_eff^T``: ``d^fwd_l * M_l`` (the stem's is counted
  too, though nothing needs it -- as in the ``3 x forward`` convention);
* weight gradient ``dL/dW = x^T * dL/dy``, needed only where a weight receives a gradient:
  ``d^wg_l * M_l``, with ``d^wg_l = 1`` while GA's ``alpha_t > 0`` (masked weights get
  ``alpha_t * g``) and for a straight-through estimator, ``d^wg_l = d^fwd_l`` once
  ``alpha_t = 0`` (STR), and TopKAST's backward density ``1 - backward_sparsity``.

so ``C_step = sum_l M_l * (2 d^fwd_l + d^wg_l)``; dense training costs ``3 * sum_l M_l``. Over
a run (:func:`training_cost_ratio`), ``sum_steps C_step / (n_steps * 3 * sum_l M_l)``. The
optimizer's own elementwise work (thresholds, masks, momentum) is not counted.

Param paths are the '/'-joined key paths of the first argument of the traced function (dict
keys, attribute names, sequence indices; an ``nnx`` Variable's trailing ``value`` is dropped),
the same strings as the optimizer's leaf paths: tracing ``model.apply`` with
``{'params': ..., 'batch_stats': ...}`` gives ``'params/conv_init/kernel'``; tracing
``lambda p, x: model.apply({'params': p, ...}, x)`` gives ``'conv_init/kernel'``. The lookup
functions below accept either form against either tree.

This module imports only jax and numpy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

__all__ = [
  "RunningTrainingCost",
  "TrainingCostRecord",
  "count_macs",
  "densities_from_record",
  "global_avg_pool_macs",
  "inference_ratio_from_density",
  "inference_macs",
  "layer_density",
  "macs_to_flops",
  "training_cost_ratio",
  "training_macs_per_step",
  "weight_grad_density",
]

# Ops through which a param keeps its identity (same values, other dtype or shape).
_PASS_THROUGH = frozenset(
  {
    "convert_element_type",
    "reshape",
    "transpose",
    "copy",
    "copy_p",
    "squeeze",
    "expand_dims",
    "reduce_precision",
    "sharding_constraint",
    "mesh_cast",
    "pvary",
  }
)
# Multi-operand ops that map operand i to result i unchanged.
_PASS_THROUGH_MULTI = frozenset({"device_put", "optimization_barrier"})


# --------------------------------------------------------------------------- paths


def _key_name(key: Any) -> str:
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return str(key.name)
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _path_string(path: Sequence[Any]) -> str:
  names = [_key_name(k) for k in path]
  if len(names) > 1 and names[-1] == "value" and isinstance(path[-1], jax.tree_util.GetAttrKey):
    names = names[:-1]
  return "/".join(names)


def _leaves_by_path(tree: Any) -> dict[str, Any]:
  return {_path_string(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _alternatives(path: str) -> tuple[str, ...]:
  """``path`` and its form in the other tree (with / without the 'params/' collection)."""
  if path.startswith("params/"):
    return (path, path[len("params/") :])
  return (path, "params/" + path)


def _lookup(table: Mapping[str, Any], path: str) -> Any:
  for p in _alternatives(path):
    if p in table:
      return table[p]
  raise KeyError(path)


# --------------------------------------------------------------------------- dense MACs


def _is_var(v: Any) -> bool:
  return not isinstance(v, jex_core.Literal)


def _size(shape: Sequence[int]) -> int:
  return math.prod(int(d) for d in shape)


def _conv_macs(eqn: Any) -> int:
  lhs, rhs = eqn.invars[:2]
  dn = eqn.params["dimension_numbers"]
  if not isinstance(dn, jax.lax.ConvDimensionNumbers):
    dn = jax.lax.conv_dimension_numbers(lhs.aval.shape, rhs.aval.shape, dn)
  kshape = rhs.aval.shape
  window = _size(kshape[d] for d in dn.rhs_spec[2:])
  in_features = int(kshape[dn.rhs_spec[1]])  # = C_in / feature_group_count
  return _size(eqn.outvars[0].aval.shape) * window * in_features


def _dot_macs(eqn: Any) -> int:
  lhs = eqn.invars[0]
  (lhs_contract, _), _ = eqn.params["dimension_numbers"]
  contract = _size(lhs.aval.shape[d] for d in lhs_contract)
  return _size(eqn.outvars[0].aval.shape) * contract


def _as_jaxpr(x: Any) -> Any | None:
  if isinstance(x, jex_core.ClosedJaxpr):
    return x.jaxpr
  if isinstance(x, jex_core.Jaxpr):
    return x
  return None


def _sub_jaxprs(params: Mapping[str, Any]) -> Iterable[Any]:
  for value in params.values():
    j = _as_jaxpr(value)
    if j is not None:
      yield j
    elif isinstance(value, (tuple, list)):
      for v in value:
        j = _as_jaxpr(v)
        if j is not None:
          yield j


def _bind(inner_vars: Sequence[Any], outer_vars: Sequence[Any], src: Mapping[Any, str]) -> dict:
  return {i: src[o] for i, o in zip(inner_vars, outer_vars, strict=True) if _is_var(o) and o in src}


def _add(counts: dict[str, int], key: str, macs: int) -> None:
  counts[key] = counts.get(key, 0) + macs


def _walk(jaxpr: Any, src: dict[Any, str], counts: dict[str, int], mult: int) -> None:
  """Adds the MACs of ``jaxpr`` (run ``mult`` times) to ``counts``; ``src`` maps vars to
  param paths and is extended in place with vars that are a param in another dtype/shape."""

  def source(v: Any) -> str | None:
    return src.get(v) if _is_var(v) else None

  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "conv_general_dilated":
      key = source(eqn.invars[1])
      if key is not None:
        _add(counts, key, mult * _conv_macs(eqn))
    elif name == "dot_general":
      keys = [source(v) for v in eqn.invars[:2]]
      found = [k for k in keys if k is not None]
      if len(found) == 1:
        _add(counts, found[0], mult * _dot_macs(eqn))
    elif name in _PASS_THROUGH or (
      name == "broadcast_in_dim"
      and _size(eqn.outvars[0].aval.shape) == _size(eqn.invars[0].aval.shape)
    ):
      key = source(eqn.invars[0])
      if key is not None:
        src[eqn.outvars[0]] = key
    elif name in _PASS_THROUGH_MULTI:
      for i, o in zip(eqn.invars, eqn.outvars, strict=False):
        key = source(i)
        if key is not None:
          src[o] = key
    elif name == "scan":
      body = eqn.params["jaxpr"].jaxpr
      _walk(body, _bind(body.invars, eqn.invars, src), counts, mult * eqn.params["length"])
    elif name == "while":
      # The trip count is unknown at trace time: the body is counted once.
      nc, nb = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
      body = eqn.params["body_jaxpr"].jaxpr
      _walk(body, _bind(body.invars, eqn.invars[nc:], src), counts, mult)
      cond = eqn.params["cond_jaxpr"].jaxpr
      cond_outer = list(eqn.invars[:nc]) + list(eqn.invars[nc + nb :])
      _walk(cond, _bind(cond.invars, cond_outer, src), counts, mult)
    elif name == "cond":
      # Alternatives: each layer is charged its most expensive branch.
      best: dict[str, int] = {}
      for branch in eqn.params["branches"]:
        b = branch.jaxpr
        branch_counts: dict[str, int] = {}
        _walk(b, _bind(b.invars, eqn.invars[1:], src), branch_counts, mult)
        for k, v in branch_counts.items():
          best[k] = max(best.get(k, 0), v)
      for k, v in best.items():
        _add(counts, k, v)
    else:
      # jit/pjit, closed_call, remat/checkpoint, custom_jvp_call, custom_vjp_call, ...:
      # inner invars are the operands, one to one. Results that are a param pass out.
      for inner in _sub_jaxprs(eqn.params):
        if len(inner.invars) == len(eqn.invars):
          inner_src = _bind(inner.invars, eqn.invars, src)
        else:
          inner_src = {}
        _walk(inner, inner_src, counts, mult)
        if len(inner.outvars) == len(eqn.outvars):
          for i, o in zip(inner.outvars, eqn.outvars, strict=True):
            if _is_var(i) and i in inner_src:
              src[o] = inner_src[i]


def _infer_batch_size(example_args: Sequence[Any]) -> int:
  for leaf in jax.tree_util.tree_leaves(example_args):
    shape = getattr(leaf, "shape", ())
    if len(shape) >= 1:
      return int(shape[0])
  return 1


def count_macs(
  apply_fn: Callable[..., Any],
  params: Any,
  *example_args: Any,
  batch_size: int | None = None,
  **kwargs: Any,
) -> dict[str, int]:
  """Dense multiply-accumulates (MACs, not FLOPs) per layer for ONE example.

  Traces ``apply_fn(params, *example_args, **kwargs)`` with ``jax.make_jaxpr`` (nothing is
  computed, so ``params`` and ``example_args`` may be ``jax.ShapeDtypeStruct``s, e.g. from
  ``jax.eval_shape(model.init, ...)``) and walks the jaxpr, nested ones included (jit,
  closed_call, remat, custom_jvp/vjp, scan -- times its length --, while -- its body once --,
  cond -- its most expensive branch). Counted ops:

  * ``conv_general_dilated``: ``prod(out shape) * prod(window) * C_in / feature_group_count``
  * ``dot_general`` with exactly one param operand: ``prod(out shape) * prod(contracted)``

  each charged to the param leaf its kernel operand comes from -- directly, or through
  dtype casts, reshapes, transposes, same-size broadcasts and nested-jaxpr boundaries. A
  layer used twice (weight tying, a block applied repeatedly) is charged twice. Ops without
  a param kernel (pooling, norms, attention's activation-activation products) are not
  counted; a conv whose kernel is computed (not a leaf) is not counted either.

  Args:
    apply_fn: e.g. a Flax ``model.apply``; its first argument is the params tree.
    params: the params (or variables) tree; the result's keys are its '/'-joined leaf paths.
    *example_args: the rest of ``apply_fn``'s positional arguments (traced).
    batch_size: the example batch size that every count is divided by; by default the
      leading dimension of the first array in ``example_args`` (1 if there is none).
    **kwargs: static keyword arguments for ``apply_fn`` (e.g. ``train=False``); they are
      not traced, so Python control flow on them works.

  Returns:
    ``{param path: MACs per example}`` in first-use order, e.g.
    ``{'params/conv_init/kernel': 118013952, ...}``.

  Raises:
    ValueError: if a layer's count is not a multiple of ``batch_size`` (a wrong batch size).
  """
  closed = jax.make_jaxpr(lambda p, *a: apply_fn(p, *a, **kwargs))(params, *example_args)
  jaxpr = closed.jaxpr
  param_paths = [_path_string(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  src = {v: path for v, path in zip(jaxpr.invars, param_paths, strict=False)}
  counts: dict[str, int] = {}
  _walk(jaxpr, src, counts, 1)
  b = _infer_batch_size(example_args) if batch_size is None else int(batch_size)
  if b < 1:
    raise ValueError(f"batch_size must be >= 1, got {b}")
  out = {}
  for k, v in counts.items():
    if v % b:
      raise ValueError(f"batch_size={b} does not divide the {v} MACs of {k!r}; pass batch_size=")
    out[k] = v // b
  return out


def global_avg_pool_macs(feature_shape: Sequence[int]) -> int:
  """MACs STR's table charges a global average pool: one add per input element, ``H*W*C``.

  ``feature_shape`` is one example's ``(H, W, C)``; ResNet-50 at 224: ``(7, 7, 2048)`` ->
  100,352. Pass it to :func:`inference_macs` as an ``extra_macs`` entry.
  """
  return _size(feature_shape)


def macs_to_flops(macs: int | float) -> int | float:
  """FLOPs from multiply-accumulates: ``FLOPs = 2 * MACs``."""
  return 2 * macs


# --------------------------------------------------------------------------- sparse MACs


def _nonzero_fraction(leaf: Any) -> float:
  size = int(np.prod(np.shape(leaf)))
  if size == 0:
    return 0.0
  if isinstance(leaf, np.ndarray):
    nnz = int(np.count_nonzero(leaf))
  else:
    nnz = int(jnp.count_nonzero(leaf))
  return nnz / size


def layer_density(params: Any, paths: Iterable[str] | None = None) -> dict[str, float]:
  """Density ``d_l = nnz(W_l) / size(W_l) = 1 - sparsity_l`` per leaf, from the actual zeros.

  Args:
    params: a params tree (concrete arrays).
    paths: which leaves, e.g. the keys of :func:`count_macs`'s result (with or without a
      leading 'params/'); by default every leaf.

  Returns:
    ``{path: density}`` keyed by the given paths.
  """
  table = _leaves_by_path(params)
  paths = list(table) if paths is None else list(paths)
  out = {}
  for path in paths:
    try:
      leaf = _lookup(table, path)
    except KeyError:
      raise ValueError(
        f"no leaf at path {path!r} in params; its leaves include {sorted(table)[:8]} ..."
      ) from None
    out[path] = _nonzero_fraction(leaf)
  return out


def inference_macs(
  dense_macs: Mapping[str, int],
  params: Any,
  *,
  extra_macs: Mapping[str, int] | None = None,
) -> dict[str, Any]:
  """Inference MACs of a sparse model: ``sum_l (1 - s_l) * M_l + sum(extra_macs)``.

  Args:
    dense_macs: ``{path: M_l}``, dense MACs per layer (from :func:`count_macs`).
    params: the (sparse) params; ``s_l`` is measured from the zeros of the leaf at each path
      (paths with or without a leading 'params/' match either tree).
    extra_macs: costs charged in full to both sparse and dense totals, e.g.
      ``{'avg_pool': global_avg_pool_macs((7, 7, 2048))}`` for STR's ResNet-50 table.

  Returns:
    ``{'per_layer': {path: MACs}, 'density': {path: d_l}, 'total': MACs,
    'dense_total': MACs, 'ratio': total / dense_total}`` (MACs as floats; per_layer includes
    the extras).
  """
  density = layer_density(params, dense_macs)
  per_layer: dict[str, float] = {k: density[k] * m for k, m in dense_macs.items()}
  extras = dict(extra_macs or {})
  per_layer.update({k: float(v) for k, v in extras.items()})
  total = sum(per_layer.values())
  dense_total = sum(dense_macs.values()) + sum(extras.values())
  return {
    "per_layer": per_layer,
    "density": density,
    "total": total,
    "dense_total": dense_total,
    "ratio": total / dense_total if dense_total else float("nan"),
  }


# --------------------------------------------------------------------------- training MACs

Density = float | Mapping[str, float]


def _density_of(density: Density, path: str, name: str) -> float:
  if not isinstance(density, Mapping):
    d = float(density)
  else:
    try:
      d = float(_lookup(density, path))
    except KeyError:
      return 1.0
  if not 0.0 <= d <= 1.0:
    raise ValueError(f"{name} must be in [0, 1], got {d} for {path!r}")
  return d


def _check_keys(dense_macs: Mapping[str, int], density: Density, name: str) -> None:
  if isinstance(density, Mapping) and density:
    known = {a for k in dense_macs for a in _alternatives(k)}
    if not any(k in known for k in density):
      raise ValueError(
        f"none of the paths of {name} ({sorted(density)[:4]} ...) is a layer of "
        f"dense_macs ({sorted(dense_macs)[:4]} ...)"
      )


def _step_macs(
  dense_macs: Mapping[str, int], forward_density: Density, weight_grad_density: Density
) -> float:
  _check_keys(dense_macs, forward_density, "forward_density")
  _check_keys(dense_macs, weight_grad_density, "weight_grad_density")
  total = 0.0
  for path, m in dense_macs.items():
    d_fwd = _density_of(forward_density, path, "forward_density")
    d_wg = _density_of(weight_grad_density, path, "weight_grad_density")
    total += m * (2.0 * d_fwd + d_wg)
  return total


def training_macs_per_step(
  dense_macs: Mapping[str, int],
  forward_density: Density,
  weight_grad_density: Density,
) -> int:
  """Training MACs of one step for ONE example: ``sum_l M_l * (2 d^fwd_l + d^wg_l)``.

  Forward and activation gradient run at the forward density ``d^fwd_l``; the weight gradient
  at ``d^wg_l`` (1.0 while GA's alpha_t > 0, the forward density once alpha_t = 0 or for STR,
  ``1 - backward_sparsity`` for TopKAST). Dense training is ``3 * sum_l M_l``. Multiply by
  the batch size for a step's total.

  Args:
    dense_macs: ``{path: M_l}`` from :func:`count_macs`.
    forward_density: ``{path: d^fwd_l}`` (e.g. :func:`layer_density` of the params) or one
      float for every layer. Layers missing from a mapping count as dense (1.0).
    weight_grad_density: ``{path: d^wg_l}`` or one float, likewise.

  Raises:
    ValueError: a density outside [0, 1], or a mapping none of whose paths is a layer.
  """
  return round(_step_macs(dense_macs, forward_density, weight_grad_density))


class TrainingCostRecord(NamedTuple):
  """Densities in force for ``steps`` consecutive training steps (one history entry)."""

  forward_density: Density
  weight_grad_density: Density
  steps: int = 1


def training_cost_ratio(
  dense_macs: Mapping[str, int],
  history: Sequence[TrainingCostRecord | Mapping[str, Any]],
) -> float:
  """Training cost of a recorded run relative to dense training of the same length.

  ``ratio = sum_r n_r * C(r) / (sum_r n_r * 3 * sum_l M_l)`` with ``C(r)`` from
  :func:`training_macs_per_step` and ``n_r`` the steps record r covers (RigL's convention:
  averaged over the whole run). A value of 0.45 means the run cost 45% of dense training.

  Args:
    dense_macs: ``{path: M_l}`` from :func:`count_macs`.
    history: per-step or per-interval records: :class:`TrainingCostRecord`s or mappings with
      keys ``forward_density``, ``weight_grad_density`` and optionally ``steps`` (default 1).

  Raises:
    ValueError: an empty history, a negative step count, or bad densities.
  """
  dense_step = 3.0 * sum(dense_macs.values())
  total_cost = 0.0
  total_steps = 0
  for rec in history:
    if isinstance(rec, Mapping):
      rec = TrainingCostRecord(
        rec["forward_density"], rec["weight_grad_density"], rec.get("steps", 1)
      )
    if rec.steps < 0:
      raise ValueError(f"steps must be >= 0, got {rec.steps}")
    total_cost += rec.steps * _step_macs(dense_macs, rec.forward_density, rec.weight_grad_density)
    total_steps += rec.steps
  if total_steps == 0 or dense_step == 0:
    raise ValueError("history must cover at least one step of a model with MACs")
  return total_cost / (total_steps * dense_step)


# --------------------------------------------------------------------------- runs (logging)

GA_METHODS = ("autosparse", "topkast_ga", "rigl_ga", "mest_ga")
"""Methods whose weight gradient is dense while gradient annealing's ``alpha_t > 0``."""
DENSE_GRADIENT_ON_UPDATE = ("rigl", "rigl_ga")
"""Methods that grow by the dense gradient on their mask-update steps (RigL)."""


def weight_grad_density(
  method: str,
  forward_density: Mapping[str, float],
  *,
  alpha: float | None = None,
  backward_sparsity: float | None = None,
  update_every: int | None = None,
) -> Density:
  """The weight-gradient density ``d^wg_l`` of a training method (see the module docstring).

  * ``'dense'``: 1.0;
  * GA methods (``'autosparse'``, ``'topkast_ga'``, ``'rigl_ga'``, ``'mest_ga'``) while
    ``alpha > 0``: 1.0 (masked weights get ``alpha_t * g``; TopKAST+GA's default backward set
    is every weight);
  * ``'topkast'``, ``'topkast_pp'``: ``1 - backward_sparsity`` on every layer of
    ``forward_density`` (the prunable ones; the others count as dense);
  * ``'rigl'`` (and ``'rigl_ga'`` once ``alpha = 0``): ``d_l + (1 - d_l) / update_every``, the
    dense gradient one step in ``update_every`` (RigL's own accounting);
  * otherwise (``'str'``, ``'gmp'``, ``'set'``, ``'mest'``: random growth, MEST's score uses
    the sparse gradient; GA methods once ``alpha = 0``): ``forward_density``.
  """
  if method == "dense":
    return 1.0
  if method in GA_METHODS and alpha is not None and alpha > 0:
    return 1.0
  if method in ("topkast", "topkast_pp"):
    if backward_sparsity is None:
      raise ValueError(f"method {method!r} needs its backward_sparsity")
    return {k: 1.0 - float(backward_sparsity) for k in forward_density}
  if method in DENSE_GRADIENT_ON_UPDATE:
    if not update_every or update_every < 1:
      raise ValueError(f"method {method!r} needs its update_every (>= 1), got {update_every}")
    return {k: d + (1.0 - d) / update_every for k, d in forward_density.items()}
  return dict(forward_density)


def densities_from_record(record: Mapping[str, Any]) -> dict[str, float]:
  """``{path: 1 - s_l}`` from a logged record's ``sparsity/<path>`` keys (``sparsity/total``
  is left out)."""
  return {
    k.removeprefix("sparsity/"): 1.0 - float(v)
    for k, v in record.items()
    if k.startswith("sparsity/") and k != "sparsity/total"
  }


def inference_ratio_from_density(
  dense_macs: Mapping[str, int], forward_density: Mapping[str, float]
) -> float:
  """``sum_l d_l M_l / sum_l M_l``; layers missing from ``forward_density`` count as dense."""
  dense_total = float(sum(dense_macs.values()))
  if not dense_total:
    return float("nan")
  sparse = sum(m * _density_of(forward_density, p, "density") for p, m in dense_macs.items())
  return sparse / dense_total


class RunningTrainingCost:
  """The training-cost ratio of a run so far, updated at each log step (cheap: per-layer
  densities the logging already measured, no work per train step).

  Each :meth:`update` at global step ``s`` charges the steps since the previous update (or since
  step 0) at the densities measured at ``s``; :attr:`ratio` is then
  ``sum_r n_r C(r) / (sum_r n_r * 3 * sum_l M_l)`` (:func:`training_cost_ratio`). A resumed run
  replays the logged records through :meth:`update` (:meth:`replay`), so its values equal the
  uninterrupted run's.
  """

  def __init__(
    self,
    dense_macs: Mapping[str, int],
    method: str,
    backward_sparsity: float | None = None,
    update_every: int | None = None,
  ):
    self.dense_macs = dict(dense_macs)
    self.method = method
    self.backward_sparsity = backward_sparsity
    self.update_every = update_every
    self.cost = 0.0  # sum_r n_r * C(r), MACs per example
    self.steps = 0
    self.last_step = 0

  def update(
    self, step: int, forward_density: Mapping[str, float], alpha: float | None = None
  ) -> float:
    """Charges steps ``(last_step, step]``; returns the ratio so far."""
    n = int(step) - self.last_step
    if n < 0:
      raise ValueError(f"step {step} is before the last update's step {self.last_step}")
    if self.method == "dense":
      fwd: Density = 1.0
    else:
      fwd = forward_density
    wg = weight_grad_density(
      self.method,
      forward_density,
      alpha=alpha,
      backward_sparsity=self.backward_sparsity,
      update_every=self.update_every,
    )
    self.cost += n * _step_macs(self.dense_macs, fwd, wg)
    self.steps += n
    self.last_step = int(step)
    return self.ratio

  def update_from_record(self, record: Mapping[str, Any]) -> float:
    """:meth:`update` from a logged record (``step``, ``sparsity/<path>``, ``alpha``)."""
    alpha = record.get("alpha")
    return self.update(int(record["step"]), densities_from_record(record), alpha)

  def replay(self, records: Iterable[Mapping[str, Any]], up_to_step: int | None = None) -> None:
    """:meth:`update_from_record` for each logged training record (one with
    ``sparsity/total``) at a step ``<= up_to_step``, in order."""
    for r in records:
      if "sparsity/total" not in r or (up_to_step is not None and r["step"] > up_to_step):
        continue
      self.update_from_record(r)

  @property
  def ratio(self) -> float:
    dense_step = 3.0 * sum(self.dense_macs.values())
    if not self.steps or not dense_step:
      return float("nan")
    return self.cost / (self.steps * dense_step)

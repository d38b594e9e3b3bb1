"""Dense MACs of every conv and dense layer of a model, found by tracing it (``jax.make_jaxpr``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
from jax.extend import core as jex_core

from autosparse_jax.flops.paths import _path_string

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

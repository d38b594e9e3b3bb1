"""Powerpropagation (Schwarz et al., 2021) as a wrapper around any method.

The latent weights of the pruned leaves become ``v`` with ``w = v |v|^(a - 1)``, initialised
from the params ``u`` as ``v = sign(u) |u|^(1/a)`` (so ``w = u`` at the start). The wrapped
method's mask stage runs on ``v``: a magnitude ranking of ``v`` is that of ``w``, since
``|w| = |v|^a`` is monotone. Its effective weights ``v_eff`` become ``W_eff = v_eff |v_eff|^(a-1)``
and the gradient reaching the method is the chain rule ``dL/dv = dL/dW_eff * a |v|^(a - 1)``.
``Powerprop(TopKAST(...), exponent=a)`` is TopKAST+PP.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from autosparse_jax.methods import Components, Method
from autosparse_jax.selection import Prunable, select_leaves
from autosparse_jax.stages import MaskStage


def power(v: jax.Array, a: float) -> jax.Array:
  """``w = v |v|^(a - 1)``."""
  return v * jnp.abs(v) ** (a - 1)


def inverse_power(u: jax.Array, a: float) -> jax.Array:
  """``v = sign(u) |u|^(1/a)``, the ``v`` with ``power(v, a) = u``."""
  return jnp.sign(u) * jnp.abs(u) ** (1.0 / a)


def power_stage(stage: MaskStage, a: float, prunable: Prunable) -> MaskStage:
  """``stage`` on latent ``v``; effective weights and gradients mapped as in the module doc."""

  def on_selected(fn, tree, *others):
    leaves, treedef = jax.tree.flatten(tree)
    flags = select_leaves(tree, prunable)
    rest = [treedef.flatten_up_to(o) for o in others]
    out = [
      fn(x, *(r[i] for r in rest)) if f and x is not None else x
      for i, (x, f) in enumerate(zip(leaves, flags, strict=True))
    ]
    return treedef.unflatten(out)

  def update(grads, state, latent):
    def chain_rule(g, v):
      return (g * a * jnp.abs(v) ** (a - 1)).astype(g.dtype)

    return stage.update(on_selected(chain_rule, grads, latent.weights), state, latent)

  def sparsify(latent, state, step):
    eff, state = stage.sparsify(latent, state, step)
    leaves, treedef = jax.tree.flatten(latent.weights)
    effs = treedef.flatten_up_to(eff)
    flags = select_leaves(latent.weights, prunable)
    # A selected leaf the method keeps dense (e.g. a budget's dense first layer) is still v.
    out = [
      power(w if e is None else e, a) if f else e
      for w, e, f in zip(leaves, effs, flags, strict=True)
    ]
    return treedef.unflatten(out), state

  return MaskStage(stage.init, update, sparsify)


@dataclasses.dataclass(frozen=True)
class Powerprop:
  """``method`` trained through the Powerpropagation reparameterisation with exponent ``a``.

  Attributes:
    method: any method whose mask stage prunes the leaves ``prunable`` selects (TopKAST, RigL,
      SET, MEST, GradualMagnitude; the Powerprop paper: TopKAST and magnitude pruning).
    exponent: ``a >= 1`` (the paper: 2 to 5 for sparse training; 1 is the method itself).
  """

  method: Method
  exponent: float = 2.0

  def __post_init__(self):
    if not self.exponent >= 1.0:
      raise ValueError(f"exponent: must be >= 1, got {self.exponent}")
    if not callable(getattr(self.method, "components", None)):
      raise ValueError(f"method: expected a method with components(prunable), got {self.method!r}")

  def components(self, prunable: Prunable) -> Components:
    parts = self.method.components(prunable)
    if parts.latent_init is not None:
      raise ValueError(f"method: {self.method!r} already reparameterises its weights")
    a = float(self.exponent)

    def latent_init(params: Any) -> Any:
      if not jax.tree.leaves(params):  # optax.tree_map_params' placeholder
        return params
      flags = select_leaves(params, prunable)
      leaves, treedef = jax.tree.flatten(params)
      return treedef.unflatten(
        [
          inverse_power(p, a).astype(p.dtype) if f else jnp.copy(p)
          for p, f in zip(leaves, flags, strict=True)
        ]
      )

    return parts._replace(stage=power_stage(parts.stage, a, prunable), latent_init=latent_init)

"""Per-layer budgets: how one overall sparsity is spread over the pruned layers.

A :class:`Budget` turns the shapes of the pruned kernels and an overall sparsity ``s`` into
exact per-layer keep counts ``k_l`` with ``sum(k_l) = round((1 - s) * sum(n_l))``:

* ``uniform``: every layer has density ``1 - s``;
* ``erk`` (Erdos-Renyi-Kernel, Evci et al. 2020, RigL's ``get_sparsities_erdos_renyi``):
  density ``d_l = eps * (sum(shape_l) / prod(shape_l))^power``, with ``eps`` solving
  ``sum_l d_l n_l = (1 - s) sum_l n_l``; a layer whose ``d_l`` would exceed 1 is made dense
  (the one with the largest ratio first, then ``eps`` is solved again over the rest).

``dense_first_layer`` keeps the first pruned kernel (the first in the params' flatten order)
dense and spreads the same total over the others. Densities are turned into integer counts by
largest remainders, so the total is exact.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

KINDS = ("uniform", "erk")


def _densities(
  shapes: Sequence[tuple[int, ...]], density: float, kind: str, power: float, dense: set[int]
) -> list[float]:
  sizes = [math.prod(s) for s in shapes]
  raw = [
    1.0 if kind == "uniform" else (sum(s) / math.prod(s)) ** power for s in shapes
  ]  # the density of a layer is eps * raw
  dense = set(dense)
  while True:
    rest = [i for i in range(len(shapes)) if i not in dense]
    budget = density * sum(sizes) - sum(sizes[i] for i in dense)
    divisor = sum(raw[i] * sizes[i] for i in rest)
    if not rest or divisor <= 0:
      eps = 0.0
      break
    eps = max(budget, 0.0) / divisor
    top = max(raw[i] for i in rest)
    if eps * top <= 1.0:
      break
    dense |= {i for i in rest if raw[i] == top}
  return [1.0 if i in dense else eps * raw[i] for i in range(len(shapes))]


@dataclasses.dataclass(frozen=True)
class Budget:
  """Spreads an overall sparsity over layers.

  Attributes:
    kind: ``"uniform"`` or ``"erk"``.
    dense_first_layer: keep the first pruned kernel (in the params' flatten order, e.g. linen's
      ``Conv_0``) dense; the others carry the whole budget. To keep a layer by name out of
      pruning altogether, use the chain's ``prunable`` rules instead.
    erk_power: RigL's ``erk_power_scale``; 1 is ERK, values below 1 soften it.
  """

  kind: str = "uniform"
  dense_first_layer: bool = False
  erk_power: float = 1.0

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"budget: expected one of {KINDS}, got {self.kind!r}")
    if not self.erk_power > 0:
      raise ValueError(f"erk_power: must be > 0, got {self.erk_power}")

  def densities(self, shapes: Sequence[tuple[int, ...]], sparsity: float) -> list[float]:
    """Per-layer densities (before rounding to counts)."""
    dense = {0} if self.dense_first_layer and shapes else set()
    sizes = [math.prod(s) for s in shapes]
    if dense and sizes[0] > (1.0 - sparsity) * sum(sizes):
      raise ValueError(
        f"dense_first_layer: the first layer's {sizes[0]} weights exceed the "
        f"{round((1.0 - sparsity) * sum(sizes))} kept at sparsity {sparsity}; lower the "
        "sparsity or prune the first layer"
      )
    return _densities(
      [tuple(int(d) for d in s) for s in shapes], 1.0 - sparsity, self.kind, self.erk_power, dense
    )

  def keep_counts(self, shapes: Sequence[tuple[int, ...]], sparsity: float) -> list[int]:
    """Exact per-layer keep counts; they sum to ``round((1 - sparsity) * total)``."""
    sizes = [math.prod(s) for s in shapes]
    total = round((1.0 - sparsity) * sum(sizes))
    real = [min(d, 1.0) * n for d, n in zip(self.densities(shapes, sparsity), sizes, strict=True)]
    counts = [min(math.floor(r), n) for r, n in zip(real, sizes, strict=True)]
    # Largest remainders first (ties: the earlier layer), never above a layer's size.
    order = sorted(range(len(sizes)), key=lambda i: (-(real[i] - counts[i]), i))
    short = total - sum(counts)
    while short > 0 and any(counts[i] < sizes[i] for i in order):
      for i in order:
        if short and counts[i] < sizes[i]:
          counts[i] += 1
          short -= 1
    return counts


def as_budget(budget: Budget | str) -> Budget:
  """A kind name becomes ``Budget(kind)``."""
  return budget if isinstance(budget, Budget) else Budget(budget)

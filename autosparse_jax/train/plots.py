"""Plots of a run: ``sparsity_per_layer.png`` and ``training_curves.png``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SPARSITY_PLOT = "sparsity_per_layer.png"
CURVES_PLOT = "training_curves.png"


def write_plots(
  workdir: str | os.PathLike, report: Mapping[str, Any], records: list[Mapping[str, Any]]
) -> list[Path]:
  """``sparsity_per_layer.png`` (a bar per kernel) from ``report`` (:func:`build_summary`) and
  ``training_curves.png`` (total sparsity, alpha_t and each layer's tau over the steps) from
  the ``metrics.jsonl`` records. matplotlib (Agg) is imported here. Returns the paths."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  workdir = Path(workdir)
  layers = report["sparsity"]["layers"]
  names = list(layers)
  fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(names) + 2), 4))
  ax.bar(range(len(names)), [100 * layers[n]["sparsity"] for n in names])
  ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
  ax.set_ylabel("sparsity (%)")
  ax.set_ylim(0, 100)
  ax.set_title(f"per-layer sparsity (total {100 * report['sparsity']['total']:.2f}%)")
  fig.tight_layout()
  paths = [workdir / SPARSITY_PLOT]
  fig.savefig(paths[0], dpi=100)
  plt.close(fig)

  train = [r for r in records if "sparsity/total" in r]
  steps = [r["step"] for r in train]
  taus = sorted({k for r in train for k in r if k.startswith("tau/")})
  has_alpha = any("alpha" in r for r in train)
  panels = 1 + has_alpha + bool(taus)
  fig, axes = plt.subplots(panels, 1, figsize=(6, 2.5 * panels), sharex=True, squeeze=False)
  axes = axes[:, 0]
  axes[0].plot(steps, [100 * r["sparsity/total"] for r in train])
  axes[0].set_ylabel("total sparsity (%)")
  i = 1
  if has_alpha:
    axes[i].plot(steps, [r.get("alpha", float("nan")) for r in train])
    axes[i].set_ylabel("alpha_t")
    i += 1
  if taus:
    for k in taus:
      axes[i].plot(steps, [r.get(k, float("nan")) for r in train], label=k.removeprefix("tau/"))
    axes[i].set_ylabel("tau")
    axes[i].legend(fontsize=7)
  axes[-1].set_xlabel("step")
  fig.tight_layout()
  paths.append(workdir / CURVES_PLOT)
  fig.savefig(paths[1], dpi=100)
  plt.close(fig)
  return paths

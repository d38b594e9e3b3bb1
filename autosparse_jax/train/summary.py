"""The final summary of a run, in the workdir: ``summary.json`` and ``summary.txt``.

``summary.json``::

  {"experiment": {"model", "dataset", "method", "steps", "epochs", "global_batch_size", ...},
   "eval": {"accuracy", "top5_accuracy", "loss", "examples"},
   "train": {"loss", "accuracy"},            # the last logged window
   "sparsity": {"total": s,                  # zeros / size over all kernels (ndim >= 2)
                "all_params": s,             # zeros / size over every param
                "kernels_size": n, "kernels_nonzero": n,
                "alpha": a,                  # the last alpha_t (methods with annealing)
                "layers": {path: {"shape", "size", "nonzero", "sparsity", "tau", "macs",
                                  "sparse_macs"}}},
   "inference_macs": {"dense": n, "sparse": x, "ratio": x},   # per example, MACs not FLOPs
   "training_cost": {"ratio": x},            # training MACs relative to dense training
   "wall_time_seconds": t}

Strict JSON: a value that is NaN or infinite (e.g. the loss of a run that diverged) is ``null``.

Inference MACs follow ``autosparse_jax.flops``: ``sum_l (1 - s_l) * M_l`` over the conv and
dense layers (no pooling or norms), ``M_l`` the layer's dense MACs for one example. The
training-cost ratio is ``flops/training_ratio`` of the last log step (averaged over the run,
see :class:`autosparse_jax.flops.RunningTrainingCost`).

``summary.txt`` is the same as a human-readable table. :func:`write_plots` adds
``sparsity_per_layer.png`` and ``training_curves.png``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from autosparse_jax.selection import MIN_PRUNABLE_NDIM, path_string

SUMMARY_JSON = "summary.json"
SUMMARY_TXT = "summary.txt"


def nonzero_counts(params: Any) -> dict[str, jax.Array]:
  """Nonzero count of every param leaf, keyed by path (jit it: the counts stay on device, so
  it works on params sharded across processes)."""
  return {
    path_string(p): jnp.count_nonzero(x).astype(jnp.int32)
    for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
  }


def layer_table(
  shapes: Mapping[str, tuple[int, ...]], nonzero: Mapping[str, int], summary: Mapping[str, Any]
) -> dict[str, dict[str, Any]]:
  """Per kernel (ndim >= 2): shape, size, nonzero count, sparsity and threshold tau if any."""
  layers = {}
  for name, shape in shapes.items():
    if len(shape) < MIN_PRUNABLE_NDIM:
      continue
    size = int(np.prod(shape, dtype=np.int64))
    row = {
      "shape": list(shape),
      "size": size,
      "nonzero": int(nonzero[name]),
      "sparsity": 1.0 - int(nonzero[name]) / size,
    }
    tau = summary.get(f"tau/{name}")
    if tau is not None:
      row["tau"] = float(tau)
    layers[name] = row
  return layers


def build_summary(
  *,
  experiment: Mapping[str, Any],
  shapes: Mapping[str, tuple[int, ...]],
  nonzero: Mapping[str, int],
  summary: Mapping[str, Any],
  eval_metrics: Mapping[str, float],
  train_metrics: Mapping[str, float],
  wall_time: float,
  dense_macs: Mapping[str, int] | None = None,
  training_cost_ratio: float | None = None,
) -> dict[str, Any]:
  """The ``summary.json`` dict (see the module docstring).

  Args:
    experiment: what ran (model, dataset, method, steps, ...).
    shapes: every param's shape, by path.
    nonzero: every param's nonzero count, by path (:func:`nonzero_counts`).
    summary: ``autosparse.summary`` at the end (for tau and alpha).
    eval_metrics, train_metrics: the last ``eval/*`` and ``train/*`` scalars.
    wall_time: seconds the run took (of a resumed run: all its parts, each up to the checkpoint
      the next one resumed from).
    dense_macs: dense multiply-accumulates per example by kernel path (``flops.count_macs``);
      adds ``macs`` and ``sparse_macs`` per layer and the ``inference_macs`` totals.
    training_cost_ratio: the run's training MACs relative to dense training, if known.
  """
  layers = layer_table(shapes, nonzero, summary)
  size = sum(r["size"] for r in layers.values())
  kept = sum(r["nonzero"] for r in layers.values())
  all_size = sum(int(np.prod(s, dtype=np.int64)) for s in shapes.values())
  all_kept = sum(int(n) for n in nonzero.values())
  sparsity: dict[str, Any] = {
    "total": 1.0 - kept / size if size else 0.0,
    "all_params": 1.0 - all_kept / all_size if all_size else 0.0,
    "kernels_size": size,
    "kernels_nonzero": kept,
  }
  if "alpha" in summary:
    sparsity["alpha"] = float(summary["alpha"])
  sparsity["layers"] = layers
  out_macs = None
  if dense_macs:
    dense_total = sparse_total = 0.0
    for name, macs in dense_macs.items():
      density = 1.0 - layers[name]["sparsity"] if name in layers else 1.0
      if name in layers:
        layers[name]["macs"] = int(macs)
        layers[name]["sparse_macs"] = density * macs
      dense_total += macs
      sparse_total += density * macs
    out_macs = {
      "dense": int(dense_total),
      "sparse": sparse_total,
      "ratio": sparse_total / dense_total if dense_total else float("nan"),
    }
  strip = lambda d, p: {k.removeprefix(p): float(v) for k, v in d.items() if k.startswith(p)}  # noqa: E731
  return {
    "experiment": dict(experiment),
    "eval": strip(eval_metrics, "eval/"),
    "train": {k: v for k, v in strip(train_metrics, "train/").items() if k in ("loss", "accuracy")},
    "sparsity": sparsity,
    **({"inference_macs": out_macs} if out_macs else {}),
    **(
      {"training_cost": {"ratio": float(training_cost_ratio)}}
      if training_cost_ratio is not None
      else {}
    ),
    "wall_time_seconds": float(wall_time),
  }


def _si(x: float) -> str:
  for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
    if abs(x) >= scale:
      return f"{x / scale:.3g}{unit}"
  return f"{x:.3g}"


def percent(x: float) -> str:
  return f"{100.0 * x:6.2f}%"


def format_layer_table(layers: Mapping[str, Mapping[str, Any]]) -> list[str]:
  """One row per kernel: shape, params, nonzero, sparsity, dense and sparse MACs (per example;
  where counted), tau (where the method has one); then a total row."""
  width = max([len("layer"), len("total")] + [len(k) for k in layers])
  has_macs = any("macs" in r for r in layers.values())
  has_tau = any("tau" in r for r in layers.values())
  header = f"{'layer':<{width}}  {'shape':>18}  {'params':>11}  {'nonzero':>11}  {'sparsity':>8}"
  if has_macs:
    header += f"  {'dense MACs':>13}  {'sparse MACs':>13}"
  if has_tau:
    header += f"  {'tau':>9}"
  lines = [header, "-" * len(header)]

  def macs_cells(r):
    if not has_macs:
      return ""
    if "macs" not in r:
      return f"  {'-':>13}  {'-':>13}"
    return f"  {r['macs']:>13,}  {round(r['sparse_macs']):>13,}"

  for name, r in layers.items():
    row = (
      f"{name:<{width}}  {'x'.join(map(str, r['shape'])):>18}  {r['size']:>11,}  "
      f"{r['nonzero']:>11,}  {percent(r['sparsity']):>8}" + macs_cells(r)
    )
    if "tau" in r:
      row += f"  {r['tau']:>9.4g}"
    lines.append(row)
  size = sum(r["size"] for r in layers.values())
  kept = sum(r["nonzero"] for r in layers.values())
  total = {"shape": [], "size": size, "nonzero": kept, "sparsity": 1.0 - kept / size if size else 0}
  if has_macs:
    total["macs"] = sum(r.get("macs", 0) for r in layers.values())
    total["sparse_macs"] = sum(r.get("sparse_macs", 0.0) for r in layers.values())
  lines.append("-" * len(header))
  lines.append(
    f"{'total':<{width}}  {'':>18}  {size:>11,}  {kept:>11,}  {percent(total['sparsity']):>8}"
    + macs_cells(total)
  )
  return lines


def format_summary(report: Mapping[str, Any]) -> str:
  """``summary.txt``: the headline numbers, then one row per kernel."""
  exp, ev, sp = report["experiment"], report["eval"], report["sparsity"]
  lines = [
    f"{exp.get('model')} on {exp.get('dataset')}, method {exp.get('method')}: "
    f"{exp.get('steps')} steps ({exp.get('epochs', 0):.4g} epochs), "
    f"batch {exp.get('global_batch_size')}",
    "",
    f"eval accuracy      {percent(ev.get('accuracy', float('nan')))}"
    + (f"   (top-5 {percent(ev['top5_accuracy'])})" if "top5_accuracy" in ev else ""),
    f"eval loss          {ev.get('loss', float('nan')):.4f}",
    f"sparsity (kernels) {percent(sp['total'])}   "
    f"({sp['kernels_nonzero']:,} of {sp['kernels_size']:,} weights nonzero)",
    f"sparsity (params)  {percent(sp['all_params'])}",
  ]
  if "inference_macs" in report:
    m = report["inference_macs"]
    lines.append(
      f"inference MACs     {_si(m['sparse'])} of {_si(m['dense'])} dense per example "
      f"({1 / m['ratio']:.2f}x fewer)"
      if m["ratio"] > 0
      else f"inference MACs     0 of {_si(m['dense'])}"
    )
  if "training_cost" in report:
    lines.append(
      f"training cost      {percent(report['training_cost']['ratio'])} of dense training "
      "(MACs, averaged over the run)"
    )
  if "alpha" in sp:
    lines.append(f"final alpha_t      {sp['alpha']:.4g}")
  lines.append(f"wall time          {report['wall_time_seconds']:.1f}s")
  lines.append("")
  lines += format_layer_table(sp["layers"])
  return "\n".join(lines) + "\n"


def strict_json(value: Any) -> Any:
  """``value`` with every NaN/Inf float replaced by None (JSON ``null``: strict JSON has no
  NaN)."""
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if isinstance(value, Mapping):
    return {k: strict_json(v) for k, v in value.items()}
  if isinstance(value, list | tuple):
    return [strict_json(v) for v in value]
  return value


def _write_atomically(path: Path, text: str) -> None:
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def write_summary(workdir: str | os.PathLike, report: Mapping[str, Any]) -> str:
  """Writes ``summary.json`` (strict JSON: a NaN/Inf value is ``null``) and ``summary.txt``,
  each whole or not at all; returns the text."""
  workdir = Path(workdir)
  text = format_summary(report)
  _write_atomically(
    workdir / SUMMARY_JSON, json.dumps(strict_json(report), indent=2, allow_nan=False) + "\n"
  )
  _write_atomically(workdir / SUMMARY_TXT, text)
  return text


def format_comparison(results: dict[str, dict[str, float]], seconds: dict[str, float]) -> str:
  """A table for ``python -m autosparse_jax.train.compare``: one column per method (results of
  ``train_and_evaluate``); accuracy, sparsity, inference MACs as a percentage of the dense
  model's, then per-layer sparsity, and the wall time."""
  methods = list(results)
  layers = sorted(
    {k for r in results.values() for k in r if k.startswith("sparsity/") and k.count("/") >= 2}
  )
  rows = [
    ("eval accuracy", "eval/accuracy"),
    ("sparsity (total)", "sparsity/total"),
    ("inference MACs", "inference_macs/ratio"),
  ]
  rows += [(k.removeprefix("sparsity/"), k) for k in layers]
  width = max(len(label) for label, _ in rows)
  col = max(12, *(len(m) + 2 for m in methods))
  lines = [f"{'':<{width}}" + "".join(f"{m:>{col}}" for m in methods)]
  for i, (label, key) in enumerate(rows):
    if i == 3:
      lines.append("per-layer sparsity:")
    cells = []
    for m in methods:
      value = results[m].get(key)
      cells.append(f"{'-' if value is None else f'{100 * value:.2f}%':>{col}}")
    lines.append(f"{label:<{width}}" + "".join(cells))
  lines.append(f"{'time':<{width}}" + "".join(f"{seconds[m]:>{col - 1}.1f}s" for m in methods))
  return "\n".join(lines)

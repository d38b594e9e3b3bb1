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

Inference MACs follow ``autosparse_jax.flops``: ``sum_l (1 - s_l) * M_l`` over the conv and
dense layers (no pooling or norms), ``M_l`` the layer's dense MACs for one example. The
training-cost ratio is ``flops/training_ratio`` of the last log step (averaged over the run,
see :class:`autosparse_jax.flops.RunningTrainingCost`).

``summary.txt`` is the same as a human-readable table. :func:`write_plots` adds
``sparsity_per_layer.png`` and ``training_curves.png``.

As a command, the report of any checkpoint in a workdir (nothing is written unless
``--plots``)::

  python -m autosparse_jax.report --workdir=/tmp/digits [--step=N] [--plots]
"""

from __future__ import annotations

import json
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


def _pct(x: float) -> str:
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
      f"{r['nonzero']:>11,}  {_pct(r['sparsity']):>8}" + macs_cells(r)
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
    f"{'total':<{width}}  {'':>18}  {size:>11,}  {kept:>11,}  {_pct(total['sparsity']):>8}"
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
    f"eval accuracy      {_pct(ev.get('accuracy', float('nan')))}"
    + (f"   (top-5 {_pct(ev['top5_accuracy'])})" if "top5_accuracy" in ev else ""),
    f"eval loss          {ev.get('loss', float('nan')):.4f}",
    f"sparsity (kernels) {_pct(sp['total'])}   "
    f"({sp['kernels_nonzero']:,} of {sp['kernels_size']:,} weights nonzero)",
    f"sparsity (params)  {_pct(sp['all_params'])}",
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
      f"training cost      {_pct(report['training_cost']['ratio'])} of dense training "
      "(MACs, averaged over the run)"
    )
  if "alpha" in sp:
    lines.append(f"final alpha_t      {sp['alpha']:.4g}")
  lines.append(f"wall time          {report['wall_time_seconds']:.1f}s")
  lines.append("")
  lines += format_layer_table(sp["layers"])
  return "\n".join(lines) + "\n"


def write_summary(workdir: str | os.PathLike, report: Mapping[str, Any]) -> str:
  """Writes ``summary.json`` and ``summary.txt``; returns the text."""
  workdir = Path(workdir)
  (workdir / SUMMARY_JSON).write_text(json.dumps(report, indent=2) + "\n")
  text = format_summary(report)
  (workdir / SUMMARY_TXT).write_text(text)
  return text


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


def format_comparison(results: dict[str, dict[str, float]], seconds: dict[str, float]) -> str:
  """A table for ``python -m autosparse_jax.compare``: one column per method (results of
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


# --------------------------------------------------------------------------- the command


def checkpoint_steps(workdir: str | os.PathLike) -> list[int]:
  """The steps of the checkpoints in ``<workdir>/checkpoints`` (looked at, nothing created)."""
  from autosparse_jax.checkpoint import CHECKPOINT_DIR

  directory = Path(workdir) / CHECKPOINT_DIR
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def checkpoint_report(
  workdir: str | os.PathLike, step: int | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """The report of the checkpoint at ``step`` (default: the latest) in ``workdir``: per-layer
  table, inference MACs, and the training-cost ratio up to ``step`` from ``metrics.jsonl``
  (:func:`build_summary`'s dict plus ``training_cost_steps``), and the metrics records.

  Raises:
    FileNotFoundError: no ``config.json``, no checkpoint, or none at ``step``.
  """
  from autosparse_jax import config_lib, flops, logs, train

  workdir = Path(workdir)
  config_path = workdir / "config.json"
  if not config_path.exists():
    raise FileNotFoundError(f"{config_path} does not exist: not a training workdir")
  steps = checkpoint_steps(workdir)
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {workdir / 'checkpoints'}")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise FileNotFoundError(f"no checkpoint at step {step} in {workdir}; there are {steps}")
  config = config_lib.config_from_json(config_path.read_text())
  exp = train.build_experiment(config)
  state = train.load_checkpoint(config, str(workdir), step, experiment=exp)
  nonzero = {k: int(v) for k, v in jax.device_get(nonzero_counts(state.params)).items()}
  import autosparse_jax as autosparse

  state_summary = {
    k: float(v)
    for k, v in jax.device_get(autosparse.summary(state.params, state.opt_state)).items()
  }
  state_summary.pop("step", None)
  shapes = {
    path_string(p): tuple(x.shape)
    for p, x in jax.tree_util.tree_flatten_with_path(exp.abstract_state.params)[0]
  }
  records = logs.read_jsonl(workdir / logs.METRICS_FILE)
  ratio = None
  if exp.dense_macs:
    meter = flops.RunningTrainingCost(
      exp.dense_macs,
      config.method,
      train.backward_sparsity(config),
      update_every=config.sparsity[config.method].get("update_every"),
    )
    meter.replay(records, up_to_step=step)
    ratio = meter.ratio if meter.steps else None
  evals = [r for r in records if "eval/accuracy" in r and r["step"] <= step]
  out = build_summary(
    experiment=train._experiment_info(exp, step),
    shapes=shapes,
    nonzero=nonzero,
    summary=state_summary,
    eval_metrics=evals[-1] if evals else {},
    train_metrics={},
    wall_time=0.0,
    dense_macs=exp.dense_macs,
    training_cost_ratio=ratio,
  )
  out["training_cost_steps"] = meter.last_step if exp.dense_macs else 0
  return out, records


def format_checkpoint_report(report: Mapping[str, Any], workdir: str | os.PathLike) -> str:
  """The text the command prints."""
  exp, sp = report["experiment"], report["sparsity"]
  lines = [
    f"{workdir}: checkpoint at step {exp['steps']} ({exp['epochs']:.4g} epochs); "
    f"{exp['model']} on {exp['dataset']}, method {exp['method']}",
    "",
    *format_layer_table(sp["layers"]),
    "",
    f"sparsity (kernels) {_pct(sp['total'])}   "
    f"({sp['kernels_nonzero']:,} of {sp['kernels_size']:,} weights nonzero)",
  ]
  if "inference_macs" in report:
    m = report["inference_macs"]
    lines.append(
      f"inference MACs     {m['sparse']:,.0f} of {m['dense']:,} dense per example: "
      f"ratio {m['ratio']:.4f}"
    )
    lines.append(
      f"inference FLOPs    {2 * m['sparse']:,.0f} of {2 * m['dense']:,} dense per example "
      f"(FLOPs = 2 x MACs): ratio {m['ratio']:.4f}"
    )
  if "training_cost" in report:
    lines.append(
      f"training cost      {report['training_cost']['ratio']:.4f} of dense training (MACs or "
      f"FLOPs), averaged over steps 1-{report['training_cost_steps']} (from metrics.jsonl)"
    )
  else:
    lines.append("training cost      unknown (no logged steps up to this checkpoint)")
  if "accuracy" in report["eval"]:
    lines.append(f"eval accuracy      {_pct(report['eval']['accuracy'])} (last eval logged)")
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
  import argparse
  import sys

  parser = argparse.ArgumentParser(
    prog="python -m autosparse_jax.report",
    description="Prints the sparsity and FLOP report of a checkpoint in a training workdir.",
  )
  parser.add_argument("--workdir", required=True, help="the run's --workdir")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
  parser.add_argument(
    "--plots", action="store_true", help=f"also write {SPARSITY_PLOT} and {CURVES_PLOT}"
  )
  args = parser.parse_args(argv)
  try:
    rep, records = checkpoint_report(args.workdir, args.step)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(format_checkpoint_report(rep, args.workdir), end="")
  if args.plots:
    step = int(rep["experiment"]["steps"])
    for path in write_plots(args.workdir, rep, [r for r in records if r["step"] <= step]):
      print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())

"""The report command: the sparsity and FLOP report of any checkpoint in a training workdir.

Nothing is written unless ``--plots``::

  python -m autosparse_jax.train.report --workdir=/tmp/digits [--step=N] [--plots]
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

import jax

from autosparse_jax.data import DatasetUnavailableError
from autosparse_jax.selection import path_string
from autosparse_jax.train.plots import CURVES_PLOT, SPARSITY_PLOT, write_plots
from autosparse_jax.train.summary import build_summary, format_layer_table, nonzero_counts, percent


def checkpoint_steps(workdir: str | os.PathLike) -> list[int]:
  """The steps of the checkpoints in ``<workdir>/checkpoints`` (looked at, nothing created)."""
  from autosparse_jax.train.checkpoint import CHECKPOINT_DIR

  directory = Path(workdir) / CHECKPOINT_DIR
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def checkpoint_report(
  workdir: str | os.PathLike, step: int | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """The report of the checkpoint at ``step`` (default: the newest readable one; on a live run,
  the next newest if the run removes it meanwhile) in ``workdir``: per-layer table, inference
  MACs, and the training-cost ratio up to ``step`` as the run counted it (or from
  ``metrics.jsonl``) (:func:`build_summary`'s dict plus ``training_cost_steps``), and the
  metrics records.

  Raises:
    FileNotFoundError: no ``config.json``, no checkpoint, or none at ``step``.
  """
  from autosparse_jax.train import config_lib, experiment, logs

  workdir = Path(workdir)
  config_path = workdir / "config.json"
  if not config_path.exists():
    raise FileNotFoundError(f"{config_path} does not exist: not a training workdir")
  if not checkpoint_steps(workdir):
    raise FileNotFoundError(f"no checkpoint in {workdir / 'checkpoints'}")
  config = config_lib.config_from_json(config_path.read_text())
  exp = experiment.build_experiment(config)
  # The newest checkpoint may be removed by a live run's keep-N while it is read: the next.
  state, meta, step = experiment.read_checkpoint(config, str(workdir), step, experiment=exp)
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
  ratio, ratio_steps = None, 0
  if exp.dense_macs:
    meter = experiment.training_cost_meter(config, exp.dense_macs)
    carried = meta.get("cost_meter")
    if carried is not None:  # what the run had counted at this checkpoint
      meter.cost, meter.steps = carried["cost"], carried["steps"]
      meter.last_step = carried["last_step"]
    else:
      meter.replay(records, up_to_step=step)
    ratio = meter.ratio if meter.steps else None
    ratio_steps = meter.last_step
  evals = [r for r in records if "eval/accuracy" in r and r["step"] <= step]
  out = build_summary(
    experiment=experiment.experiment_info(exp, step),
    shapes=shapes,
    nonzero=nonzero,
    summary=state_summary,
    eval_metrics=evals[-1] if evals else {},
    train_metrics={},
    wall_time=0.0,
    dense_macs=exp.dense_macs,
    training_cost_ratio=ratio,
  )
  out["training_cost_steps"] = ratio_steps
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
    f"sparsity (kernels) {percent(sp['total'])}   "
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
    lines.append(f"eval accuracy      {percent(report['eval']['accuracy'])} (last eval logged)")
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> NoReturn:
  """The command: prints the report on stdout and exits; a bad flag or workdir is one
  ``error:`` line on stderr and exit code 2."""
  import argparse
  import sys

  from autosparse_jax.train import cli

  class Parser(argparse.ArgumentParser):
    def error(self, message):
      raise cli.CommandError(f"{message} (see --help)")

  parser = Parser(
    prog="python -m autosparse_jax.train.report",
    description="Prints the sparsity and FLOP report of a checkpoint in a training workdir.",
    epilog=cli.VERBOSE_HELP,
  )
  parser.add_argument("--workdir", required=True, help="the run's --workdir")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
  parser.add_argument(
    "--plots", action="store_true", help=f"also write {SPARSITY_PLOT} and {CURVES_PLOT}"
  )
  parser.add_argument("--verbose", action="store_true", help="on an error, print its traceback")
  argv = sys.argv[1:] if argv is None else argv

  def run() -> int:
    args = parser.parse_args(argv)
    cli.check_workdir(args.workdir, exists=True, write=args.plots)
    try:
      rep, records = checkpoint_report(args.workdir, args.step)
    except DatasetUnavailableError:
      raise
    except FileNotFoundError as e:  # no config.json, no checkpoint (at --step)
      raise cli.WorkdirError(f"--workdir={args.workdir}: {e}") from e
    except ValueError as e:  # e.g. a config.json or checkpoint that cannot be read
      if cli.exit_code(e) is not None:
        raise
      raise cli.CommandFailed(f"--workdir={args.workdir}: {cli.one_line(e)}") from e
    print(format_checkpoint_report(rep, args.workdir), end="")
    if args.plots:
      step = int(rep["experiment"]["steps"])
      for path in write_plots(args.workdir, rep, [r for r in records if r["step"] <= step]):
        print(f"wrote {path}")
    return 0

  cli.handle(run, cli.verbose_requested(argv))


if __name__ == "__main__":
  main()

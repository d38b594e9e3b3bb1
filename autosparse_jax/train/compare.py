"""Trains one experiment with several methods and prints accuracy and sparsity side by side.

  python -m autosparse_jax.train.compare                      # digits: dense vs AutoSparse, ~1 min
  python -m autosparse_jax.train.compare --methods=dense,autosparse,str,topkast,gmp
  python -m autosparse_jax.train.compare --config=configs/mnist_lenet300.py --workdir=/tmp/cmp

Each method runs ``train_and_evaluate`` in ``<workdir>/<method>`` (default workdir: a fresh
temporary directory), so every run also leaves its metrics, checkpoints and summary there. Every
method's config is checked (and its experiment built) before the first one trains. The progress
lines and the table go to stdout; a bad flag, method, config field or workdir is one line
``error: ...`` on stderr and exit code 2.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from autosparse_jax.train import cli

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "default.py"

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Parent directory of the runs (default: a temporary one).")
flags.DEFINE_list("methods", ["dense", "autosparse"], "Values of config.method to compare.")
config_flags.DEFINE_config_file(
  "config",
  str(DEFAULT_CONFIG) if DEFAULT_CONFIG.exists() else None,
  "Experiment config file (default: configs/default.py, the digits MLP).",
  lock_config=False,
)


def check_methods(methods: list[str]) -> None:
  """Refuses an empty ``--methods``, an unknown name or a repeated one."""
  from autosparse_jax.train.config_lib import METHODS

  accepted = ", ".join(METHODS)
  if not methods:
    raise cli.CommandError(f"--methods is empty; pass a comma-separated list of {accepted}")
  for name in methods:
    if name not in METHODS:
      raise cli.CommandError(
        f"--methods={','.join(methods)}: {name!r} is not a method; accepted: {accepted}"
      )
  repeated = sorted({m for m in methods if methods.count(m) > 1})
  if repeated:
    raise cli.CommandError(f"--methods={','.join(methods)}: {repeated[0]!r} is repeated")


def main(argv):
  from autosparse_jax.train import config_lib, experiment, logs, loop, recipes, summary

  logs.quiet_library_logs()
  cli.no_arguments(argv)
  methods = list(FLAGS.methods)
  check_methods(methods)
  overrides = cli.config_overrides() if FLAGS.config is not None else {}
  if "method" in overrides:
    raise cli.CommandError(
      f"--config.method={overrides['method']}: compare trains the methods of --methods "
      f"(now {','.join(methods)}); pass --methods={overrides['method']} instead"
    )
  base = cli.loaded_config() if FLAGS.config is not None else recipes.digits_default()
  config_lib.check_method_blocks(overrides, methods)
  if FLAGS.workdir is not None:
    cli.check_workdir(FLAGS.workdir)
  configs = {}
  for method in methods:  # every config is checked before anything trains
    config = base.copy_and_resolve_references()
    config.method = method
    experiment.build_experiment(config)
    configs[method] = config
  root = Path(FLAGS.workdir or tempfile.mkdtemp(prefix="autosparse_compare_"))
  results, seconds = {}, {}
  for i, (method, config) in enumerate(configs.items(), 1):
    logs.say(f"=== {method} ({i} of {len(configs)}), in {root / method} ===")
    start = time.time()
    results[method] = loop.train_and_evaluate(config, str(root / method))
    seconds[method] = time.time() - start
  logs.say(f"\n{base.model} on {base.dataset} (runs in {root})\n")
  logs.say(summary.format_comparison(results, seconds))


if __name__ == "__main__":
  cli.run(main)

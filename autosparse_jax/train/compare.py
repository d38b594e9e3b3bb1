"""Trains one experiment with several methods and prints accuracy and sparsity side by side.

  python -m autosparse_jax.train.compare                      # digits: dense vs AutoSparse, ~1 min
  python -m autosparse_jax.train.compare --methods=dense,autosparse,str,topkast,gmp
  python -m autosparse_jax.train.compare --config=configs/mnist_lenet300.py --workdir=/tmp/cmp

Each method runs ``train_and_evaluate`` in ``<workdir>/<method>`` (default workdir: a fresh
temporary directory), so every run also leaves its metrics, checkpoints and summary there.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from autosparse_jax.train import logs, loop, recipes, summary

  logs.quiet_library_logs()
  base = FLAGS.config if FLAGS.config is not None else recipes.digits_default()
  root = Path(FLAGS.workdir or tempfile.mkdtemp(prefix="autosparse_compare_"))
  results, seconds = {}, {}
  for method in FLAGS.methods:
    config = base.copy_and_resolve_references()
    config.method = method
    logging.info("=== %s ===", method)
    start = time.time()
    results[method] = loop.train_and_evaluate(config, str(root / method))
    seconds[method] = time.time() - start
  print(f"\n{base.model} on {base.dataset} (runs in {root})\n")
  print(summary.format_comparison(results, seconds))


if __name__ == "__main__":
  app.run(main)

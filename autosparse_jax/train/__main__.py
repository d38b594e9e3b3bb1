"""Command line: ``python -m autosparse_jax.train --config=configs/<experiment>.py --workdir=DIR``.

Any config field can be overridden with ``--config.<field>=value`` (e.g.
``--config.method=str``, ``--config.sparsity.autosparse.alpha0=0.8``); a config file argument
selects a variant, e.g. ``--config=configs/imagenet_resnet50.py:tiny``. A workdir that holds a
checkpoint is resumed. On multi-host GPU clusters (and, recommended, TPU pod slices) pass
``--distributed`` so that ``jax.distributed.initialize()`` joins the processes.

Progress lines and the final summary go to stdout, logs to stderr. A bad flag, config field or
workdir is one line ``error: ...`` on stderr and exit code 2, before anything is compiled or
written.
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from autosparse_jax.train import cli

FLAGS = flags.FLAGS

flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the summary.")
flags.DEFINE_bool(
  "distributed",
  False,
  "Call jax.distributed.initialize() first (multi-process jobs: multi-host GPUs, TPU pods).",
)
flags.DEFINE_bool(
  "extend",
  False,
  "Train the workdir's run longer: raise only --config.num_epochs or --config.num_train_steps; "
  "its earlier config.json and summary are kept as *.until-step-<S>.*.",
)
config_flags.DEFINE_config_file(
  "config", None, "Experiment config file (configs/*.py).", lock_config=True
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  from autosparse_jax.train import config_lib, logs

  logs.quiet_library_logs()
  cli.no_arguments(argv)
  config = cli.loaded_config()
  cli.check_workdir(FLAGS.workdir)
  import jax

  if FLAGS.distributed:
    jax.distributed.initialize()
  config_lib.validate(config, device_count=jax.device_count(), process_count=jax.process_count())
  config_lib.check_method_blocks(cli.config_overrides(), [config.method])
  from autosparse_jax.train import loop

  loop.train_and_evaluate(config, FLAGS.workdir, extend=FLAGS.extend)


if __name__ == "__main__":
  cli.run(main)

"""Command line: ``python -m autosparse_jax.train --config=configs/<experiment>.py --workdir=DIR``.

Any config field can be overridden with ``--config.<field>=value`` (e.g.
``--config.method=str``, ``--config.sparsity.autosparse.alpha0=0.8``); a config file argument
selects a variant, e.g. ``--config=configs/imagenet_resnet50.py:tiny``. A workdir that holds a
checkpoint is resumed. On multi-host GPU clusters (and, recommended, TPU pod slices) pass
``--distributed`` so that ``jax.distributed.initialize()`` joins the processes.
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS

flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the summary.")
flags.DEFINE_bool(
  "distributed",
  False,
  "Call jax.distributed.initialize() first (multi-process jobs: multi-host GPUs, TPU pods).",
)
config_flags.DEFINE_config_file(
  "config", None, "Experiment config file (configs/*.py).", lock_config=True
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  import jax

  if FLAGS.distributed:
    jax.distributed.initialize()
  from autosparse_jax.train import logs, loop

  logs.quiet_library_logs()

  logging.info(
    "JAX process %d of %d, devices: %s", jax.process_index(), jax.process_count(), jax.devices()
  )
  loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)

"""The training system: configs, the sharded loop, checkpoints, metric writers, reports.

``python -m autosparse_jax.train --config=configs/<experiment>.py --workdir=DIR`` trains;
``python -m autosparse_jax.train.compare`` compares methods; ``python -m
autosparse_jax.train.report --workdir=DIR`` reports a checkpoint. In code::

  from autosparse_jax import train
  train.train_and_evaluate(config, workdir)

Modules: :mod:`.loop` (``train_and_evaluate``), :mod:`.experiment` (an experiment from a config,
``load_checkpoint``), :mod:`.state` (train state and step functions), :mod:`.config_lib` (config
schema and validation), :mod:`.recipes` (built-in configs), :mod:`.optim` (the optimizer from a
config), :mod:`.checkpoint`, :mod:`.logs`, :mod:`.sharding`, :mod:`.summary`, :mod:`.plots`,
:mod:`.report`, :mod:`.compare`, :mod:`.cli` (what the commands share). This package imports
the library (``autosparse_jax``), models and data; the library never imports it.
"""

from autosparse_jax.train.experiment import (
  Experiment,
  backward_sparsity,
  build_experiment,
  load_checkpoint,
)
from autosparse_jax.train.loop import evaluate, train_and_evaluate
from autosparse_jax.train.state import (
  TrainState,
  create_train_state,
  cross_entropy_loss,
  eval_step,
  train_step,
)

__all__ = [
  "Experiment",
  "TrainState",
  "backward_sparsity",
  "build_experiment",
  "create_train_state",
  "cross_entropy_loss",
  "eval_step",
  "evaluate",
  "load_checkpoint",
  "train_and_evaluate",
  "train_step",
]

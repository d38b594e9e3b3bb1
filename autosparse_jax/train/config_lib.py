"""The experiment config schema: every field with its default, and validation.

Config files in ``configs/`` start from :func:`base_config` and change what their experiment
needs; ``--config.<field>=value`` overrides any field from the command line. The sparse-training
method is chosen by ``config.method``; each method reads its hyperparameters from its own block
``config.sparsity.<method>``, so one config file carries per-method defaults and
``--config.method=str`` switches to STR with STR's defaults.

:func:`validate` checks names, ranges and divisibility and raises :class:`ConfigError` (a
``ValueError``) naming the field, its value and what is accepted, before anything is built,
compiled or written.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from ml_collections import config_dict

METHODS = (
  "dense",
  "autosparse",
  "str",
  "topkast",
  "topkast_ga",
  "topkast_pp",
  "gmp",
  "rigl",
  "rigl_ga",
  "set",
  "mest",
  "mest_ga",
)
"""Values of ``config.method``."""
OPTIMIZERS = ("sgd", "adamw")
LR_SCHEDULES = ("cosine", "constant")
ALPHA_SCHEDULES = ("sigmoid_cosine", "cosine", "linear", "constant")
SHARDINGS = ("data", "fsdp")
GRANULARITIES = ("layer", "channel")
BUDGETS = ("uniform", "erk")
DROP_SCHEDULES = ("cosine", "constant")

# Fields that define what a checkpoint holds and what the data position means: a workdir
# whose checkpoint disagrees on any of them cannot be resumed with this config.
RUN_IDENTITY_FIELDS = (
  "model",
  "model_kwargs",
  "dataset",
  "image_size",
  "method",
  "optimizer",
  "global_batch_size",
  "seed",
)


class ConfigError(ValueError):
  """A bad config field: ``config.<field>=<value>: <what is accepted>``. The commands print it
  as one line and exit with ``exit_code``."""

  exit_code = 2


def _alpha_block(alpha0: float) -> dict[str, Any]:
  return {
    # alpha_t = alpha0 * shape(t / alpha_decay_steps), 0 from alpha_zero_at on.
    "alpha0": alpha0,
    "alpha_schedule": "sigmoid_cosine",
    "alpha_decay_steps": config_dict.placeholder(int),  # None: the total training steps
    "alpha_zero_at": config_dict.placeholder(int),  # None: 90% of the total training steps
  }


def _threshold_block(threshold_init: float) -> dict[str, Any]:
  return {
    "threshold_init": threshold_init,  # initial s, tau = sigmoid(s)
    "granularity": "layer",  # "layer" | "channel"
    # Extra decay on s alone (added to dL/ds), on top of the base optimizer's.
    "threshold_weight_decay": 0.0,
    # True: the base optimizer's weight decay also pulls s up (STR); False: s gets the base
    # optimizer without weight decay.
    "decay_thresholds": True,
    # Optional overall sparsity target: a controller shifts all thresholds so that sparsity
    # follows target_sparsity * cubic_ramp(step / target_ramp_steps) (autosparse.ramp).
    "target_sparsity": config_dict.placeholder(float),
    # Or a target ratio of sparse to dense inference MACs (e.g. 1/7), same controller.
    "target_flops_ratio": config_dict.placeholder(float),
    "target_ramp_steps": config_dict.placeholder(int),  # None: half of the total steps
    "max_layer_sparsity": 0.999,  # a layer this sparse stops raising its threshold
  }


def _budget_block() -> dict[str, Any]:
  return {"budget": "uniform", "dense_first_layer": False}  # see autosparse_jax.budgets


def _dynamic_block(sparsity: float) -> dict[str, Any]:
  """Shared by RigL, SET and MEST: the budget and when the mask is rewired."""
  return {
    "sparsity": sparsity,
    **_budget_block(),
    "update_every": 100,  # steps between mask updates
    "begin_step": 0,
    "end_step": config_dict.placeholder(int),  # None: 75% of the total steps (RigL's T_end)
    "seed": 0,  # random initial masks (and SET/MEST's random growth)
  }


def _rigl_block(sparsity: float) -> dict[str, Any]:
  return {**_dynamic_block(sparsity), "drop_fraction": 0.3, "drop_schedule": "cosine"}


def _mest_block(sparsity: float) -> dict[str, Any]:
  # Mutation m_t = mutation * max(0, 1 - t / end_step), a fraction of each layer's budget;
  # soft_bound: EM&S.
  return {**_dynamic_block(sparsity), "mutation": 0.2, "soft_bound": False, "score_lambda": 0.0}


def sparsity_defaults() -> ml_collections.ConfigDict:
  """``config.sparsity``: one block per method, plus the kernels never pruned.

  Every block has ``weight_decay``: None uses ``config.weight_decay``; a float replaces it for
  that method (STR's sparsity is set by its weight decay).
  """
  wd = {"weight_decay": config_dict.placeholder(float)}
  return ml_collections.ConfigDict(
    {
      # Regexes (re.search) over '/'-joined kernel paths, e.g. ('^conv_init/',): never pruned.
      "exclude": (),
      "dense": {**wd},
      "autosparse": {**_alpha_block(0.5), **_threshold_block(-5.0), "ga_on_threshold": False, **wd},
      "str": {**_threshold_block(-5.0), **wd},
      "topkast": {
        "forward_sparsity": 0.8,
        "backward_sparsity": 0.5,
        "penalty": 0.0,
        **_budget_block(),
        **wd,
      },
      # GA on every weight outside the forward set (dense backward while alpha_t > 0); a
      # backward_sparsity restricts GA to B \ A.
      "topkast_ga": {
        "forward_sparsity": 0.8,
        "backward_sparsity": config_dict.placeholder(float),
        "penalty": 0.0,
        **_budget_block(),
        **_alpha_block(0.5),
        **wd,
      },
      # TopKAST through Powerpropagation, w = v |v|^(exponent - 1).
      "topkast_pp": {
        "forward_sparsity": 0.8,
        "backward_sparsity": 0.5,
        "penalty": 0.0,
        "exponent": 2.0,
        **_budget_block(),
        **wd,
      },
      "rigl": {**_rigl_block(0.8), **wd},
      "rigl_ga": {**_rigl_block(0.8), **_alpha_block(0.5), **wd},
      "set": {**_rigl_block(0.8), **wd},
      "mest": {**_mest_block(0.8), **wd},
      "mest_ga": {**_mest_block(0.8), **_alpha_block(0.5), **wd},
      "gmp": {
        "target_sparsity": 0.8,
        "initial_sparsity": 0.0,
        "begin_step": config_dict.placeholder(int),  # None: 10% of the total steps
        "end_step": config_dict.placeholder(int),  # None: 75% of the total steps
        "frequency": 100,  # steps between mask updates
        **_budget_block(),
        **wd,
      },
    }
  )


def base_config() -> ml_collections.ConfigDict:
  """Every field the training system reads, with its default (the digits MLP, AutoSparse)."""
  c = ml_collections.ConfigDict()

  # What to train.
  c.model = "lenet_300_100"  # autosparse_jax.models.get_model name
  c.model_kwargs = ml_collections.ConfigDict()  # model field overrides, e.g. {"width": 0.5}
  c.dataset = "digits"  # autosparse_jax.data.make_dataset name
  c.data_dir = config_dict.placeholder(str)  # tfds data_dir (or MNIST .npz)
  c.image_size = config_dict.placeholder(int)  # ImageNet crop size; None: the dataset's
  c.train_split = "train"
  c.eval_split = "test"
  c.num_workers = config_dict.placeholder(int)  # data threads; None: by dataset
  c.seed = 0  # model init, data order and augmentation

  # How long.
  c.num_epochs = 10.0
  c.num_train_steps = -1  # > 0: overrides num_epochs
  c.global_batch_size = 128  # over all devices and processes
  c.eval_batch_size = 256  # global
  c.eval_every_epochs = 1.0  # and always at the end
  c.num_eval_steps = -1  # -1: the whole eval split

  # Optimizer (the base optimizer that the sparse method wraps).
  c.optimizer = "sgd"  # "sgd" (momentum) | "adamw" (b1 = momentum)
  c.learning_rate = 0.1  # peak; at base_batch_size if base_batch_size > 0
  c.base_batch_size = 0  # > 0: lr = learning_rate * global_batch_size / base_batch_size
  c.lr_schedule = "cosine"  # linear warmup, then "cosine" decay to 0 or "constant"
  c.warmup_epochs = 0.0
  c.momentum = 0.9
  c.nesterov = False
  c.adam_b2 = 0.999
  c.adam_eps = 1e-8
  c.weight_decay = 1e-4  # on kernels (and thresholds), never on batch norm or biases
  c.label_smoothing = 0.0
  c.grad_clip_norm = 0.0  # > 0: clip the gradient's global norm

  # Sparse training.
  c.method = "autosparse"  # one of METHODS; hyperparameters in config.sparsity.<method>
  c.sparsity = sparsity_defaults()

  # Hardware.
  c.half_precision = False  # bfloat16 compute (params, optimizer state stay float32)
  c.sharding = "data"  # "data" (replicated params) | "fsdp" (params + optimizer state sharded)
  c.fsdp_min_size = 1024  # FSDP: params with fewer elements stay replicated
  c.num_devices = config_dict.placeholder(int)  # None: every device (must be, multi-process)

  # A NaN/Inf loss or gradient skips the step (counted in train/nonfinite_skipped); this many
  # in a row, seen at a log step, stop the run with an error.
  c.max_consecutive_nonfinite = 10

  # Logging and checkpoints.
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.tensorboard = True
  return c


def _fail(field: str, value: Any, why: str) -> None:
  raise ConfigError(f"config.{field}={value!r}: {why}")


def _check_choice(config: ml_collections.ConfigDict, field: str, choices: tuple) -> None:
  value = config[field]
  if value not in choices:
    _fail(field, value, f"must be one of {choices}")


def _check_number(config, field: str, *, low=None, high=None, low_open=False, integer=False):
  value = _get(config, field)
  if isinstance(value, bool) or not isinstance(value, int | float):
    _fail(field, value, "must be a number")
  if integer and int(value) != value:
    _fail(field, value, "must be an integer")
  if low is not None and (value <= low if low_open else value < low):
    _fail(field, value, f"must be {'>' if low_open else '>='} {low}")
  if high is not None and value >= high:
    _fail(field, value, f"must be < {high}")


def _get(config: ml_collections.ConfigDict, field: str) -> Any:
  node = config
  for part in field.split("."):
    node = node[part]
  return node


def validate(
  config: ml_collections.ConfigDict, *, device_count: int, process_count: int = 1
) -> None:
  """Checks ``config`` before anything is built.

  Args:
    config: the experiment config.
    device_count: devices in the job (all processes).
    process_count: processes in the job.

  Raises:
    ConfigError: naming the first bad field, its value and what it must be. The method's own
      hyperparameters are checked when the method is built (:mod:`autosparse_jax.train.optim`).
  """
  from autosparse_jax.data import DATASET_NAMES
  from autosparse_jax.models import MODELS

  base = base_config()
  missing = [k for k in base if k not in config]
  if missing:
    raise ConfigError(f"config lacks the fields {missing}; start from config_lib.base_config()")
  unknown = [k for k in config if k not in base]
  unknown += [
    f"sparsity.{m}.{k}"
    for m in base.sparsity
    if isinstance(base.sparsity[m], ml_collections.ConfigDict) and m in config.sparsity
    for k in config.sparsity[m]
    if k not in base.sparsity[m]
  ]
  if unknown:
    raise ConfigError(f"config.{unknown[0]}: unknown field (a typo?); fields: base_config()")
  _check_choice(config, "model", tuple(sorted(MODELS)))
  _check_choice(config, "dataset", DATASET_NAMES)
  _check_choice(config, "method", METHODS)
  _check_choice(config, "optimizer", OPTIMIZERS)
  _check_choice(config, "lr_schedule", LR_SCHEDULES)
  _check_choice(config, "sharding", SHARDINGS)
  if not isinstance(config.model_kwargs, Mapping | ml_collections.ConfigDict):
    _fail("model_kwargs", config.model_kwargs, "must be a dict of model field overrides")
  if config.method not in config.sparsity:
    _fail("sparsity", list(config.sparsity), f"lacks the block for method {config.method!r}")

  for field in ("global_batch_size", "eval_batch_size", "log_every_steps", "keep_checkpoints"):
    _check_number(config, field, low=1, integer=True)
  _check_number(config, "checkpoint_every_steps", low=1, integer=True)
  _check_number(config, "max_consecutive_nonfinite", low=1, integer=True)
  _check_number(config, "seed", low=0, integer=True)
  _check_number(config, "num_train_steps", integer=True)
  _check_number(config, "num_eval_steps", integer=True)
  _check_number(config, "fsdp_min_size", low=0, integer=True)
  if config.num_train_steps <= 0:
    _check_number(config, "num_epochs", low=0, low_open=True)
  _check_number(config, "eval_every_epochs", low=0, low_open=True)
  _check_number(config, "learning_rate", low=0)
  _check_number(config, "base_batch_size", low=0, integer=True)
  _check_number(config, "warmup_epochs", low=0)
  _check_number(config, "momentum", low=0, high=1)
  _check_number(config, "adam_b2", low=0, high=1)
  _check_number(config, "adam_eps", low=0)
  _check_number(config, "weight_decay", low=0)
  _check_number(config, "label_smoothing", low=0, high=1)
  _check_number(config, "grad_clip_norm", low=0)
  block = config.sparsity[config.method]
  prefix = f"sparsity.{config.method}"
  if block.get("weight_decay") is not None:
    _check_number(config, f"{prefix}.weight_decay", low=0)
  if "alpha_schedule" in block and block.alpha_schedule not in ALPHA_SCHEDULES:
    _fail(f"{prefix}.alpha_schedule", block.alpha_schedule, f"must be one of {ALPHA_SCHEDULES}")
  if "granularity" in block and block.granularity not in GRANULARITIES:
    _fail(f"{prefix}.granularity", block.granularity, f"must be one of {GRANULARITIES}")
  if "threshold_weight_decay" in block:
    _check_number(config, f"{prefix}.threshold_weight_decay", low=0)
  if "budget" in block and block.budget not in BUDGETS:
    _fail(f"{prefix}.budget", block.budget, f"must be one of {BUDGETS}")
  if "drop_schedule" in block and block.drop_schedule not in DROP_SCHEDULES:
    _fail(f"{prefix}.drop_schedule", block.drop_schedule, f"must be one of {DROP_SCHEDULES}")
  if "update_every" in block:
    _check_number(config, f"{prefix}.update_every", low=1, integer=True)
  for field in ("alpha_decay_steps", "begin_step", "end_step", "target_ramp_steps"):
    if block.get(field) is not None:
      _check_number(config, f"{prefix}.{field}", low=0, integer=True)
  if block.get("alpha_zero_at") is not None:
    _check_number(config, f"{prefix}.alpha_zero_at", low=0, integer=True)
  if isinstance(config.sparsity.exclude, str):
    _fail("sparsity.exclude", config.sparsity.exclude, "must be a tuple of regex strings")

  if config.num_devices is not None:
    _check_number(config, "num_devices", low=1, integer=True)
    if config.num_devices > device_count:
      _fail("num_devices", config.num_devices, f"only {device_count} devices are available")
    if process_count > 1 and config.num_devices != device_count:
      _fail("num_devices", config.num_devices, "a multi-process job must use every device")
  devices = config.num_devices or device_count
  for field in ("global_batch_size", "eval_batch_size"):
    value = config[field]
    if value % devices:
      _fail(field, value, f"must be divisible by the number of devices ({devices})")
    if value % process_count:
      _fail(field, value, f"must be divisible by the number of processes ({process_count})")


def check_method_blocks(overrides: Mapping[str, Any], methods: Sequence[str]) -> None:
  """Refuses a field set in a method block that no method of the run reads.

  ``--config.method=str --config.sparsity.autosparse.target_sparsity=0.5`` would otherwise be
  silently ignored (STR reads ``config.sparsity.str``).

  Args:
    overrides: the values set on the command line, by path (``sparsity.autosparse.alpha0``).
    methods: the methods the run trains (``[config.method]``; compare: its ``--methods``).

  Raises:
    ConfigError: naming the field and value, unless the value is the field's default.
  """
  defaults = base_config()
  for path, value in overrides.items():
    parts = path.split(".")
    if len(parts) < 2 or parts[0] != "sparsity" or parts[1] not in METHODS or parts[1] in methods:
      continue
    try:
      default = _get(defaults, path)
    except (KeyError, AttributeError):
      default = None
    if isinstance(default, ml_collections.ConfigDict):
      default = default.to_dict()
    if isinstance(value, ml_collections.ConfigDict):
      value = value.to_dict()
    if value == default:
      continue
    field = ".".join(parts[2:])
    trained = ", ".join(repr(m) for m in methods)
    instead = ""
    if len(methods) == 1 and field and field in defaults.sparsity[methods[0]]:
      instead = f"; set config.sparsity.{methods[0]}.{field}"
    raise ConfigError(
      f"config.{path}={value!r}: only method {parts[1]!r} reads config.sparsity.{parts[1]}, "
      f"and this run trains {trained}{instead}"
    )


def run_identity(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The fields that a checkpoint must agree on to be resumed (JSON-friendly)."""
  out = {}
  for field in RUN_IDENTITY_FIELDS:
    value = config[field]
    out[field] = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
  return json.loads(json.dumps(out))  # tuples become lists, as in a stored checkpoint


def config_from_json(text: str) -> ml_collections.ConfigDict:
  """The config a run wrote to ``<workdir>/config.json``: :func:`base_config` with the stored
  values (JSON lists back to tuples where the field is a tuple; new keys, e.g. in
  ``model_kwargs``, added)."""
  import json

  def apply(node: ml_collections.ConfigDict, values: dict[str, Any]) -> None:
    for key, value in values.items():
      current = node[key] if key in node else None
      if isinstance(value, dict):
        if isinstance(current, ml_collections.ConfigDict):
          apply(current, value)
        else:
          node[key] = ml_collections.ConfigDict(value)
      elif isinstance(value, list) and (current is None or isinstance(current, tuple)):
        node[key] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
      else:
        node[key] = value

  config = base_config()
  apply(config, json.loads(text))
  return config

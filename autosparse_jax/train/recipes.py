"""Built-in experiment recipes: the offline digits default, STR's ImageNet recipe, a tiny one."""

from __future__ import annotations

import ml_collections

from autosparse_jax.train.config_lib import base_config


def digits_default() -> ml_collections.ConfigDict:
  """The offline default (``configs/default.py``): LeNet-300-100 over the 8x8 digits pixels,
  AutoSparse, 30 epochs of batch 64 (660 steps), about 10-20 seconds on a laptop CPU."""
  config = base_config()
  config.model = "lenet_300_100"
  config.dataset = "digits"
  config.global_batch_size = 64
  config.eval_batch_size = 128
  config.num_epochs = 30.0
  config.learning_rate = 0.05
  config.momentum = 0.9
  config.warmup_epochs = 1.0
  config.weight_decay = 1e-3
  config.log_every_steps = 50
  config.eval_every_epochs = 5.0
  config.checkpoint_every_steps = 200

  config.method = "autosparse"
  sp = config.sparsity
  for name in ("autosparse", "str"):
    sp[name].threshold_init = -4.0
    sp[name].threshold_weight_decay = 0.02
  sp.autosparse.alpha0 = 0.5
  sp.gmp.frequency = 20
  return config


def imagenet_recipe() -> ml_collections.ConfigDict:
  """STR's ImageNet recipe (docs/recipes.md) with the hardware defaults of a TPU pod slice.

  100 epochs, SGD momentum 0.875, peak lr 0.256 per 256 examples (linear scaling), 5 warmup
  epochs then cosine, label smoothing 0.1, weight decay on kernels and thresholds, bfloat16
  compute, global batch 1024, data parallel. The model and the per-method blocks are the
  experiment config's.
  """
  c = base_config()
  c.dataset = "imagenet2012"
  c.train_split = "train"
  c.eval_split = "validation"
  c.image_size = 224
  c.num_workers = 32  # JPEG decoding threads per host (PIL releases the GIL)
  c.num_epochs = 100.0
  c.global_batch_size = 1024
  c.eval_batch_size = 1024
  c.eval_every_epochs = 1.0
  c.optimizer = "sgd"
  c.learning_rate = 0.256
  c.base_batch_size = 256
  c.lr_schedule = "cosine"
  c.warmup_epochs = 5.0
  c.momentum = 0.875
  c.nesterov = False
  c.label_smoothing = 0.1
  c.weight_decay = 3.0517578125e-05  # NVIDIA's / STR's dense ResNet50 value
  c.half_precision = True
  c.sharding = "data"
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2500
  c.keep_checkpoints = 3
  c.sparsity.gmp.frequency = 500  # Gale et al.'s 2000 steps at batch 256
  return c


def tiny_local_variant(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks an ImageNet config to run on a laptop CPU: 64x64 crops, batch 32, 200 steps,
  float32, evaluation on 10 batches. The model is replaced by the experiment's tiny model."""
  config.image_size = 64
  config.num_workers = None
  config.global_batch_size = 32
  config.eval_batch_size = 32
  config.num_train_steps = 200
  config.num_eval_steps = 10
  config.eval_every_epochs = 1.0
  config.warmup_epochs = 0.0
  config.half_precision = False
  config.log_every_steps = 10
  config.checkpoint_every_steps = 100
  config.sparsity.gmp.frequency = 10
  return config

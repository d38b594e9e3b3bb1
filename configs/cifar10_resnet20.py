"""ResNet-20 on CIFAR-10 (He et al.'s CIFAR ResNet with projection shortcuts).

Recipe: 200 epochs, batch 128, SGD momentum 0.9, lr 0.1 with 1 warmup epoch then cosine, weight
decay 1e-4 on kernels, pad-crop-flip augmentation. CIFAR-10 comes from a prepared tfds
``cifar10`` (``tfds build cifar10 --file_format=array_record``; ``--config.data_dir=``). The
method: ``--config.method=`` one of dense, autosparse (default), str, topkast, topkast_ga, gmp.
Per-method defaults aim at about 90% sparsity; the threshold settings of AutoSparse/STR are
starting points, not tuned on CIFAR-10. ``configs/cifar10_resnet20.py:tiny``: a small
bottleneck ResNet for 200 steps, for a laptop CPU.
"""

from autosparse_jax.train.recipes import base_config


def get_config(variant: str = ""):
  config = base_config()
  config.model = "resnet20"
  config.dataset = "cifar10"
  config.global_batch_size = 128
  config.eval_batch_size = 1000
  config.num_epochs = 200.0
  config.learning_rate = 0.1
  config.momentum = 0.9
  config.nesterov = False
  config.warmup_epochs = 1.0
  config.weight_decay = 1e-4
  config.label_smoothing = 0.0
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000

  config.method = "autosparse"
  sp = config.sparsity
  for name in ("autosparse", "str"):
    sp[name].threshold_init = -5.0
    sp[name].threshold_weight_decay = 5e-4
  for name in ("topkast", "topkast_ga"):
    sp[name].forward_sparsity = 0.9
    sp[name].backward_sparsity = 0.8
  sp.gmp.target_sparsity = 0.9
  sp.gmp.frequency = 200
  if variant == "tiny":  # a laptop CPU: a 2-block bottleneck ResNet, 200 steps of batch 32
    config.model = "resnet_tiny"
    config.global_batch_size = 32
    config.eval_batch_size = 100
    config.num_train_steps = 200
    config.num_eval_steps = 10
    config.warmup_epochs = 0.0
    config.log_every_steps = 10
    config.checkpoint_every_steps = 100
    sp.gmp.frequency = 10
  elif variant:
    raise ValueError(f"config variant: expected '' or 'tiny', got {variant!r}")
  return config

"""LeNet-5 (Caffe layout, with batch norm) on MNIST (Han et al. 2015: 0.80% error dense, 0.77%
with 8% of the weights).

MNIST is read from an ``.npz`` (``--config.data_dir=/path/mnist.npz`` or
``$AUTOSPARSE_MNIST_NPZ``) or from a prepared tfds ``mnist``; see ``autosparse_jax.data``. The
method: ``--config.method=`` one of dense, autosparse (default), str, topkast, topkast_ga, gmp.
Per-method defaults aim at about 92% sparsity (TopKAST and GMP are set to it; the
learnable-threshold methods get there through the threshold weight decay).
"""

from autosparse_jax.train.recipes import base_config


def get_config():
  config = base_config()
  config.model = "lenet5"
  config.dataset = "mnist"
  config.global_batch_size = 128
  config.eval_batch_size = 1000
  config.num_epochs = 20.0
  config.learning_rate = 0.1
  config.momentum = 0.9
  config.warmup_epochs = 1.0
  config.weight_decay = 1e-4
  config.log_every_steps = 100
  config.checkpoint_every_steps = 1000

  config.method = "autosparse"
  sp = config.sparsity
  for name in ("autosparse", "str"):
    sp[name].threshold_init = -5.0
    sp[name].threshold_weight_decay = 0.01
  for name in ("topkast", "topkast_ga"):
    sp[name].forward_sparsity = 0.92
    sp[name].backward_sparsity = 0.8
  sp.gmp.target_sparsity = 0.92
  sp.gmp.frequency = 100
  return config

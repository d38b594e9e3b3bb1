"""LeNet-300-100 on MNIST (Han et al. 2015: 1.64% error dense, 1.59% with 8% of the weights).

MNIST is read from an ``.npz`` (``--config.data_dir=/path/mnist.npz`` or
``$AUTOSPARSE_MNIST_NPZ``) or from a prepared tfds ``mnist``; see ``autosparse_jax.data``. The
method: ``--config.method=`` one of dense, autosparse (default), str, topkast, topkast_ga,
topkast_pp, gmp, rigl, rigl_ga, set, mest, mest_ga. The fixed-budget methods are set to 92%
(Han et al.'s 8% kept; TopKAST+GA with GA on every weight outside the forward set, the others'
backward set 20%); the learnable-threshold methods find
their own level through the threshold weight decay. Measured (20 epochs, one seed, CPU): dense
98.52%, AutoSparse 98.51% at 96.97% sparsity, STR 98.32% at 97.47%.
"""

from autosparse_jax.train.recipes import base_config


def get_config():
  config = base_config()
  config.model = "lenet_300_100"
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
  for name in ("topkast", "topkast_ga", "topkast_pp"):
    sp[name].forward_sparsity = 0.92
  sp.topkast.backward_sparsity = 0.8
  sp.topkast_pp.backward_sparsity = 0.8
  for name in ("rigl", "rigl_ga", "set", "mest", "mest_ga"):
    sp[name].sparsity = 0.92
  sp.gmp.target_sparsity = 0.92
  sp.gmp.frequency = 100
  return config

"""The offline default: LeNet-300-100 (as an MLP over the 8x8 pixels) on scikit-learn's digits,
AutoSparse. No download; 10-20 seconds on a laptop CPU (dense: 94.4%; AutoSparse: 94.7% at 92%
sparsity).

  python -m autosparse_jax.train --config=configs/default.py --workdir=/tmp/digits
  python -m autosparse_jax.train --config=configs/default.py --workdir=/tmp/digits_dense \
      --config.method=dense
  python -m autosparse_jax.train.compare        # dense and AutoSparse side by side
"""

from autosparse_jax.train.recipes import digits_default


def get_config():
  # The recipe lives in the package so that `python -m autosparse_jax.train.compare` has it without
  # this file; see autosparse_jax/train/recipes.py:digits_default for the values.
  return digits_default()

"""autosparse_jax: AutoSparse (learnable thresholds + Gradient Annealing), STR, TopKAST,
RigL, SET, MEST, Powerpropagation and gradual magnitude pruning as one optax optimizer.

``import autosparse_jax`` needs only jax, optax and numpy; models, data and the training system
live in submodules that load flax, tfds, orbax and clu when imported.
"""

from autosparse_jax import selection
from autosparse_jax.budgets import Budget
from autosparse_jax.chain import (
  SparseTrainingState,
  SparseTransformation,
  ThresholdOptimizerState,
  optax_chain,
)
from autosparse_jax.controller import ControllerState, ramp, sparsity_controller
from autosparse_jax.dst import MEST, SET, RigL
from autosparse_jax.methods import (
  STR,
  AutoSparse,
  Components,
  Dense,
  GradualMagnitude,
  Method,
  TopKAST,
)
from autosparse_jax.powerprop import Powerprop
from autosparse_jax.schedules import constant, cosine_decay, linear_decay, sigmoid_cosine_decay
from autosparse_jax.selection import kernels
from autosparse_jax.stages import (
  GradientAnnealingState,
  LatentParams,
  MaskedGradients,
  MaskStage,
  gradient_annealing,
  magnitude_mask,
  soft_threshold,
  threshold_mask,
  topk_mask,
)
from autosparse_jax.stats import Sparsity, find_state, sparsity, summary

__version__ = "0.1.0"

__all__ = [
  "AutoSparse",
  "Budget",
  "Components",
  "ControllerState",
  "Dense",
  "GradientAnnealingState",
  "GradualMagnitude",
  "LatentParams",
  "MaskStage",
  "MEST",
  "MaskedGradients",
  "Method",
  "Powerprop",
  "RigL",
  "SET",
  "STR",
  "Sparsity",
  "SparseTrainingState",
  "SparseTransformation",
  "ThresholdOptimizerState",
  "TopKAST",
  "constant",
  "cosine_decay",
  "find_state",
  "gradient_annealing",
  "kernels",
  "linear_decay",
  "magnitude_mask",
  "optax_chain",
  "ramp",
  "selection",
  "sigmoid_cosine_decay",
  "soft_threshold",
  "sparsity",
  "sparsity_controller",
  "summary",
  "threshold_mask",
  "topk_mask",
]

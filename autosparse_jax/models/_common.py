"""Pieces shared by the model families: initialisers and the batch-norm factory."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any

#: Kaiming-normal, fan-in, gain sqrt(2): ``W ~ N(0, 2 / fan_in)`` (untruncated), as in STR and
#: torchvision's ``kaiming_normal_(mode="fan_in")``. For a Flax conv kernel ``(*window, in/g,
#: out)`` fan_in = prod(window) * in/g, so depthwise kernels get fan_in = 9.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def batch_norm(
  train: bool,
  *,
  dtype: Dtype,
  momentum: float,
  epsilon: float,
  axis_name: str | None,
) -> functools.partial:
  """A ``nn.BatchNorm`` factory; statistics in ``batch_stats``, scale/bias float32 params.

  ``use_running_average = not train``. ``momentum`` is Flax's (running = m * running +
  (1 - m) * batch), so 0.9 is PyTorch's 0.1.
  """
  return functools.partial(
    nn.BatchNorm,
    use_running_average=not train,
    momentum=momentum,
    epsilon=epsilon,
    dtype=dtype,
    param_dtype=jnp.float32,
    axis_name=axis_name,
  )

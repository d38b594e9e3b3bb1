"""LeNet-300-100 and LeNet-5 (Caffe layout) for MNIST, as pruned by Han et al. (2015).

Han et al. used the Caffe models, which have no batch norm: dense and conv layers carry biases,
and Caffe's LeNet-5 has no ReLU after its convolutions (only after ``ip1``). Here batch norm is
on by default (``batch_norm=True``) so that every model in ``autosparse_jax.models`` has the same
``{'params', 'batch_stats'}`` layout; then the layers that BN follows have no bias. With
``batch_norm=False`` the models are the Caffe originals exactly (biases, no ``batch_stats``).
The prunable kernels are the same either way: LeNet-300-100 has 266,200 weights
(784*300 + 300*100 + 100*10), LeNet-5 430,500 (500 + 25,000 + 400,000 + 5,000).

The classifier (``head``) always has a bias and no batch norm. Logits are returned as float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from autosparse_jax.models._common import Dtype, batch_norm, conv_kernel_init


class LeNet300100(nn.Module):
  """MLP 784-300-100-``num_classes``; flattens any input to ``(batch, -1)``.

  Layers ``fc1``, ``fc2`` (each Dense -> [BN] -> ReLU) and ``head``.
  """

  num_classes: int = 10
  hidden: Sequence[int] = (300, 100)
  batch_norm: bool = True
  dtype: Dtype = jnp.float32
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    norm = batch_norm(
      train,
      dtype=self.dtype,
      momentum=self.bn_momentum,
      epsilon=self.bn_epsilon,
      axis_name=self.bn_axis_name,
    )
    x = jnp.asarray(x, self.dtype).reshape((x.shape[0], -1))
    for i, width in enumerate(self.hidden, start=1):
      x = nn.Dense(width, use_bias=not self.batch_norm, dtype=self.dtype, name=f"fc{i}")(x)
      if self.batch_norm:
        x = norm(name=f"bn{i}")(x)
      x = nn.relu(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
    return jnp.asarray(x, jnp.float32)


class LeNet5(nn.Module):
  """Caffe LeNet-5: conv 5x5x20 -> maxpool 2/2 -> conv 5x5x50 -> maxpool 2/2 -> dense 500 ->
  ReLU -> dense ``num_classes``. VALID convolutions, as in Caffe.

  Input: NHWC ``(batch, 28, 28, 1)``; ``(batch, 28, 28)`` and flat ``(batch, 784)`` are
  reshaped to it. Layers ``conv1``, ``conv2``, ``fc1``, ``head`` (BN ``bn1``, ``bn2``, ``bn3``
  after the first three when ``batch_norm``). ``conv_activation=True`` adds a ReLU after each
  conv block (not in the Caffe model).
  """

  num_classes: int = 10
  features: Sequence[int] = (20, 50)
  hidden: int = 500
  batch_norm: bool = True
  conv_activation: bool = False
  dtype: Dtype = jnp.float32
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    norm = batch_norm(
      train,
      dtype=self.dtype,
      momentum=self.bn_momentum,
      epsilon=self.bn_epsilon,
      axis_name=self.bn_axis_name,
    )
    if x.ndim == 2:
      side = int(round(x.shape[1] ** 0.5))
      if side * side != x.shape[1]:
        raise ValueError(f"LeNet5 input of shape {x.shape}: a flat input must be square")
      x = x.reshape((x.shape[0], side, side, 1))
    elif x.ndim == 3:
      x = x[..., None]
    x = jnp.asarray(x, self.dtype)
    for i, feats in enumerate(self.features, start=1):
      x = nn.Conv(
        feats,
        (5, 5),
        padding="VALID",
        use_bias=not self.batch_norm,
        kernel_init=conv_kernel_init,
        dtype=self.dtype,
        name=f"conv{i}",
      )(x)
      if self.batch_norm:
        x = norm(name=f"bn{i}")(x)
      if self.conv_activation:
        x = nn.relu(x)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.Dense(self.hidden, use_bias=not self.batch_norm, dtype=self.dtype, name="fc1")(x)
    if self.batch_norm:
      x = norm(name=f"bn{len(self.features) + 1}")(x)
    x = nn.relu(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
    return jnp.asarray(x, jnp.float32)

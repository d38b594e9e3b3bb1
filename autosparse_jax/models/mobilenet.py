"""MobileNetV1 (Howard et al. 2017) for ImageNet.

Layout: 3x3/2 conv ``conv_init`` (32 * width ch) -> BN ``bn_init`` -> ReLU, then 13
depthwise-separable blocks ``block{i}`` (i from 0), each

    3x3 depthwise conv ``dw_conv`` (stride s, ``feature_group_count`` = channels) -> BN
    ``dw_bn`` -> ReLU -> 1x1 pointwise conv ``pw_conv`` -> BN ``pw_bn`` -> ReLU,

then global average pool -> Dense ``head`` (with bias). Channels are ``max(int(c * width),
min_channels)`` as in TF-slim's ``depth_multiplier``. Padding is PyTorch's symmetric 1 for the
3x3 convs. At width 1.0 and 224x224: 4,231,976 params and 568,740,352 conv+dense MACs (the
paper's 569M Mult-Adds).

Convs have no bias and Kaiming-normal fan-in init (for a depthwise kernel fan_in = 9).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from autosparse_jax.models._common import Dtype, batch_norm, conv_kernel_init

#: (pointwise output channels, depthwise stride) of the 13 blocks of MobileNetV1.
MOBILENET_V1_BLOCKS: tuple[tuple[int, int], ...] = (
  (64, 1),
  (128, 2),
  (128, 1),
  (256, 2),
  (256, 1),
  (512, 2),
  (512, 1),
  (512, 1),
  (512, 1),
  (512, 1),
  (512, 1),
  (1024, 2),
  (1024, 1),
)

_PAD3 = ((1, 1), (1, 1))


class DepthwiseSeparable(nn.Module):
  """3x3 depthwise conv (stride) -> BN -> ReLU -> 1x1 conv -> BN -> ReLU."""

  channels: int
  strides: int
  conv: Any
  norm: Any

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    in_ch = x.shape[-1]
    x = self.conv(
      in_ch,
      (3, 3),
      (self.strides, self.strides),
      padding=_PAD3,
      feature_group_count=in_ch,
      name="dw_conv",
    )(x)
    x = nn.relu(self.norm(name="dw_bn")(x))
    x = self.conv(self.channels, (1, 1), name="pw_conv")(x)
    return nn.relu(self.norm(name="pw_bn")(x))


class MobileNetV1(nn.Module):
  """MobileNetV1; see the module docstring.

  Args (dataclass fields):
    num_classes: classifier outputs.
    width: width multiplier alpha (1.0, 0.75, 0.5, 0.25 ...).
    blocks: (channels, stride) per depthwise-separable block, before ``width``; a shorter
      tuple gives a small test model.
    stem_channels: stem conv channels before ``width``.
    min_channels: floor on every layer's channels after ``width``.
    dtype: compute dtype; params stay float32, logits are float32.
    head_bias: give the Dense classifier a bias.
    bn_momentum, bn_epsilon, bn_axis_name: passed to ``nn.BatchNorm``.
  """

  num_classes: int = 1000
  width: float = 1.0
  blocks: Sequence[tuple[int, int]] = MOBILENET_V1_BLOCKS
  stem_channels: int = 32
  min_channels: int = 8
  dtype: Dtype = jnp.float32
  head_bias: bool = True
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  bn_axis_name: str | None = None

  def _channels(self, c: int) -> int:
    return max(int(c * self.width), self.min_channels)

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    if not self.width > 0:
      raise ValueError(f"width must be > 0, got {self.width}")
    conv = functools.partial(
      nn.Conv, use_bias=False, kernel_init=conv_kernel_init, dtype=self.dtype
    )
    norm = batch_norm(
      train,
      dtype=self.dtype,
      momentum=self.bn_momentum,
      epsilon=self.bn_epsilon,
      axis_name=self.bn_axis_name,
    )
    x = jnp.asarray(x, self.dtype)
    x = conv(self._channels(self.stem_channels), (3, 3), (2, 2), padding=_PAD3, name="conv_init")(x)
    x = nn.relu(norm(name="bn_init")(x))
    for i, (channels, stride) in enumerate(self.blocks):
      x = DepthwiseSeparable(
        self._channels(channels), stride, conv=conv, norm=norm, name=f"block{i}"
      )(x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, use_bias=self.head_bias, dtype=self.dtype, name="head")(x)
    return jnp.asarray(x, jnp.float32)

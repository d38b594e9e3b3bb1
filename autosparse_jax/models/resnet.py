"""ResNets: ImageNet ResNet-18/50 (torchvision layout, v1.5) and CIFAR ResNet-20.

Layout (``stem="imagenet"``): 7x7/2 conv ``conv_init`` (64 ch) -> BN ``bn_init`` -> ReLU ->
3x3/2 max pool -> stages ``stage{s}_block{b}`` (s from 1, b from 0) -> global average pool ->
Dense ``head`` (with bias). Stage s has ``num_filters * 2**(s-1)`` filters and stride 2 in its
first block for s > 1. Bottleneck blocks put the stride on the 3x3 conv (ResNet v1.5, as
torchvision and STR; this is what makes ``stage2_block0/conv1`` cost 102.8M MACs at 224x224).
Padding is PyTorch's symmetric ``k // 2`` (not Flax's "SAME", which pads stride-2 convs
asymmetrically), so activations line up with torchvision's.

``stem="cifar"``: one 3x3/1 conv ``conv_init`` with ``num_filters`` channels, no max pool
(He et al. 2016's CIFAR ResNets: ResNet-20 = stages (3, 3, 3) of basic blocks, 16/32/64 ch).

Shortcuts: identity when shape is unchanged, otherwise a 1x1 conv projection with stride +
BN (``proj_conv``/``proj_bn``) -- "option B" in He et al.; torchvision's ``downsample``. For
ResNet-20 that adds two 1x1 convs (512 + 2,048 weights) and their BNs to option A's
parameter-free zero-padding shortcut (He et al.'s CIFAR setup): 272,474 params at 10 classes
instead of 269,722.

Block submodules: ``conv1``, ``bn1``, ``conv2``, ``bn2`` (+ ``conv3``, ``bn3`` in bottlenecks).
Convs have no bias and Kaiming-normal fan-in init. ``zero_init_residual=True`` starts the last
BN scale of every block at 0 (Goyal et al.; NVIDIA's and the Flax example's recipe), so each
block starts as the identity; ``False`` gives torchvision's default (scale 1).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from autosparse_jax.models._common import Dtype, batch_norm, conv_kernel_init

ModuleDef = Any


def _torch_padding(kernel: int) -> tuple[tuple[int, int], tuple[int, int]]:
  return ((kernel // 2, kernel // 2), (kernel // 2, kernel // 2))


class BasicBlock(nn.Module):
  """3x3 conv -> BN -> ReLU -> 3x3 conv -> BN, + shortcut, ReLU. Output ``filters`` ch."""

  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  zero_init_residual: bool = True

  expansion = 1

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    s = (self.strides, self.strides)
    y = self.conv(self.filters, (3, 3), s, padding=_torch_padding(3), name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = self.conv(self.filters, (3, 3), padding=_torch_padding(3), name="conv2")(y)
    last_scale = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
    y = self.norm(scale_init=last_scale, name="bn2")(y)
    return nn.relu(_shortcut(self, x, y, self.filters) + y)


class BottleneckBlock(nn.Module):
  """1x1 conv -> BN -> ReLU -> 3x3 conv (stride) -> BN -> ReLU -> 1x1 conv (4x) -> BN,
  + shortcut, ReLU. Output ``4 * filters`` channels."""

  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  zero_init_residual: bool = True

  expansion = 4

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    s = (self.strides, self.strides)
    y = self.conv(self.filters, (1, 1), name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = self.conv(self.filters, (3, 3), s, padding=_torch_padding(3), name="conv2")(y)
    y = nn.relu(self.norm(name="bn2")(y))
    out = self.filters * self.expansion
    y = self.conv(out, (1, 1), name="conv3")(y)
    last_scale = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
    y = self.norm(scale_init=last_scale, name="bn3")(y)
    return nn.relu(_shortcut(self, x, y, out) + y)


def _shortcut(block: nn.Module, x: jnp.ndarray, y: jnp.ndarray, out: int) -> jnp.ndarray:
  """Identity, or 1x1 conv (stride) + BN when the shape changes (option B)."""
  if x.shape == y.shape:
    return x
  s = (block.strides, block.strides)
  x = block.conv(out, (1, 1), s, name="proj_conv")(x)
  return block.norm(name="proj_bn")(x)


_BLOCKS = {"basic": BasicBlock, "bottleneck": BottleneckBlock}


class ResNet(nn.Module):
  """Generic ResNet; see the module docstring for layout and names.

  Args (dataclass fields):
    num_classes: classifier outputs.
    stage_sizes: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
    block: "basic" or "bottleneck".
    num_filters: filters of the first stage (and the stem); doubled every stage.
    stem: "imagenet" (7x7/2 conv + 3x3/2 max pool) or "cifar" (3x3/1 conv).
    dtype: compute dtype (e.g. ``jnp.bfloat16``); params stay float32, logits are float32.
    zero_init_residual: start each block's last BN scale at 0.
    head_bias: give the Dense classifier a bias (STR's is a bias-free 1x1 conv).
    bn_momentum, bn_epsilon, bn_axis_name: passed to ``nn.BatchNorm``.
  """

  num_classes: int = 1000
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  block: str = "bottleneck"
  num_filters: int = 64
  stem: str = "imagenet"
  dtype: Dtype = jnp.float32
  zero_init_residual: bool = True
  head_bias: bool = True
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    if self.block not in _BLOCKS:
      raise ValueError(f"block must be one of {sorted(_BLOCKS)}, got {self.block!r}")
    if self.stem not in ("imagenet", "cifar"):
      raise ValueError(f"stem must be 'imagenet' or 'cifar', got {self.stem!r}")
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
    if self.stem == "imagenet":
      x = conv(self.num_filters, (7, 7), (2, 2), padding=_torch_padding(7), name="conv_init")(x)
      x = nn.relu(norm(name="bn_init")(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=_torch_padding(3))
    else:
      x = conv(self.num_filters, (3, 3), padding=_torch_padding(3), name="conv_init")(x)
      x = nn.relu(norm(name="bn_init")(x))
    block_cls = _BLOCKS[self.block]
    for i, n_blocks in enumerate(self.stage_sizes):
      for j in range(n_blocks):
        x = block_cls(
          filters=self.num_filters * 2**i,
          conv=conv,
          norm=norm,
          strides=2 if i > 0 and j == 0 else 1,
          zero_init_residual=self.zero_init_residual,
          name=f"stage{i + 1}_block{j}",
        )(x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, use_bias=self.head_bias, dtype=self.dtype, name="head")(x)
    return jnp.asarray(x, jnp.float32)


def ResNet18(num_classes: int = 1000, **kwargs: Any) -> ResNet:
  """torchvision ResNet-18: basic blocks (2, 2, 2, 2), 11,689,512 params at 1000 classes."""
  return ResNet(
    num_classes=num_classes, **{"stage_sizes": (2, 2, 2, 2), "block": "basic", **kwargs}
  )


def ResNet50(num_classes: int = 1000, **kwargs: Any) -> ResNet:
  """torchvision ResNet-50 v1.5: bottlenecks (3, 4, 6, 3), 25,557,032 params at 1000
  classes; 4,089,184,256 conv+dense MACs at 224x224 (+100,352 for the average pool)."""
  return ResNet(
    num_classes=num_classes, **{"stage_sizes": (3, 4, 6, 3), "block": "bottleneck", **kwargs}
  )


def ResNet20(num_classes: int = 10, **kwargs: Any) -> ResNet:
  """CIFAR ResNet-20: 3x3 stem, basic blocks (3, 3, 3), 16/32/64 ch, projection shortcuts."""
  return ResNet(
    num_classes=num_classes,
    **{
      "stage_sizes": (3, 3, 3),
      "block": "basic",
      "num_filters": 16,
      "stem": "cifar",
      **kwargs,
    },
  )

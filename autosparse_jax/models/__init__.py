"""Flax linen models for sparse-training experiments, and a name registry.

Every model is called as ``model.apply(variables, x, train=...)`` with NHWC images (the LeNets
also take flat MNIST rows); variables are ``{'params': ..., 'batch_stats': ...}`` and training
mode needs ``mutable=['batch_stats']``. Prunable kernels are named ``kernel``; convs have no
bias (batch norm follows); ``dtype`` sets the compute dtype (params stay float32, logits are
float32).

Registry names (``get_model(name, num_classes, **overrides)``):

=================  ==============================================================
``lenet_300_100``  MLP 784-300-100-10 (Han et al.)
``lenet5``         Caffe LeNet-5, 28x28x1 input
``resnet20``       CIFAR ResNet-20, projection (option B) shortcuts
``resnet18``       ImageNet ResNet-18 (torchvision layout)
``resnet50``       ImageNet ResNet-50 v1.5 (torchvision layout)
``mobilenet_v1``   ImageNet MobileNetV1, ``width`` multiplier (default 1.0)
``resnet_tiny``    CIFAR-stem bottleneck ResNet, stages (1, 1), 8 filters -- for tests
``mobilenet_tiny`` MobileNetV1, width 0.25, 3 blocks -- for tests
``vit_tiny``       ViT-Ti/16 (224x224 images); variables ``{'params'}`` only
``gpt2_small``     GPT-2 small layout, ``num_classes`` = vocabulary; int token input
``gpt_tiny``       GPT, 4 layers, width 128, 4 heads, context 128 -- for tests and benchmarks
=================  ==============================================================

The transformers prune only their attention and MLP kernels: pass
:data:`TRANSFORMER_PRUNABLE` as ``prunable`` to :func:`autosparse_jax.optax_chain`.

Keyword overrides replace any dataclass field, e.g.
``get_model("resnet50", 10, stage_sizes=(1, 1), num_filters=8)`` or
``get_model("mobilenet_v1", 1000, width=0.5, dtype=jnp.bfloat16)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn

from autosparse_jax.models.lenet import LeNet5, LeNet300100
from autosparse_jax.models.mobilenet import MOBILENET_V1_BLOCKS, DepthwiseSeparable, MobileNetV1
from autosparse_jax.models.resnet import (
  BasicBlock,
  BottleneckBlock,
  ResNet,
  ResNet18,
  ResNet20,
  ResNet50,
)
from autosparse_jax.models.transformer import GPT, TRANSFORMER_PRUNABLE, ViT

__all__ = [
  "MODELS",
  "MOBILENET_V1_BLOCKS",
  "TRANSFORMER_PRUNABLE",
  "GPT",
  "BasicBlock",
  "BottleneckBlock",
  "DepthwiseSeparable",
  "LeNet300100",
  "LeNet5",
  "MobileNetV1",
  "ResNet",
  "ResNet18",
  "ResNet20",
  "ResNet50",
  "ViT",
  "get_model",
]


def _with_defaults(cls: Callable[..., nn.Module], **defaults: Any) -> Callable[..., nn.Module]:
  def make(num_classes: int, **kwargs: Any) -> nn.Module:
    return cls(num_classes=num_classes, **{**defaults, **kwargs})

  make.__doc__ = f"{cls.__name__}(num_classes, **{{{defaults!r} | overrides}})"
  return make


#: name -> constructor ``(num_classes, **overrides) -> nn.Module``.
MODELS: dict[str, Callable[..., nn.Module]] = {
  "lenet_300_100": _with_defaults(LeNet300100),
  "lenet5": _with_defaults(LeNet5),
  "resnet20": _with_defaults(ResNet20),
  "resnet18": _with_defaults(ResNet18),
  "resnet50": _with_defaults(ResNet50),
  "mobilenet_v1": _with_defaults(MobileNetV1),
  "resnet_tiny": _with_defaults(
    ResNet, stage_sizes=(1, 1), block="bottleneck", num_filters=8, stem="cifar"
  ),
  "mobilenet_tiny": _with_defaults(MobileNetV1, width=0.25, blocks=((64, 1), (128, 2), (256, 2))),
  "vit_tiny": _with_defaults(ViT),
  "gpt2_small": _with_defaults(GPT),
  "gpt_tiny": _with_defaults(GPT, max_len=128, width=128, depth=4, num_heads=4, mlp_dim=512),
}


def get_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
  """The registered model ``name`` with ``num_classes`` outputs; ``kwargs`` override fields.

  Raises:
    ValueError: if ``name`` is not registered (the message lists the accepted names).
  """
  try:
    make = MODELS[name]
  except KeyError:
    raise ValueError(
      f"unknown model name {name!r}; accepted names: {', '.join(sorted(MODELS))}"
    ) from None
  return make(num_classes, **kwargs)

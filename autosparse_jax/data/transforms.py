"""Per-example image transforms on uint8 HWC numpy arrays (no TensorFlow).

Every random transform takes a ``numpy.random.Generator``; the pipeline derives one per example
from ``(seed, epoch, example index)`` with :func:`example_rng`, so an augmentation depends only on
those three numbers: not on the batch size, the process count, the thread that ran it, or where
iteration was resumed.

Resizing uses PIL (bilinear, antialiased when downscaling, as torchvision's ``Resize``).
"""

from __future__ import annotations

import math

import numpy as np

# Distinct first words keep the shuffle streams and the augmentation streams apart.
_SHUFFLE_STREAM = 0x5EED_0001
_AUGMENT_STREAM = 0x5EED_0002

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
"""Per-channel mean of the CIFAR-10 training images, in [0, 1] units."""
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
"""Per-channel standard deviation of the CIFAR-10 training images, in [0, 1] units."""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
"""Per-channel mean of ImageNet (the torchvision/Flax-example constants), in [0, 1] units."""
IMAGENET_STD = (0.229, 0.224, 0.225)
"""Per-channel standard deviation of ImageNet, in [0, 1] units."""


def _check_seed(seed: int) -> int:
  seed = int(seed)
  if seed < 0:
    raise ValueError(f"seed must be a non-negative integer, got {seed}.")
  return seed


def shuffle_rng(seed: int, epoch: int) -> np.random.Generator:
  """The generator that orders the examples of training epoch ``epoch``."""
  return np.random.default_rng([_SHUFFLE_STREAM, _check_seed(seed), int(epoch)])


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
  """The generator that augments example ``index`` (its record index) in epoch ``epoch``."""
  return np.random.default_rng([_AUGMENT_STREAM, _check_seed(seed), int(epoch), int(index)])


def as_rgb(image: np.ndarray) -> np.ndarray:
  """Returns ``image`` as an (H, W, 3) array (grayscale is repeated, alpha dropped)."""
  if image.ndim == 2:
    image = image[:, :, None]
  if image.shape[-1] == 1:
    return np.repeat(image, 3, axis=-1)
  if image.shape[-1] == 4:
    return image[:, :, :3]
  return image


def pad_crop_flip(image: np.ndarray, rng: np.random.Generator, *, padding: int = 4) -> np.ndarray:
  """CIFAR-style augmentation: zero-pad by ``padding`` pixels, random crop back, random h-flip."""
  h, w = image.shape[:2]
  top, left = rng.integers(0, 2 * padding + 1, size=2)
  flip = rng.random() < 0.5
  padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
  out = padded[top : top + h, left : left + w]
  if flip:
    out = out[:, ::-1]
  return np.ascontiguousarray(out)


def random_resized_crop_box(
  height: int,
  width: int,
  rng: np.random.Generator,
  *,
  scale: tuple[float, float] = (0.08, 1.0),
  ratio: tuple[float, float] = (3 / 4, 4 / 3),
  attempts: int = 10,
) -> tuple[int, int, int, int]:
  """Samples a crop ``(top, left, crop_height, crop_width)`` as torchvision's RandomResizedCrop.

  Area fraction uniform in ``scale``, aspect ratio log-uniform in ``ratio``; after ``attempts``
  misses it falls back to the largest centred crop whose aspect ratio lies in ``ratio``.
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(attempts):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    h, w = height, int(round(height * ratio[1]))
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


def _resize(
  image: np.ndarray, size: tuple[int, int], box: tuple[int, int, int, int] | None = None
) -> np.ndarray:
  """Resizes ``image`` (optionally its ``box`` = (left, top, right, bottom)) to (width, height)."""
  from PIL import Image

  pil = Image.fromarray(image)
  out = pil.resize(size, resample=Image.Resampling.BILINEAR, box=box)
  return np.asarray(out)


def random_resized_crop_flip(
  image: np.ndarray,
  rng: np.random.Generator,
  *,
  image_size: int,
  scale: tuple[float, float] = (0.08, 1.0),
  ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> np.ndarray:
  """ImageNet training augmentation: random-resized crop to ``image_size`` and random h-flip."""
  image = as_rgb(image)
  top, left, h, w = random_resized_crop_box(*image.shape[:2], rng, scale=scale, ratio=ratio)
  flip = rng.random() < 0.5
  out = _resize(image, (image_size, image_size), box=(left, top, left + w, top + h))
  if flip:
    out = out[:, ::-1]
  return np.ascontiguousarray(out)


def resize_center_crop(
  image: np.ndarray, *, image_size: int, crop_fraction: float = 0.875
) -> np.ndarray:
  """ImageNet evaluation: resize the shorter side to ``image_size / crop_fraction``, centre-crop.

  Matches torchvision's ``Resize(int(image_size / crop_fraction))`` + ``CenterCrop(image_size)``
  (224 -> resize to 256, crop 224).
  """
  if not 0.0 < crop_fraction <= 1.0:
    raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}.")
  image = as_rgb(image)
  h, w = image.shape[:2]
  short = int(image_size / crop_fraction)
  if h <= w:
    new_h, new_w = short, int(short * w / h)
  else:
    new_h, new_w = int(short * h / w), short
  resized = _resize(image, (new_w, new_h))
  top = int(round((new_h - image_size) / 2.0))
  left = int(round((new_w - image_size) / 2.0))
  return np.ascontiguousarray(resized[top : top + image_size, left : left + image_size])

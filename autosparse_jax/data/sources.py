"""Record sources: random access to ``(uint8 HWC image, int label)`` examples.

A source is anything with ``__len__`` and ``__getitem__(index) -> (image, label)``. Two kinds:

* :class:`ArraySource` holds the whole split in memory as arrays and also gathers a batch in
  one vectorised ``take``. Digits, MNIST and CIFAR-10 use it.
* :class:`TfdsSource` wraps a ``tfds.data_source`` (ArrayRecord files read by random access;
  no TensorFlow needed for reading). ImageNet uses it; each read decodes one JPEG, and the
  reader is thread-safe, so the pipeline reads in a thread pool.

Nothing here downloads anything. When a tfds dataset is not prepared, the loaders raise
:class:`DatasetUnavailableError` saying how to prepare it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent import futures
from pathlib import Path
from typing import Any, Protocol

import numpy as np

MNIST_NPZ_ENV = "AUTOSPARSE_MNIST_NPZ"
"""Environment variable naming an MNIST ``.npz`` file (keys x_train, y_train, x_test, y_test)."""


class DatasetUnavailableError(FileNotFoundError):
  """The dataset's files are not where they were looked for (nothing is downloaded)."""


class RecordSource(Protocol):
  """Random access to examples: ``source[i] -> (uint8 image (H, W, C), int label)``."""

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]: ...


class ArraySource:
  """An in-memory split: ``images`` uint8 (N, H, W, C) and integer ``labels`` (N,)."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 4:
      raise ValueError(f"images must have shape (N, H, W, C), got {images.shape}.")
    if labels.shape != (images.shape[0],):
      raise ValueError(f"labels must have shape ({images.shape[0]},), got {labels.shape}.")
    self.images = images
    self.labels = labels.astype(np.int32)

  def __len__(self) -> int:
    return self.images.shape[0]

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    return self.images[index], int(self.labels[index])

  def take(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gathers the examples at ``indices``: images (B, H, W, C) and int32 labels (B,)."""
    return self.images[indices], self.labels[indices]


class TfdsSource:
  """Adapts a ``tfds.data_source`` split (a sequence of feature dicts) to a record source."""

  def __init__(
    self, data_source: Sequence[Any], image_key: str = "image", label_key: str = "label"
  ):
    self.data_source = data_source
    self.image_key = image_key
    self.label_key = label_key

  def __len__(self) -> int:
    return len(self.data_source)

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    example = self.data_source[int(index)]
    image = np.asarray(example[self.image_key])
    if image.ndim == 2:
      image = image[:, :, None]
    return image, int(example[self.label_key])


def materialize(source: RecordSource, num_workers: int = 8) -> ArraySource:
  """Reads every example of a fixed-shape ``source`` into an :class:`ArraySource`."""
  n = len(source)
  if n == 0:
    raise ValueError("The source is empty.")
  first_image, _ = source[0]
  images = np.empty((n, *first_image.shape), dtype=first_image.dtype)
  labels = np.empty((n,), dtype=np.int32)

  def read(i: int) -> None:
    image, label = source[i]
    images[i] = image
    labels[i] = label

  if num_workers > 1:
    with futures.ThreadPoolExecutor(num_workers) as pool:
      list(pool.map(read, range(n)))
  else:
    for i in range(n):
      read(i)
  return ArraySource(images, labels)


# ---------------------------------------------------------------------------------------------
# digits (scikit-learn)

DIGITS_TEST_FRACTION = 0.2


def load_digits(split: str) -> ArraySource:
  """scikit-learn's bundled 8x8 digits (1797 images, pixel values 0..16, 10 classes).

  A fixed split: the last ``N // 5`` = 359 images are ``"test"``, the first 1438 ``"train"``.
  Needs no download.
  """
  from sklearn.datasets import load_digits as sk_load_digits

  x, y = sk_load_digits(return_X_y=True)
  images = x.reshape(-1, 8, 8, 1).astype(np.uint8)
  num_test = int(len(x) * DIGITS_TEST_FRACTION)
  if split == "train":
    return ArraySource(images[:-num_test], y[:-num_test])
  if split == "test":
    return ArraySource(images[-num_test:], y[-num_test:])
  raise ValueError(f"split for 'digits' must be 'train' or 'test', got {split!r}.")


# ---------------------------------------------------------------------------------------------
# MNIST from a local .npz


def find_mnist_npz(data_dir: str | os.PathLike | None) -> Path | None:
  """The MNIST ``.npz`` to read, or None to fall back to tfds.

  ``data_dir`` that is a ``.npz`` file, or a directory holding ``mnist.npz``, wins; then the
  environment variable ``AUTOSPARSE_MNIST_NPZ``. A path named by either that does not exist is an
  error, not a silent fall-back.
  """
  if data_dir is not None:
    path = Path(data_dir)
    if path.suffix == ".npz":
      if not path.is_file():
        raise DatasetUnavailableError(f"MNIST npz file {path} does not exist.")
      return path
    if (path / "mnist.npz").is_file():
      return path / "mnist.npz"
  env = os.environ.get(MNIST_NPZ_ENV)
  if env:
    path = Path(env)
    if not path.is_file():
      raise DatasetUnavailableError(f"{MNIST_NPZ_ENV}={env} does not name an existing file.")
    return path
  return None


def load_mnist_npz(path: str | os.PathLike, split: str) -> ArraySource:
  """MNIST from an ``.npz`` with uint8 ``x_train`` (N, 784) or (N, 28, 28), ``y_train``, ..."""
  if split not in ("train", "test"):
    raise ValueError(f"split for 'mnist' must be 'train' or 'test', got {split!r}.")
  with np.load(path) as data:
    missing = {f"x_{split}", f"y_{split}"} - set(data.files)
    if missing:
      raise ValueError(f"{path} lacks the arrays {sorted(missing)}; it has {data.files}.")
    images = np.asarray(data[f"x_{split}"])
    labels = np.asarray(data[f"y_{split}"])
  if images.dtype != np.uint8:
    raise ValueError(f"{path}: x_{split} must be uint8 pixels 0..255, got {images.dtype}.")
  return ArraySource(images.reshape(-1, 28, 28, 1), labels)


# ---------------------------------------------------------------------------------------------
# tfds

_PREPARE_HINTS = {
  "imagenet2012": (
    "ImageNet needs a manual download: get ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar "
    "from https://image-net.org, put them in <data_dir>/downloads/manual/, then run "
    "`tfds build imagenet2012 --data_dir=<data_dir> --file_format=array_record` "
    "(building needs TensorFlow installed; reading does not)."
  ),
}


def _prepare_hint(name: str, data_dir: str | None) -> str:
  where = data_dir or "$TFDS_DATA_DIR or ~/tensorflow_datasets"
  hint = _PREPARE_HINTS.get(
    name,
    f"Prepare it once, on a machine with internet access and TensorFlow installed: "
    f"`tfds build {name} --data_dir=<data_dir> --file_format=array_record`.",
  )
  return f"{hint} Looked in data_dir={where}."


def tfds_data_source(name: str, split: str, data_dir: str | None = None) -> tuple[Any, Any]:
  """Opens a prepared tfds dataset for random access; returns ``(data_source, dataset_info)``.

  Never downloads: when the dataset is not prepared in ``data_dir`` (ArrayRecord format), this
  raises :class:`DatasetUnavailableError` naming the command that prepares it.
  """
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:  # pragma: no cover - the training extra installs it
    raise ImportError(
      f"Loading {name!r} needs tensorflow-datasets (and array_record): "
      "pip install tensorflow-datasets array_record"
    ) from e

  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:
    raise DatasetUnavailableError(f"tfds does not know the dataset {name!r}: {e}") from e
  try:
    # ``as_data_source`` only reads local files; ``tfds.data_source`` could start a download.
    source = builder.as_data_source(split=split)
  except Exception as e:
    if not builder.is_prepared():
      raise DatasetUnavailableError(
        f"tfds dataset {name!r} is not prepared under {builder.data_dir}. "
        + _prepare_hint(name, data_dir)
      ) from e
    if isinstance(e, NotImplementedError):
      raise DatasetUnavailableError(
        f"tfds dataset {name!r} at {builder.data_dir} is not stored as ArrayRecord, which random "
        f"access needs: rebuild it with "
        f"`tfds build {name} --data_dir=<data_dir> --file_format=array_record`."
      ) from e
    raise
  return source, builder.info

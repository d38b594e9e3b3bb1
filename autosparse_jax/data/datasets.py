"""``make_dataset``: the datasets the training system knows by name.

* ``digits``: scikit-learn's bundled 8x8 digits, (8, 8, 1), pixel / 16 in [0, 1]; a fixed
  split, the last 20% (359 images) is ``test``, the first 1438 ``train``. No download.
* ``mnist``: a local ``.npz`` or tfds, (28, 28, 1), pixel / 255 in [0, 1] (no mean/std).
* ``cifar10``: tfds, (32, 32, 3); training: 4-pixel zero pad, random 32x32 crop, horizontal
  flip; per-channel mean/std normalisation.
* ``imagenet2012``: tfds (manual download), (S, S, 3); training: random-resized crop to S
  (scale (0.08, 1), ratio (3/4, 4/3)) and horizontal flip; evaluation: shorter side resized to
  ``int(S / 0.875)`` and centre crop S; per-channel mean/std normalisation.

``S`` is ``image_size`` (default 224). Nothing is ever downloaded: a dataset that is not on disk
raises :class:`DatasetUnavailableError` saying how to put it there.

MNIST is looked for, in this order: ``data_dir`` naming an ``.npz`` file or a directory with
``mnist.npz`` in it; the file named by ``$AUTOSPARSE_MNIST_NPZ``; tfds ``mnist`` in ``data_dir``.
The npz holds uint8 ``x_train`` (60000, 784), ``y_train``, ``x_test``, ``y_test`` (the format
of ``keras.datasets.mnist`` flattened).

tfds datasets are read with ``tfds.data_source`` machinery (ArrayRecord files, random access; no
TensorFlow needed to read, though ``tfds build`` needs it to prepare). Prepare them once with
``tfds build NAME --data_dir=DIR --file_format=array_record``. ImageNet needs a manual
download first: put ``ILSVRC2012_img_train.tar`` and ``ILSVRC2012_img_val.tar`` (from
image-net.org) in ``DIR/downloads/manual/``, then run
``tfds build imagenet2012 --data_dir=DIR --file_format=array_record``. Its splits are ``train``
and ``validation``; CIFAR-10's and MNIST's ``train`` and ``test``. tfds split slices such as
``train[:90%]`` work for the tfds datasets.

CIFAR-10 (and MNIST from tfds) are decoded into memory once, when the dataset is made;
ImageNet is read and decoded example by example in a thread pool while iterating.
"""

from __future__ import annotations

import functools
import os

from autosparse_jax.data import sources, transforms
from autosparse_jax.data.pipeline import Dataset, Preprocessing
from autosparse_jax.data.sources import RecordSource

DATASET_NAMES = ("digits", "mnist", "cifar10", "imagenet2012")
"""Names :func:`make_dataset` accepts."""

IMAGENET_DEFAULT_IMAGE_SIZE = 224


def _check_native_size(name: str, image_size: int | None, native: int) -> None:
  if image_size is not None and image_size != native:
    raise ValueError(
      f"image_size for {name!r} must be None or {native} (its native size), got {image_size}."
    )


def _digits(split: str, image_size: int | None, data_dir: str | None, num_workers: int | None):
  del data_dir, num_workers
  _check_native_size("digits", image_size, 8)
  pre = Preprocessing(input_shape=(8, 8, 1), mean=(0.0,), std=(16.0,))
  return sources.load_digits(split), pre, 10


def _mnist(split: str, image_size: int | None, data_dir: str | None, num_workers: int | None):
  _check_native_size("mnist", image_size, 28)
  pre = Preprocessing(input_shape=(28, 28, 1), mean=(0.0,), std=(255.0,))
  npz = sources.find_mnist_npz(data_dir)
  if npz is not None:
    return sources.load_mnist_npz(npz, split), pre, 10
  try:
    data_source, info = sources.tfds_data_source("mnist", split, data_dir)
  except sources.DatasetUnavailableError as e:
    raise sources.DatasetUnavailableError(
      f"MNIST not found. Either point data_dir (or ${sources.MNIST_NPZ_ENV}) at an .npz with "
      "uint8 x_train (60000, 784), y_train, x_test, y_test, or prepare tfds mnist. " + str(e)
    ) from e
  source = sources.materialize(sources.TfdsSource(data_source), num_workers or 8)
  return source, pre, info.features["label"].num_classes


def _cifar10(split: str, image_size: int | None, data_dir: str | None, num_workers: int | None):
  _check_native_size("cifar10", image_size, 32)
  data_source, info = sources.tfds_data_source("cifar10", split, data_dir)
  source = sources.materialize(sources.TfdsSource(data_source), num_workers or 8)
  pre = Preprocessing(
    input_shape=(32, 32, 3),
    mean=tuple(255.0 * m for m in transforms.CIFAR10_MEAN),
    std=tuple(255.0 * s for s in transforms.CIFAR10_STD),
    train_transform=functools.partial(transforms.pad_crop_flip, padding=4),
  )
  return source, pre, info.features["label"].num_classes


def _imagenet2012(
  split: str, image_size: int | None, data_dir: str | None, num_workers: int | None
):
  """ImageNet-1k (ILSVRC2012) from a prepared tfds ``imagenet2012`` (splits train/validation).

  tfds cannot download ImageNet. To prepare it: download ``ILSVRC2012_img_train.tar`` and
  ``ILSVRC2012_img_val.tar`` from https://image-net.org, put them in
  ``<data_dir>/downloads/manual/``, and run, where TensorFlow is installed,
  ``tfds build imagenet2012 --data_dir=<data_dir> --file_format=array_record``. Reading the
  prepared ArrayRecord files needs neither TensorFlow nor the tars.
  """
  del num_workers
  size = IMAGENET_DEFAULT_IMAGE_SIZE if image_size is None else int(image_size)
  if size < 1:
    raise ValueError(f"image_size must be a positive integer, got {image_size}.")
  data_source, info = sources.tfds_data_source("imagenet2012", split, data_dir)
  pre = Preprocessing(
    input_shape=(size, size, 3),
    mean=tuple(255.0 * m for m in transforms.IMAGENET_MEAN),
    std=tuple(255.0 * s for s in transforms.IMAGENET_STD),
    train_transform=functools.partial(transforms.random_resized_crop_flip, image_size=size),
    eval_transform=functools.partial(transforms.resize_center_crop, image_size=size),
  )
  return sources.TfdsSource(data_source), pre, info.features["label"].num_classes


_LOADERS = {
  "digits": _digits,
  "mnist": _mnist,
  "cifar10": _cifar10,
  "imagenet2012": _imagenet2012,
}


def load_source(
  name: str,
  split: str,
  *,
  image_size: int | None = None,
  data_dir: str | os.PathLike | None = None,
  num_workers: int | None = None,
) -> tuple[RecordSource, Preprocessing, int]:
  """The records, preprocessing and number of classes of ``name``/``split``, unbatched."""
  if name not in _LOADERS:
    raise ValueError(f"name must be one of {DATASET_NAMES}, got {name!r}.")
  data_dir = None if data_dir is None else os.fspath(data_dir)
  return _LOADERS[name](split, image_size, data_dir, num_workers)


def make_dataset(
  name: str,
  split: str,
  *,
  global_batch_size: int,
  train: bool,
  seed: int = 0,
  image_size: int | None = None,
  data_dir: str | os.PathLike | None = None,
  process_index: int = 0,
  process_count: int = 1,
  num_workers: int | None = None,
  prefetch: int = 2,
) -> Dataset:
  """The batched input pipeline for ``name``/``split`` in this process.

  Args:
    name: one of ``DATASET_NAMES``.
    split: ``"train"``/``"test"`` (``"validation"`` for ImageNet); tfds slices allowed for
      the tfds datasets.
    global_batch_size: examples per step over all processes.
    train: True for the training stream (shuffled from ``(seed, epoch)``, augmented,
      infinite, remainder dropped); False for one ordered, padded evaluation pass with
      ``mask``.
    seed: non-negative integer fixing order and augmentation.
    image_size: ImageNet's crop size (default 224); for the others None or the native size.
    data_dir: tfds data directory, or for MNIST an ``.npz`` file or a directory holding
      ``mnist.npz``.
    process_index, process_count: this process's place in a multi-host job (pass
      ``jax.process_index()``, ``jax.process_count()``).
    num_workers: reader/transform threads (default: by dataset).
    prefetch: batches prepared ahead while iterating.

  Returns:
    A :class:`Dataset`; ``ds.iterate(start_step)`` yields this process's batches
    ``{'image': float32 (B, H, W, C), 'label': int32 (B,)}`` (+ ``'mask'`` when not training),
    ``B = global_batch_size // process_count``.

  Raises:
    ValueError: a bad argument.
    DatasetUnavailableError: the data is not on disk (nothing is downloaded).
  """
  source, pre, num_classes = load_source(
    name, split, image_size=image_size, data_dir=data_dir, num_workers=num_workers
  )
  return Dataset(
    source,
    pre,
    num_classes=num_classes,
    global_batch_size=global_batch_size,
    train=train,
    seed=seed,
    process_index=process_index,
    process_count=process_count,
    num_workers=num_workers,
    prefetch=prefetch,
    name=name,
    split=split,
  )

"""Deterministic, resumable, per-process batching of a record source.

Order. Training epoch ``e`` visits the records in the permutation drawn from ``(seed, e)``, in
consecutive global batches of ``global_batch_size``; the last ``num_examples %
global_batch_size`` records of the permutation are dropped, and iteration goes on forever,
epoch after epoch. Evaluation visits the records in order, once; the last global batch is
padded (zero images, label 0, ``mask`` 0) so that every record counts exactly once.

Global step ``s`` therefore names one global batch, whatever happened before: ``iterate(s)``
gives the same batches as an uninterrupted iteration from step 0 gives from step ``s`` on, and
random augmentation is drawn from ``(seed, epoch, record index)``, not from iteration state.

Processes. Process ``p`` of ``P`` gets rows ``[p * B, (p + 1) * B)`` of each global batch, with
``B = global_batch_size // P``; concatenating the processes' batches in process order gives
the global batch.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import os
from collections.abc import Callable, Iterator
from concurrent import futures

import numpy as np

from autosparse_jax.data import transforms
from autosparse_jax.data.sources import ArraySource, RecordSource

Batch = dict[str, np.ndarray]
"""``{'image': float32 (B, H, W, C), 'label': int32 (B,)}``, plus ``'mask'`` float32 (B,) in
evaluation batches (1 for a real example, 0 for padding)."""


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """How raw uint8 records become float32 model inputs.

  Attributes:
    input_shape: per-example (H, W, C) of the model input.
    mean: per-channel mean, in raw pixel units, subtracted after the transform.
    std: per-channel standard deviation, in raw pixel units, divided by after the transform.
    train_transform: ``(uint8 image, numpy Generator) -> uint8 image of input_shape``, random
      augmentation for training; None leaves training images as they are.
    eval_transform: ``uint8 image -> uint8 image of input_shape``, deterministic resizing and
      cropping for evaluation; None leaves evaluation images as they are.
  """

  input_shape: tuple[int, int, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  train_transform: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None
  eval_transform: Callable[[np.ndarray], np.ndarray] | None = None


class Dataset:
  """A split of a dataset, batched for one process of a (possibly multi-host) training job.

  Attributes:
    name, split: what it reads.
    train: training order and augmentation (infinite, shuffled, remainder dropped) or
      evaluation order (one pass in record order, padded, with ``mask``).
    num_examples: records in the split.
    num_classes: number of labels.
    input_shape: per-example (H, W, C) of ``batch['image']``.
    global_batch_size: examples per step over all processes.
    local_batch_size: examples per step in this process's batches.
    steps_per_epoch: training: ``num_examples // global_batch_size``; evaluation: the number
      of batches in the pass, ``ceil(num_examples / global_batch_size)``.
  """

  def __init__(
    self,
    source: RecordSource,
    preprocessing: Preprocessing,
    *,
    num_classes: int,
    global_batch_size: int,
    train: bool,
    seed: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    num_workers: int | None = None,
    prefetch: int = 2,
    name: str = "",
    split: str = "",
  ):
    """Batches ``source``.

    Args:
      source: the records.
      preprocessing: transforms and normalisation.
      num_classes: number of labels.
      global_batch_size: examples per step over all processes.
      train: training (True) or evaluation (False) iteration; see the class docstring.
      seed: non-negative integer; fixes the epoch orders and the augmentations.
      process_index: this process's index, in [0, process_count).
      process_count: number of processes; must divide ``global_batch_size``.
      num_workers: threads that read, transform and normalise examples while iterating;
        default: none when an :class:`ArraySource` is gathered without per-example
        transforms (one vectorised ``take``), else ``min(8, cpu count)``.
      prefetch: batches prepared ahead in a background thread while iterating; 0 for none.
      name, split: labels for ``repr``.
    """
    if process_count < 1:
      raise ValueError(f"process_count must be >= 1, got {process_count}.")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}.")
    if global_batch_size < 1 or global_batch_size % process_count:
      raise ValueError(
        f"global_batch_size must be a positive multiple of process_count={process_count}, "
        f"got {global_batch_size}."
      )
    if int(seed) < 0:
      raise ValueError(f"seed must be a non-negative integer, got {seed}.")
    if prefetch < 0:
      raise ValueError(f"prefetch must be >= 0, got {prefetch}.")
    self.source = source
    self.preprocessing = preprocessing
    self.name = name
    self.split = split
    self.train = bool(train)
    self.seed = int(seed)
    self.num_classes = int(num_classes)
    self.num_examples = len(source)
    self.global_batch_size = int(global_batch_size)
    self.process_index = int(process_index)
    self.process_count = int(process_count)
    self.local_batch_size = self.global_batch_size // self.process_count
    if self.num_examples == 0:
      raise ValueError(f"{name}/{split} has no examples.")
    if self.train:
      self.steps_per_epoch = self.num_examples // self.global_batch_size
      if self.steps_per_epoch == 0:
        raise ValueError(
          f"global_batch_size={global_batch_size} exceeds the {self.num_examples} examples of "
          f"{name}/{split}: a training epoch would have no full batch."
        )
    else:
      self.steps_per_epoch = math.ceil(self.num_examples / self.global_batch_size)
    self._transform = preprocessing.train_transform if self.train else preprocessing.eval_transform
    self._vectorised = self._transform is None and isinstance(source, ArraySource)
    if self._vectorised and tuple(source.images.shape[1:]) != tuple(preprocessing.input_shape):
      raise ValueError(
        f"{name}: the records have shape {source.images.shape[1:]} but input_shape is "
        f"{preprocessing.input_shape} and no transform resizes them."
      )
    if num_workers is None:
      num_workers = 0 if self._vectorised else min(8, os.cpu_count() or 1)
    self.num_workers = int(num_workers)
    self.prefetch = int(prefetch)
    self._mean = np.asarray(preprocessing.mean, np.float32)
    self._inv_std = 1.0 / np.asarray(preprocessing.std, np.float32)
    self._permutation_cache: tuple[int, np.ndarray] | None = None

  @property
  def input_shape(self) -> tuple[int, int, int]:
    """Per-example (H, W, C) of ``batch['image']``."""
    return tuple(self.preprocessing.input_shape)

  def __repr__(self) -> str:
    return (
      f"Dataset({self.name}/{self.split}, train={self.train}, num_examples={self.num_examples}, "
      f"input_shape={self.input_shape}, global_batch_size={self.global_batch_size}, "
      f"process={self.process_index}/{self.process_count}, "
      f"steps_per_epoch={self.steps_per_epoch})"
    )

  # -- which records ---------------------------------------------------------------------------

  def _permutation(self, epoch: int) -> np.ndarray:
    cached = self._permutation_cache
    if cached is not None and cached[0] == epoch:
      return cached[1]
    permutation = transforms.shuffle_rng(self.seed, epoch).permutation(self.num_examples)
    self._permutation_cache = (epoch, permutation)
    return permutation

  def global_indices(self, step: int) -> np.ndarray:
    """Record indices of global batch ``step`` (all processes); -1 marks evaluation padding."""
    step = int(step)
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}.")
    size = self.global_batch_size
    if self.train:
      epoch, position = divmod(step, self.steps_per_epoch)
      return self._permutation(epoch)[position * size : (position + 1) * size]
    if step >= self.steps_per_epoch:
      raise IndexError(f"evaluation has {self.steps_per_epoch} batches, asked for step {step}.")
    positions = np.arange(step * size, (step + 1) * size)
    return np.where(positions < self.num_examples, positions, -1)

  def local_indices(self, step: int) -> np.ndarray:
    """This process's slice of :meth:`global_indices`."""
    start = self.process_index * self.local_batch_size
    return self.global_indices(step)[start : start + self.local_batch_size]

  # -- building batches ------------------------------------------------------------------------

  def _normalise(self, images: np.ndarray, out: np.ndarray) -> None:
    np.subtract(images, self._mean, out=out, dtype=np.float32)
    out *= self._inv_std

  def _read_into(self, row: int, index: int, epoch: int, images: np.ndarray) -> int:
    """Reads, transforms and normalises record ``index`` into ``images[row]``; its label."""
    image, label = self.source[index]
    if self._transform is not None:
      if self.train:
        image = self._transform(image, transforms.example_rng(self.seed, epoch, index))
      else:
        image = self._transform(image)
    if image.shape != self.input_shape:
      raise ValueError(
        f"{self.name}: record {index} has shape {image.shape} after preprocessing, expected "
        f"{self.input_shape}; is a resize/crop transform missing?"
      )
    self._normalise(image, images[row])
    return label

  def _batch(self, step: int, pool: futures.Executor | None) -> Batch:
    indices = self.local_indices(step)
    # Padding (-1) only ever follows the real records, so they fill rows [0, count).
    count = int(np.count_nonzero(indices >= 0))
    indices = indices[:count]
    epoch = step // self.steps_per_epoch if self.train else 0
    size = self.local_batch_size
    images = np.empty((size, *self.input_shape), np.float32)
    images[count:] = 0.0
    labels = np.zeros((size,), np.int32)
    if self._vectorised:
      raw_images, raw_labels = self.source.take(indices)
      self._normalise(raw_images, images[:count])
      labels[:count] = raw_labels
    else:
      args = (range(count), indices, itertools.repeat(epoch), itertools.repeat(images))
      mapper = map if pool is None else pool.map
      labels[:count] = list(mapper(self._read_into, *args))
    batch = {"image": images, "label": labels}
    if not self.train:
      batch["mask"] = (np.arange(size) < count).astype(np.float32)
    return batch

  def batch(self, step: int) -> Batch:
    """This process's batch at global step ``step`` (random access, single-threaded)."""
    return self._batch(step, None)

  # -- iteration -------------------------------------------------------------------------------

  def iterate(self, start_step: int = 0) -> Iterator[Batch]:
    """Yields this process's batches from global step ``start_step`` on.

    Training: forever. Evaluation: until the pass ends (``steps_per_epoch`` batches in all).
    Batches are prepared ``prefetch`` steps ahead in a background thread; closing the
    iterator (or leaving a ``for`` loop) stops that thread.
    """
    if start_step < 0:
      raise ValueError(f"start_step must be >= 0, got {start_step}.")
    return self._iterate(int(start_step))

  def _iterate(self, start_step: int) -> Iterator[Batch]:
    steps = itertools.count(start_step) if self.train else range(start_step, self.steps_per_epoch)
    parallel = self.num_workers > 1 and not self._vectorised
    pool = futures.ThreadPoolExecutor(self.num_workers) if parallel else None
    producer = futures.ThreadPoolExecutor(1) if self.prefetch else None
    pending: collections.deque[futures.Future[Batch]] = collections.deque()
    try:
      for step in steps:
        if producer is None:
          yield self._batch(step, pool)
          continue
        pending.append(producer.submit(self._batch, step, pool))
        if len(pending) > self.prefetch:
          yield pending.popleft().result()
      while pending:
        yield pending.popleft().result()
    finally:
      for future in pending:
        future.cancel()
      if producer is not None:
        producer.shutdown(wait=True)
      if pool is not None:
        pool.shutdown(wait=True)

  def __iter__(self) -> Iterator[Batch]:
    return self.iterate(0)

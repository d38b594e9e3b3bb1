"""Tests of autosparse_jax.data: determinism, resumption, sharding, padding, sources, transforms.

Nothing here downloads: the tfds datasets run under ``tfds.testing.mock_data``, MNIST from the
shared reference npz (skipped when absent) or a synthetic npz, and the missing-data checks run
under an alarm so that a download attempt fails the test instead of hanging it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path

import numpy as np
import pytest

from autosparse_jax import data
from autosparse_jax.data import sources, transforms


def _shared_data_dir() -> Path:
  env = os.environ.get("AUTOSPARSE_SHARED_DATA")
  return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


SHARED_MNIST = _shared_data_dir() / "mnist.npz"


def _take(iterator, n):
  out = [next(iterator) for _ in range(n)]
  iterator.close()
  return out


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b, strict=True):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def _concat(batches):
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


@contextlib.contextmanager
def _deadline(seconds: int):
  """Fails (instead of hanging) when the body runs longer than ``seconds``."""

  def on_alarm(signum, frame):
    raise TimeoutError(f"took longer than {seconds}s: a download attempt?")

  previous = signal.signal(signal.SIGALRM, on_alarm)
  signal.alarm(seconds)
  try:
    yield
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def tfds_mock():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=24):
    yield


# ---------------------------------------------------------------------------------------------
# digits: the pipeline's contract


def test_digits_shapes_dtypes_range():
  ds = data.make_dataset("digits", "train", global_batch_size=64, train=True, seed=0)
  assert (ds.num_examples, ds.num_classes, ds.input_shape) == (1438, 10, (8, 8, 1))
  assert ds.steps_per_epoch == 1438 // 64 and ds.local_batch_size == 64
  batch = ds.batch(0)
  assert set(batch) == {"image", "label"}
  assert batch["image"].shape == (64, 8, 8, 1) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (64,) and batch["label"].dtype == np.int32
  assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  assert batch["image"].max() == 1.0
  assert set(np.unique(batch["label"])) <= set(range(10))
  test = data.make_dataset("digits", "test", global_batch_size=64, train=False)
  assert test.num_examples == 359 and test.steps_per_epoch == 6


def test_digits_split_is_fixed_and_disjoint():
  from sklearn.datasets import load_digits

  x, y = load_digits(return_X_y=True)
  train = sources.load_digits("train")
  test = sources.load_digits("test")
  np.testing.assert_array_equal(np.concatenate([train.images, test.images]).reshape(-1, 64), x)
  np.testing.assert_array_equal(np.concatenate([train.labels, test.labels]), y)


def test_training_order_is_deterministic_and_seeded():
  def first(seed, n=5):
    ds = data.make_dataset("digits", "train", global_batch_size=32, train=True, seed=seed)
    return _take(ds.iterate(), n)

  _assert_batches_equal(first(3), first(3))
  a, b = first(3), first(4)
  assert not np.array_equal(a[0]["label"], b[0]["label"])


def test_each_epoch_is_a_fresh_permutation():
  ds = data.make_dataset("digits", "train", global_batch_size=100, train=True, seed=0)
  spe = ds.steps_per_epoch
  epoch0 = np.concatenate([ds.global_indices(s) for s in range(spe)])
  epoch1 = np.concatenate([ds.global_indices(s) for s in range(spe, 2 * spe)])
  assert len(np.unique(epoch0)) == len(epoch0) == spe * 100
  assert len(np.unique(epoch1)) == len(epoch1)
  assert not np.array_equal(epoch0, epoch1)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_resume_matches_uninterrupted_iteration_across_epochs(prefetch):
  ds = data.make_dataset(
    "digits", "train", global_batch_size=128, train=True, seed=7, prefetch=prefetch
  )
  spe = ds.steps_per_epoch  # 11
  fresh = _take(ds.iterate(), 2 * spe + 3)
  start = spe - 2  # crosses the first epoch boundary
  resumed = _take(ds.iterate(start_step=start), spe + 5)
  _assert_batches_equal(resumed, fresh[start : start + spe + 5])
  _assert_batches_equal([ds.batch(spe + 1)], [fresh[spe + 1]])
  # A second dataset object (a restarted job) gives the same batches.
  again = data.make_dataset("digits", "train", global_batch_size=128, train=True, seed=7)
  _assert_batches_equal(_take(again.iterate(start_step=2 * spe), 3), fresh[2 * spe :])


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_covers_every_example_once_with_padding_mask(process_count):
  source = sources.load_digits("test")
  per_process = []
  for p in range(process_count):
    ds = data.make_dataset(
      "digits",
      "test",
      global_batch_size=64,
      train=False,
      process_index=p,
      process_count=process_count,
    )
    per_process.append(list(ds.iterate()))
  assert all(len(batches) == 6 for batches in per_process)
  # Global batch b = process batches concatenated in process order.
  steps = [_concat([per_process[p][b] for p in range(process_count)]) for b in range(6)]
  everything = _concat(steps)
  mask = everything["mask"]
  assert mask.dtype == np.float32 and set(np.unique(mask)) == {0.0, 1.0}
  assert mask.sum() == 359 and mask.shape == (6 * 64,)
  real = mask == 1
  np.testing.assert_allclose(everything["image"][real], source.images / 16.0)
  np.testing.assert_array_equal(everything["label"][real], source.labels)
  assert not everything["image"][~real].any() and not everything["label"][~real].any()


def test_eval_resume_and_end():
  ds = data.make_dataset("digits", "test", global_batch_size=100, train=False)
  full = list(ds.iterate())
  assert len(full) == ds.steps_per_epoch == 4
  _assert_batches_equal(list(ds.iterate(start_step=2)), full[2:])
  assert list(ds.iterate(start_step=4)) == []


@pytest.mark.parametrize("train", [True, False])
def test_process_shards_concatenate_to_the_global_batch(train):
  split = "train" if train else "test"
  kwargs = dict(global_batch_size=96, train=train, seed=5)
  whole = data.make_dataset("digits", split, **kwargs)
  parts = [
    data.make_dataset("digits", split, process_index=p, process_count=2, **kwargs) for p in range(2)
  ]
  assert parts[0].local_batch_size == 48
  assert parts[0].steps_per_epoch == whole.steps_per_epoch
  for step in (0, 1, whole.steps_per_epoch - 1):
    _assert_batches_equal([_concat([p.batch(step) for p in parts])], [whole.batch(step)])


def test_iterator_close_stops_its_threads():
  before = threading.active_count()
  ds = data.make_dataset("digits", "train", global_batch_size=16, train=True, num_workers=2)
  it = ds.iterate()
  next(it)
  assert threading.active_count() > before
  it.close()
  assert threading.active_count() == before


def test_bad_arguments():
  def make(**overrides):
    kwargs = dict(global_batch_size=32, train=True)
    kwargs.update(overrides)
    return data.make_dataset("digits", "train", **kwargs)

  with pytest.raises(ValueError, match="name"):
    data.make_dataset("svhn", "train", global_batch_size=8, train=True)
  with pytest.raises(ValueError, match="split"):
    data.make_dataset("digits", "validation", global_batch_size=8, train=True)
  with pytest.raises(ValueError, match="process_count"):
    make(global_batch_size=33, process_count=2)
  with pytest.raises(ValueError, match="process_index"):
    make(process_index=2, process_count=2)
  with pytest.raises(ValueError, match="global_batch_size"):
    make(global_batch_size=5000)
  with pytest.raises(ValueError, match="seed"):
    make(seed=-1)
  with pytest.raises(ValueError, match="image_size"):
    make(image_size=16)
  with pytest.raises(ValueError, match="start_step"):
    make().iterate(start_step=-1)


# ---------------------------------------------------------------------------------------------
# MNIST from npz


@pytest.mark.skipif(
  not SHARED_MNIST.is_file(),
  reason=f"reference data {SHARED_MNIST} absent (set AUTOSPARSE_SHARED_DATA to its folder)",
)
def test_mnist_from_shared_npz():
  ds = data.make_dataset(
    "mnist", "train", global_batch_size=128, train=True, seed=0, data_dir=SHARED_MNIST
  )
  assert (ds.num_examples, ds.num_classes, ds.input_shape) == (60000, 10, (28, 28, 1))
  batch = ds.batch(3)
  assert batch["image"].shape == (128, 28, 28, 1) and batch["image"].dtype == np.float32
  assert batch["image"].min() == 0.0 and batch["image"].max() == 1.0
  with np.load(SHARED_MNIST) as raw:
    idx = ds.global_indices(3)
    np.testing.assert_allclose(
      batch["image"].reshape(128, 784), raw["x_train"][idx].astype(np.float32) / 255.0
    )
    np.testing.assert_array_equal(batch["label"], raw["y_train"][idx])
  test = data.make_dataset(
    "mnist", "test", global_batch_size=1000, train=False, data_dir=SHARED_MNIST.parent
  )
  assert test.num_examples == 10000 and test.steps_per_epoch == 10


@pytest.fixture
def synthetic_mnist(tmp_path):
  rng = np.random.default_rng(0)
  path = tmp_path / "mnist.npz"
  np.savez(
    path,
    x_train=rng.integers(0, 256, (50, 784), dtype=np.uint8),
    y_train=rng.integers(0, 10, 50, dtype=np.uint8),
    x_test=rng.integers(0, 256, (11, 784), dtype=np.uint8),
    y_test=rng.integers(0, 10, 11, dtype=np.uint8),
  )
  return path


def test_mnist_synthetic_npz_by_file_dir_and_env(synthetic_mnist, monkeypatch):
  monkeypatch.delenv(sources.MNIST_NPZ_ENV, raising=False)
  by_file = data.make_dataset(
    "mnist", "test", global_batch_size=4, train=False, data_dir=synthetic_mnist
  )
  by_dir = data.make_dataset(
    "mnist", "test", global_batch_size=4, train=False, data_dir=synthetic_mnist.parent
  )
  monkeypatch.setenv(sources.MNIST_NPZ_ENV, str(synthetic_mnist))
  by_env = data.make_dataset("mnist", "test", global_batch_size=4, train=False)
  _assert_batches_equal(list(by_file.iterate()), list(by_dir.iterate()))
  _assert_batches_equal(list(by_file.iterate()), list(by_env.iterate()))
  batches = list(by_file.iterate())
  assert len(batches) == 3 and sum(b["mask"].sum() for b in batches) == 11
  with np.load(synthetic_mnist) as raw:
    np.testing.assert_allclose(
      batches[0]["image"].reshape(4, 784), raw["x_test"][:4] / np.float32(255.0)
    )
  train = data.make_dataset(
    "mnist", "train", global_batch_size=8, train=True, data_dir=synthetic_mnist
  )
  assert train.steps_per_epoch == 6 and train.batch(0)["image"].shape == (8, 28, 28, 1)


def test_mnist_npz_errors(tmp_path, monkeypatch):
  monkeypatch.setenv(sources.MNIST_NPZ_ENV, str(tmp_path / "nowhere.npz"))
  with pytest.raises(data.DatasetUnavailableError, match="AUTOSPARSE_MNIST_NPZ"):
    data.make_dataset("mnist", "train", global_batch_size=8, train=True)
  with pytest.raises(data.DatasetUnavailableError, match="does not exist"):
    data.make_dataset(
      "mnist", "train", global_batch_size=8, train=True, data_dir=tmp_path / "x.npz"
    )
  bad = tmp_path / "bad.npz"
  np.savez(bad, x_train=np.zeros((2, 784), np.float32), y_train=np.zeros(2))
  with pytest.raises(ValueError, match="uint8"):
    data.make_dataset("mnist", "train", global_batch_size=1, train=True, data_dir=bad)
  with pytest.raises(ValueError, match="x_test"):
    data.make_dataset("mnist", "test", global_batch_size=1, train=False, data_dir=bad)


# ---------------------------------------------------------------------------------------------
# tfds datasets (mocked) and their transforms


def test_cifar10_mocked(tfds_mock):
  train = data.make_dataset("cifar10", "train", global_batch_size=8, train=True, seed=1)
  assert (train.num_examples, train.num_classes, train.input_shape) == (24, 10, (32, 32, 3))
  batch = train.batch(0)
  assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
  assert batch["label"].dtype == np.int32
  # Deterministic per (seed, epoch, index), whatever the threads or the process layout.
  again = data.make_dataset(
    "cifar10", "train", global_batch_size=8, train=True, seed=1, num_workers=1
  )
  _assert_batches_equal([again.batch(0)], [batch])
  halves = [
    data.make_dataset(
      "cifar10", "train", global_batch_size=8, train=True, seed=1, process_index=p, process_count=2
    )
    for p in range(2)
  ]
  _assert_batches_equal([_concat([h.batch(4) for h in halves])], [train.batch(4)])
  _assert_batches_equal(_take(train.iterate(start_step=4), 1), [train.batch(4)])
  # Evaluation: no augmentation, per-channel mean/std normalisation of the raw records.
  source, _, _ = data.load_source("cifar10", "test")
  test = data.make_dataset("cifar10", "test", global_batch_size=10, train=False)
  batches = list(test.iterate())
  assert len(batches) == 3 and sum(b["mask"].sum() for b in batches) == 24
  mean = 255 * np.array(transforms.CIFAR10_MEAN, np.float32)
  std = 255 * np.array(transforms.CIFAR10_STD, np.float32)
  np.testing.assert_allclose(batches[0]["image"], (source.images[:10] - mean) / std, rtol=1e-5)


def test_pad_crop_flip():
  image = np.arange(32 * 32 * 3, dtype=np.int64).reshape(32, 32, 3).astype(np.uint8)
  out = transforms.pad_crop_flip(image, transforms.example_rng(0, 0, 5))
  assert out.shape == image.shape and out.dtype == np.uint8
  np.testing.assert_array_equal(
    out, transforms.pad_crop_flip(image, transforms.example_rng(0, 0, 5))
  )
  # The output is a window of the zero-padded (possibly flipped) image.
  padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
  windows = [
    w
    for top in range(9)
    for left in range(9)
    for w in (padded[top : top + 32, left : left + 32],)
    for w in (w, w[:, ::-1])
  ]
  assert any(np.array_equal(out, w) for w in windows)
  outs = {
    transforms.pad_crop_flip(image, transforms.example_rng(0, e, 5)).tobytes() for e in range(8)
  }
  assert len(outs) > 1


def test_imagenet_mocked(tfds_mock):
  kwargs = dict(global_batch_size=8, train=True, seed=2, image_size=40)
  train = data.make_dataset("imagenet2012", "train", **kwargs)
  assert train.num_classes == 1000 and train.input_shape == (40, 40, 3)
  batch = train.batch(1)
  assert batch["image"].shape == (8, 40, 40, 3) and batch["image"].dtype == np.float32
  assert batch["label"].dtype == np.int32 and batch["label"].max() < 1000
  serial = data.make_dataset("imagenet2012", "train", num_workers=0, prefetch=0, **kwargs)
  _assert_batches_equal(_take(serial.iterate(start_step=1), 1), [batch])
  halves = [
    data.make_dataset("imagenet2012", "train", process_index=p, process_count=2, **kwargs)
    for p in range(2)
  ]
  _assert_batches_equal([_concat([h.batch(1) for h in halves])], [batch])
  # Next epoch, same records, new augmentation.
  later = train.batch(1 + train.steps_per_epoch)
  assert not np.array_equal(later["image"], batch["image"])
  evaluation = data.make_dataset(
    "imagenet2012", "validation", global_batch_size=10, train=False, image_size=40
  )
  batches = list(evaluation.iterate())
  assert [b["image"].shape for b in batches] == [(10, 40, 40, 3)] * 3
  assert sum(b["mask"].sum() for b in batches) == 24
  assert data.make_dataset(
    "imagenet2012", "validation", global_batch_size=4, train=False
  ).input_shape == (
    224,
    224,
    3,
  )


def test_random_resized_crop_box_bounds():
  for index in range(200):
    rng = transforms.example_rng(0, 0, index)
    height, width = rng.integers(20, 400, size=2)
    top, left, h, w = transforms.random_resized_crop_box(int(height), int(width), rng)
    assert 0 <= top and top + h <= height and 0 <= left and left + w <= width and h > 0 and w > 0
  # Too elongated for any sample: the centred fall-back crop with the extreme ratio.
  top, left, h, w = transforms.random_resized_crop_box(
    10, 1000, np.random.default_rng(0), scale=(0.9, 1.0)
  )
  assert (h, w) == (10, round(10 * 4 / 3)) and left == (1000 - w) // 2


def test_random_resized_crop_flip_is_deterministic():
  image = np.random.default_rng(0).integers(0, 256, (120, 90, 3), dtype=np.uint8)
  out = transforms.random_resized_crop_flip(image, transforms.example_rng(1, 2, 3), image_size=64)
  assert out.shape == (64, 64, 3) and out.dtype == np.uint8
  same = transforms.random_resized_crop_flip(image, transforms.example_rng(1, 2, 3), image_size=64)
  np.testing.assert_array_equal(out, same)
  other = transforms.random_resized_crop_flip(image, transforms.example_rng(1, 3, 3), image_size=64)
  assert not np.array_equal(out, other)
  gray = transforms.random_resized_crop_flip(
    image[:, :, :1], transforms.example_rng(0, 0, 0), image_size=8
  )
  assert gray.shape == (8, 8, 3)


def test_resize_center_crop():
  # A horizontal ramp: the centre crop of the resized image keeps the middle columns.
  ramp = np.tile(np.linspace(0, 255, 400).astype(np.uint8)[None, :, None], (300, 1, 3))
  out = transforms.resize_center_crop(ramp, image_size=224)
  assert out.shape == (224, 224, 3)
  # 300x400 -> 256x341, crop columns 58..282 of 341: the ramp's middle.
  assert abs(int(out[:, 112].mean()) - 128) <= 3
  assert out[0, 0, 0] > 40 and out[0, -1, 0] < 215
  tall = transforms.resize_center_crop(np.zeros((500, 60, 1), np.uint8), image_size=32)
  assert tall.shape == (32, 32, 3)


# ---------------------------------------------------------------------------------------------
# missing data: a clear error, quickly, and no download


@pytest.mark.parametrize(
  "name, words",
  [
    ("cifar10", ["not prepared", "tfds build cifar10", "array_record"]),
    ("imagenet2012", ["downloads/manual", "ILSVRC2012_img_train.tar", "tfds build imagenet2012"]),
    ("mnist", ["AUTOSPARSE_MNIST_NPZ", "tfds build mnist"]),
  ],
)
def test_missing_dataset_raises_clear_error_without_download(name, words, tmp_path, monkeypatch):
  pytest.importorskip("tensorflow_datasets")
  monkeypatch.delenv(sources.MNIST_NPZ_ENV, raising=False)
  with _deadline(30), pytest.raises(data.DatasetUnavailableError) as info:
    data.make_dataset(name, "train", global_batch_size=8, train=True, data_dir=tmp_path)
  for word in words:
    assert word in str(info.value)
  assert not any(tmp_path.iterdir()), "nothing may be written (no download started)"

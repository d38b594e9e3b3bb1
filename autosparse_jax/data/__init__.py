"""Input pipelines for the training system: deterministic, resumable, per-process batches.

Example::

  from autosparse_jax import data

  train_ds = data.make_dataset(
    "cifar10", "train", global_batch_size=256, train=True, seed=0,
    process_index=jax.process_index(), process_count=jax.process_count())
  for batch in train_ds.iterate(start_step=restored_step):   # infinite
    ...  # batch["image"] float32 (B, 32, 32, 3), batch["label"] int32 (B,)

  eval_ds = data.make_dataset("cifar10", "test", global_batch_size=1000, train=False)
  for batch in eval_ds.iterate():   # one pass; batch["mask"] is 0 on padding rows
    ...

This package imports only numpy; scikit-learn, tensorflow-datasets and PIL load when a dataset
that needs them is made.
"""

from autosparse_jax.data.datasets import DATASET_NAMES, load_source, make_dataset
from autosparse_jax.data.pipeline import Batch, Dataset, Preprocessing
from autosparse_jax.data.sources import (
  ArraySource,
  DatasetUnavailableError,
  RecordSource,
  TfdsSource,
)

__all__ = [
  "DATASET_NAMES",
  "ArraySource",
  "Batch",
  "Dataset",
  "DatasetUnavailableError",
  "Preprocessing",
  "RecordSource",
  "TfdsSource",
  "load_source",
  "make_dataset",
]

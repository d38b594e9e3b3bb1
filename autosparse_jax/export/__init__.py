"""Sparse export and sparse inference: a trained model's params as a portable sparse file, and
the model run from it.

``import autosparse_jax`` does not load this package (it needs flax and scipy).

* :func:`encode` / :func:`save` / :func:`load` (:mod:`.format`): the variables tree with every
  sufficiently sparse kernel as the CSR of its matrix view ``W^T`` (int32 indices, data in
  the params' dtype) and everything else dense; loads back bit for bit.
* :class:`SparseModel` (:mod:`.jax_sparse`): the Flax model in JAX with its sparse
  ``nn.Dense`` layers as ``jax.experimental.sparse.BCSR`` products, per-layer by a
  :class:`Policy` (size, sparsity, batch); convolutions and other layers stay dense.
* :class:`HostModel` (:mod:`.host`): the same with scipy CSR on the CPU, for batch 1.
* ``python -m autosparse_jax.export --workdir=... --out=...`` (:mod:`.__main__`): export the
  latest checkpoint of a training workdir.

Example::

  exported = export.load("model.npz")
  model, exported = export.load_model("model.npz")      # the registry model the file names
  fast = export.SparseModel(model, exported, batch_size=256)
  logits = fast(images)                                  # == model.apply(variables, images)
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax.numpy as jnp

from autosparse_jax.export.format import FORMAT, VERSION, SparseFile, encode, load, read_meta, save
from autosparse_jax.export.host import SCIPY_POLICY, HostModel
from autosparse_jax.export.jax_sparse import BCSR_POLICY, SparseModel
from autosparse_jax.export.plan import Decision, Policy


def load_model(path: str | os.PathLike) -> tuple[nn.Module, SparseFile]:
  """The registry model the file at ``path`` names (``autosparse_jax.models``) and the file.

  Raises:
    ValueError: the file is not an export of this format and version, or names no registry
      model (then build the model yourself and use :func:`load`).
  """
  from autosparse_jax.models import get_model

  exported = load(path)
  info = exported.model or {}
  if not info.get("name") or "num_classes" not in info:
    raise ValueError(f"{path} names no registry model: build the model and use export.load")
  kwargs = dict(info.get("kwargs") or {})
  if info.get("half_precision"):
    kwargs.setdefault("dtype", jnp.bfloat16)
  return get_model(info["name"], info["num_classes"], **kwargs), exported


__all__ = [
  "BCSR_POLICY",
  "FORMAT",
  "SCIPY_POLICY",
  "VERSION",
  "Decision",
  "HostModel",
  "Policy",
  "SparseFile",
  "SparseModel",
  "encode",
  "load",
  "load_model",
  "read_meta",
  "save",
]

"""The sparse export file: layout, metadata, format version; encode a variables tree and back.

A file is an uncompressed ``.npz`` (a zip of ``.npy`` arrays; ``numpy.load`` reads it) with

* ``meta``: UTF-8 JSON (as uint8): ``format`` (:data:`FORMAT`), ``version``
  (:data:`VERSION`), ``model`` (what the params belong to: ``class``, registry ``name``,
  ``num_classes``, ``kwargs``, ``input_shape``; or null) and ``leaves``, one entry per leaf of
  the variables tree in order: ``path`` (keys from the root), ``shape``, ``dtype``, ``storage``
  (``dense``, ``csr`` or ``empty`` for an empty mapping), ``nnz`` and ``note``;
* leaf ``i`` stored dense: array ``"i"``; stored as CSR (see :mod:`.csr`): ``"i.data"``,
  ``"i.indices"``, ``"i.indptr"`` and, when the kernel has negative zeros,
  ``"i.negative_zeros"``.

Every array is stored as the unsigned integers of its bits (``bfloat16`` as ``uint16``, ...)
and viewed back as ``dtype``, so a file loads back to exactly the same bits.

A kernel (``ndim >= 2``, floating) is stored as CSR exactly when that takes fewer bytes than
dense: ``nnz * (itemsize + 4) + 4 * (out + 1) < size * itemsize``, i.e. above about 50%
sparsity for float32; otherwise it stays dense with a note saying so.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from autosparse_jax.export import csr as csr_lib
from autosparse_jax.export import tree as tree_lib

FORMAT = "autosparse_jax.sparse_export"
VERSION = 1

_BITS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _is_float(dtype: np.dtype) -> bool:
  """float16/32/64 and the ml_dtypes floats (bfloat16, ...), which numpy files under void."""
  import jax.numpy as jnp

  return bool(jnp.issubdtype(dtype, jnp.floating))


class Leaf(NamedTuple):
  """One leaf of the exported tree: ``value`` is the dense array, a :class:`.csr.CSR` of its
  matrix view, or None for an empty mapping."""

  path: tree_lib.Path
  shape: tuple[int, ...]
  dtype: np.dtype
  storage: str  # "dense" | "csr" | "empty"
  nnz: int
  note: str
  value: Any

  @property
  def size(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))

  @property
  def sparsity(self) -> float:
    return 1.0 - self.nnz / self.size if self.size else 0.0

  @property
  def nbytes(self) -> int:
    if self.storage == "csr":
      return self.value.nbytes
    return 0 if self.value is None else int(self.value.nbytes)

  def dense(self) -> np.ndarray:
    """The leaf as a dense array (bit-exact)."""
    if self.storage == "csr":
      return csr_lib.to_kernel(self.value, self.shape)
    return self.value


class SparseFile(NamedTuple):
  """An exported variables tree: the model it belongs to and its leaves."""

  model: dict[str, Any] | None
  leaves: list[Leaf]

  def variables(self) -> dict[str, Any]:
    """The variables tree, bit for bit as exported (numpy arrays, nested dicts)."""
    return tree_lib.unflatten(
      [
        (leaf.path, tree_lib.EMPTY if leaf.storage == "empty" else leaf.dense())
        for leaf in self.leaves
      ]
    )

  def leaf(self, path: tree_lib.Path) -> Leaf:
    for leaf in self.leaves:
      if leaf.path == tuple(path):
        return leaf
    raise KeyError(tree_lib.path_string(path))

  def nbytes(self) -> int:
    """Bytes of the arrays as stored (CSR parts or dense)."""
    return sum(leaf.nbytes for leaf in self.leaves)

  def dense_nbytes(self) -> int:
    """Bytes of the same tree stored dense."""
    return sum(leaf.size * leaf.dtype.itemsize for leaf in self.leaves if leaf.storage != "empty")


def _encode_leaf(path: tree_lib.Path, value: Any) -> Leaf:
  if isinstance(value, str) and value == tree_lib.EMPTY:
    return Leaf(path, (), np.dtype(np.float32), "empty", 0, "", None)
  array = tree_lib.as_numpy(value)
  shape, dtype = tuple(int(d) for d in array.shape), array.dtype
  if dtype.itemsize not in _BITS:
    raise TypeError(f"{tree_lib.path_string(path)}: dtype {dtype} is not supported")
  nnz = int(np.count_nonzero(array))
  dense = Leaf(path, shape, dtype, "dense", nnz, "", np.array(array, copy=True))
  if array.ndim < 2 or not _is_float(dtype) or array.size == 0:
    return dense
  sparsity = 1.0 - nnz / array.size
  if csr_lib.csr_nbytes(shape, dtype.itemsize, nnz) >= array.nbytes:
    note = f"kept dense: {sparsity:.1%} sparse, CSR would not be smaller"
    return dense._replace(note=note)
  matrix = csr_lib.from_kernel(array)
  if matrix.nbytes >= array.nbytes:
    note = f"kept dense: {sparsity:.1%} sparse, CSR with its negative zeros would not be smaller"
    return dense._replace(note=note)
  return Leaf(path, shape, dtype, "csr", nnz, "", matrix)


def encode(variables: Mapping[str, Any], model: dict[str, Any] | None = None) -> SparseFile:
  """The export of a variables tree (``{'params': ..., 'batch_stats': ...}`` or just params).

  ``model``: JSON-able identity of the model the tree belongs to (see the module docstring).
  """
  leaves = [_encode_leaf(path, value) for path, value in tree_lib.flatten(variables)]
  return SparseFile(model=None if model is None else json.loads(json.dumps(model)), leaves=leaves)


def _bits(array: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(array).view(_BITS[array.dtype.itemsize])


def save(path: str | os.PathLike, exported: SparseFile, *, overwrite: bool = False) -> int:
  """Writes ``exported`` to ``path`` (atomically: a temporary file renamed); returns its size.

  Raises:
    FileExistsError: ``path`` exists and not ``overwrite``.
  """
  path = Path(path)
  if path.exists() and not overwrite:
    raise FileExistsError(f"{path} exists; not overwriting it")
  arrays: dict[str, np.ndarray] = {}
  entries = []
  for i, leaf in enumerate(exported.leaves):
    entries.append(
      {
        "path": list(leaf.path),
        "shape": list(leaf.shape),
        "dtype": leaf.dtype.name,
        "storage": leaf.storage,
        "nnz": leaf.nnz,
        "note": leaf.note,
      }
    )
    if leaf.storage == "dense":
      arrays[str(i)] = _bits(leaf.value)
    elif leaf.storage == "csr":
      arrays[f"{i}.data"] = _bits(leaf.value.data)
      arrays[f"{i}.indices"] = leaf.value.indices
      arrays[f"{i}.indptr"] = leaf.value.indptr
      if leaf.value.negative_zeros is not None:
        arrays[f"{i}.negative_zeros"] = leaf.value.negative_zeros
  meta = {"format": FORMAT, "version": VERSION, "model": exported.model, "leaves": entries}
  arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  try:
    with open(tmp, "wb") as f:
      np.savez(f, **arrays)
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)
  return path.stat().st_size


def _dtype(name: str) -> np.dtype:
  try:
    return np.dtype(name)
  except TypeError:
    import ml_dtypes  # bfloat16, float8_*: numpy knows them once ml_dtypes is imported

    return np.dtype(getattr(ml_dtypes, name))


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
  """The checked metadata of the file at ``path``.

  Raises:
    ValueError: not an export of this format, or of another version.
  """
  meta, _ = _open(path)
  return meta


def _open(path: str | os.PathLike) -> tuple[dict[str, Any], Any]:
  path = Path(path)
  try:
    raw = path.read_bytes()
    files = np.load(io.BytesIO(raw), allow_pickle=False)
    meta = json.loads(bytes(files["meta"]).decode())
  except (OSError, zipfile.BadZipFile, KeyError, ValueError, UnicodeDecodeError) as e:
    if isinstance(e, FileNotFoundError):
      raise
    raise ValueError(
      f"{path} is not an autosparse_jax sparse export ({FORMAT} .npz): {e}"
    ) from None
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise ValueError(f"{path} is not an autosparse_jax sparse export (format {FORMAT!r})")
  if meta.get("version") != VERSION:
    raise ValueError(
      f"{path} is a sparse export of format version {meta.get('version')!r}; this "
      f"autosparse_jax reads version {VERSION}"
    )
  return meta, files


def load(path: str | os.PathLike) -> SparseFile:
  """The :class:`SparseFile` at ``path`` (see :func:`read_meta` for the errors)."""
  meta, files = _open(path)
  leaves = []
  for i, entry in enumerate(meta["leaves"]):
    path_, shape = tuple(entry["path"]), tuple(entry["shape"])
    dtype, storage = _dtype(entry["dtype"]), entry["storage"]
    if storage == "dense":
      value = files[str(i)].view(dtype).reshape(shape)
    elif storage == "csr":
      negative = f"{i}.negative_zeros"
      value = csr_lib.CSR(
        data=files[f"{i}.data"].view(dtype),
        indices=files[f"{i}.indices"],
        indptr=files[f"{i}.indptr"],
        shape=csr_lib.matrix_shape(shape),
        negative_zeros=files[negative] if negative in files.files else None,
      )
    else:
      value = None
    leaves.append(Leaf(path_, shape, dtype, storage, entry["nnz"], entry["note"], value))
  return SparseFile(model=meta["model"], leaves=leaves)

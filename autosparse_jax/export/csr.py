"""The CSR form of a kernel's matrix view, and back, bit for bit.

The matrix view of a kernel of shape ``(*fan_in_dims, out)`` (a Dense kernel ``(in, out)``, a
conv kernel ``(h, w, in, out)``) is ``M = W.reshape(fan_in, out).T``, shape ``(out, fan_in)``:
one row per output unit. ``y = x @ W`` is then ``y^T = M @ x^T``, the product with the sparse
matrix on the left, which is the form ``jax.experimental.sparse.BCSR`` and ``scipy.sparse``
multiply fastest.

CSR stores the entries of ``M`` that are not zero (``data`` in the kernel's dtype, ``indices``
their int32 columns, ``indptr`` the int32 row starts). A zero's sign is a bit like any other:
soft thresholding makes ``-0.0`` (``sign(w) * 0``), so the positions of negative zeros are kept
as a packed bitmap (``size / 8`` bytes, only when there are any) to rebuild the exact bits.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

INDEX_DTYPE = np.int32


def _is_float(dtype: np.dtype) -> bool:
  """float16/32/64 and the ml_dtypes floats (bfloat16, ...), which numpy files under void."""
  import jax.numpy as jnp

  return bool(jnp.issubdtype(dtype, jnp.floating))


class CSR(NamedTuple):
  """``M`` (``shape = (out, fan_in)``) in compressed sparse row form."""

  data: np.ndarray  # (nnz,), the kernel's dtype
  indices: np.ndarray  # (nnz,), int32 column of each entry
  indptr: np.ndarray  # (rows + 1,), int32
  shape: tuple[int, int]
  negative_zeros: np.ndarray | None  # packbits of the -0.0 positions of M (row-major), or None

  @property
  def nnz(self) -> int:
    return int(self.data.shape[0])

  @property
  def nbytes(self) -> int:
    extra = 0 if self.negative_zeros is None else self.negative_zeros.nbytes
    return self.data.nbytes + self.indices.nbytes + self.indptr.nbytes + extra


def matrix_shape(kernel_shape: tuple[int, ...]) -> tuple[int, int]:
  """``(out, fan_in)`` of a kernel shape ``(*fan_in_dims, out)``."""
  return int(kernel_shape[-1]), int(math.prod(kernel_shape[:-1]))


def matrix_view(kernel: np.ndarray) -> np.ndarray:
  """``M = W.reshape(fan_in, out).T`` (a view, no copy)."""
  out, fan_in = matrix_shape(kernel.shape)
  return kernel.reshape(fan_in, out).T


def csr_nbytes(kernel_shape: tuple[int, ...], itemsize: int, nnz: int) -> int:
  """Bytes of the CSR form without the negative-zero bitmap."""
  rows, _ = matrix_shape(kernel_shape)
  return nnz * (itemsize + INDEX_DTYPE().itemsize) + (rows + 1) * INDEX_DTYPE().itemsize


def from_kernel(kernel: np.ndarray) -> CSR:
  """The CSR of ``matrix_view(kernel)``: every entry that compares unequal to zero (NaN
  included), in row-major order.

  Raises:
    ValueError: more entries than int32 indices can address.
  """
  m = np.ascontiguousarray(matrix_view(np.asarray(kernel)))
  if m.size >= np.iinfo(INDEX_DTYPE).max:
    raise ValueError(f"kernel of shape {kernel.shape} is too large for int32 CSR indices")
  keep = m != 0
  rows, cols = np.nonzero(keep)
  indptr = np.zeros(m.shape[0] + 1, INDEX_DTYPE)
  np.cumsum(np.count_nonzero(keep, axis=1), out=indptr[1:])
  negative = (~keep) & np.signbit(m) if _is_float(m.dtype) else None
  if negative is not None and not negative.any():
    negative = None
  return CSR(
    data=m[rows, cols],
    indices=cols.astype(INDEX_DTYPE),
    indptr=indptr,
    shape=(int(m.shape[0]), int(m.shape[1])),
    negative_zeros=None if negative is None else np.packbits(negative.ravel()),
  )


def to_matrix(csr: CSR) -> np.ndarray:
  """The dense ``M`` (``(out, fan_in)``), with the stored negative zeros."""
  rows, cols = csr.shape
  m = np.zeros((rows, cols), csr.data.dtype)
  row_of = np.repeat(np.arange(rows), np.diff(csr.indptr))
  m[row_of, csr.indices] = csr.data
  if csr.negative_zeros is not None:
    negative = np.unpackbits(csr.negative_zeros, count=rows * cols).astype(bool)
    m.reshape(-1)[negative] = -np.zeros((), csr.data.dtype)
  return m


def to_kernel(csr: CSR, kernel_shape: tuple[int, ...]) -> np.ndarray:
  """The kernel of shape ``kernel_shape`` whose matrix view is ``csr`` (a fresh array)."""
  return np.ascontiguousarray(to_matrix(csr).T).reshape(kernel_shape)

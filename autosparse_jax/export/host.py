"""A CPU serving path for small batches: the sparse Dense layers as scipy CSR products.

At batch 1 JAX's BCSR product loses to the dense one even at 98% sparsity, while scipy's CSR
matrix-vector product wins from about 95% on large layers. This path runs the same file: the
model stays one jitted function and each sparse Dense layer calls scipy on the host through
``jax.pure_callback`` (``y = (M @ x^T)^T + b`` with ``M = W^T`` in CSR). The callback costs
0.1-0.3 ms per layer on a loaded CPU, so only large layers qualify (:data:`SCIPY_POLICY`). scipy
computes in float32 or float64: ``bfloat16`` kernels are multiplied in float32 and the result
cast back.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse

from autosparse_jax.export import format as format_lib
from autosparse_jax.export import jax_sparse
from autosparse_jax.export import plan as plan_lib

#: ``jax.pure_callback`` costs about 0.1-0.3 ms per call on a loaded 2-core CPU, the time of a
#: dense matrix-vector product with about a million weights. Measured
#: (``benchmarks/sparse_inference.py``, 1024x4096 layers at batch 1): scipy wins 1.8x at 95%,
#: 2.8x at 98%, loses at 90%; so layers of 2^21 weights or more at 95% or more, batch 1 to 8.
SCIPY_POLICY = plan_lib.Policy(min_sparsity=0.95, min_size=1 << 21, min_batch=1, max_batch=8)


@jax.tree_util.register_static
class _HostMatrix:
  """A scipy CSR ``M`` and the bias; ``(M @ x^T)^T + b`` on numpy arrays. A static pytree
  node: it travels in the operands as part of the tree's structure, not as an array."""

  def __init__(self, csr: Any, bias: np.ndarray | None):
    data = csr.data if csr.data.dtype in (np.float32, np.float64) else csr.data.astype(np.float32)
    self.matrix = scipy.sparse.csr_matrix((data, csr.indices, csr.indptr), shape=csr.shape)
    self.bias = None if bias is None else np.asarray(bias, data.dtype)

  def __call__(self, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    y = (self.matrix @ x.astype(self.matrix.dtype, copy=False).T).T
    if self.bias is not None:
      y = y + self.bias
    return np.ascontiguousarray(y, dtype=x.dtype)


def _scipy_dense(module: nn.Dense, inputs: jax.Array, host: _HostMatrix) -> jax.Array:
  dtype = module.dtype or jnp.result_type(inputs, host.matrix.dtype)
  x = jnp.asarray(inputs, dtype).reshape(-1, inputs.shape[-1])
  out = jax.ShapeDtypeStruct((x.shape[0], host.matrix.shape[0]), dtype)
  y = jax.pure_callback(host, out, x, vmap_method="sequential")
  return y.reshape(*inputs.shape[:-1], y.shape[-1])


class HostModel(jax_sparse.SparseModel):
  """``model`` with its sparse Dense layers as scipy CSR products on the host CPU.

  Same arguments and attributes as :class:`~.jax_sparse.SparseModel`; ``batch_size``
  defaults to 1 and ``policy`` to :data:`SCIPY_POLICY`. The scipy matrices stay in host
  memory; the jitted function calls them back.
  """

  sparse_name = "scipy CSR"
  _layer = staticmethod(_scipy_dense)

  def __init__(
    self,
    model: nn.Module,
    exported: format_lib.SparseFile,
    *,
    batch_size: int = 1,
    policy: plan_lib.Policy = SCIPY_POLICY,
    input_shape: tuple[int, ...] | None = None,
    **apply_kwargs: Any,
  ):
    super().__init__(
      model,
      exported,
      batch_size=batch_size,
      policy=policy,
      input_shape=input_shape,
      **apply_kwargs,
    )

  def _operand(self, exported: format_lib.SparseFile, module: plan_lib.ModulePath) -> Any:
    csr = exported.leaf(("params", *module, "kernel")).value
    return _HostMatrix(csr, plan_lib.bias_of(exported, module))

  def nbytes(self) -> int:
    """Bytes of the dense operands plus the scipy matrices and biases."""
    host = sum(
      h.matrix.data.nbytes
      + h.matrix.indices.nbytes
      + h.matrix.indptr.nbytes
      + (0 if h.bias is None else h.bias.nbytes)
      for h in self.operands["sparse"].values()
    )
    return super().nbytes() + host

"""Run a Flax linen model in JAX with its sparse Dense layers as BCSR products.

For a Dense layer ``y = x @ W + b`` with ``W`` stored as the CSR of ``M = W^T`` (see
:mod:`.csr`), the sparse path computes ``y = (M @ x^T)^T + b`` with
``jax.experimental.sparse.BCSR``: BCSR is fast only as the left operand of the product, which
is why the file stores ``W^T``. Every other layer (and every Dense the :class:`~.plan.Policy`
keeps dense) runs its usual dense code. ``jax.experimental.sparse.sparsify`` is not used: it
cannot trace ``jax.nn.relu`` (``KeyError: 'subfuns'``, jax 0.10), so the layers are
intercepted instead (``nn.intercept_methods``).

JAX has no fast kernels for unstructured sparsity on GPU or TPU: BCSR lowers to cuSPARSE on
GPU at best and to gathers on TPU. This path targets CPUs; measure before using it elsewhere.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import sparse

from autosparse_jax.export import format as format_lib
from autosparse_jax.export import plan as plan_lib

#: Measured on a loaded 2-core CPU (``benchmarks/sparse_inference.py``): BCSR beats the dense
#: product from about 90% sparsity at batch 8 or more on layers of 2^14 weights or more
#: (LeNet-300-100's fc1 and fc2, not its 100x10 head); at batch 1 it loses even at 98%.
BCSR_POLICY = plan_lib.Policy(min_sparsity=0.9, min_size=1 << 14, min_batch=8)


def _bcsr_dense(module: nn.Dense, inputs: jax.Array, operand: tuple) -> jax.Array:
  """``y = (M @ x^T)^T + b`` in the dtype ``nn.Dense`` would compute in."""
  matrix, bias = operand
  dtype = module.dtype or jnp.result_type(inputs, matrix.data, *([] if bias is None else [bias]))
  x = jnp.asarray(inputs, dtype).reshape(-1, inputs.shape[-1])
  m = sparse.BCSR((matrix.data.astype(dtype), matrix.indices, matrix.indptr), shape=matrix.shape)
  y = (m @ x.T).T
  if bias is not None:
    y = y + jnp.asarray(bias, dtype)
  return y.reshape(*inputs.shape[:-1], y.shape[-1])


class SparseModel:
  """``model`` with the variables of an export, its sparse Dense layers computed with BCSR.

  Args:
    model: the linen module the file was exported from.
    exported: the :class:`~.format.SparseFile`.
    batch_size: the batch the model will serve (the policy's batch).
    policy: when a layer runs sparse (default :data:`BCSR_POLICY`).
    input_shape: one example's shape (default: the one the file records).
    **apply_kwargs: passed to ``model.apply`` (e.g. ``train=False``).

  Attributes:
    decisions: a :class:`~.plan.Decision` per kernel.
    operands: what the jitted function reads: the dense variables and the BCSR matrices.

  Raises:
    ValueError: the file holds another model's variables.
  """

  sparse_name = "BCSR"

  def __init__(
    self,
    model: nn.Module,
    exported: format_lib.SparseFile,
    *,
    batch_size: int,
    policy: plan_lib.Policy = BCSR_POLICY,
    input_shape: tuple[int, ...] | None = None,
    **apply_kwargs: Any,
  ):
    input_shape = plan_lib.input_shape_of(exported, input_shape)
    plan_lib.check_model(exported, model, input_shape)
    self.model = model
    self.apply_kwargs = apply_kwargs
    example = jax.ShapeDtypeStruct((batch_size, *input_shape), jnp.float32)
    abstract = jax.eval_shape(model.init, jax.random.key(0), example)
    classes = plan_lib.module_classes(model, abstract, example, **apply_kwargs)
    self.decisions = plan_lib.decide(exported, classes, batch_size, policy, self.sparse_name)
    sparse_modules = {tuple(d.path.split("/")) for d in self.decisions if d.sparse}
    self.operands = jax.device_put(
      {
        "variables": plan_lib.dense_variables(exported, sparse_modules),
        "sparse": {"/".join(m): self._operand(exported, m) for m in sorted(sparse_modules)},
      }
    )
    self._forward = jax.jit(self._apply)

  def _operand(self, exported: format_lib.SparseFile, module: plan_lib.ModulePath) -> Any:
    """What the layer's product reads: the BCSR of ``W^T`` and the bias."""
    csr = exported.leaf(("params", *module, "kernel")).value
    matrix = sparse.BCSR(
      (jnp.asarray(csr.data), jnp.asarray(csr.indices), jnp.asarray(csr.indptr)), shape=csr.shape
    )
    return matrix, plan_lib.bias_of(exported, module)

  #: ``(module, inputs, operand) -> outputs`` of a sparse Dense layer.
  _layer = staticmethod(_bcsr_dense)

  def _apply(self, operands: Any, x: jax.Array) -> jax.Array:
    with plan_lib.sparse_dense_layers(operands["sparse"], self._layer):
      return self.model.apply(operands["variables"], x, **self.apply_kwargs)

  def __call__(self, x: Any) -> jax.Array:
    """``model.apply(variables, x)`` with the sparse layers as BCSR products (jitted)."""
    return self._forward(self.operands, x)

  def nbytes(self) -> int:
    """Bytes of the operands in memory (dense leaves plus BCSR data, indices, indptr)."""
    return sum(int(x.nbytes) for x in jax.tree.leaves(self.operands))

"""FLOP accounting for sparse models: dense, inference and training multiply-accumulates.

Units. A MAC is one multiply-accumulate; ``FLOPs = 2 * MACs`` (:func:`macs_to_flops`).
STR and the MobileNet paper quote MACs (ResNet-50: 4.09G, MobileNetV1: 569M); RigL quotes
FLOPs (ResNet-50: 8.2G). Every function here returns MACs unless its name says otherwise.

Dense cost (:func:`count_macs`), for ONE example, of every conv and dense layer whose kernel is
a leaf of the params tree, found by tracing the model (``jax.make_jaxpr``):

* ``conv_general_dilated``: ``MACs = prod(output shape) * prod(kernel window) * C_in / G``,
  where ``C_in / G`` is the kernel's input-feature size (``G = feature_group_count``; a
  depthwise 3x3 conv costs ``H_out * W_out * C * 9``). Padding and dilation zeros count, as in
  every published table.
* ``dot_general`` with exactly one operand a param leaf:
  ``MACs = prod(output shape) * prod(contracting sizes)``; Dense ``(B, n) @ (n, m)`` is
  ``B * n * m``.
* Both are divided by the example batch size. Ops without a kernel (pooling, batch norm,
  activations, the residual adds) are not counted. STR's ResNet-50 table adds its average
  pool as an extra row, ``7 * 7 * 2048 = 100,352`` (:func:`global_avg_pool_macs`): dense
  ResNet-50 = 4,089,184,256 conv+dense MACs + 100,352 = 4,089,284,608.

Inference cost (:func:`inference_macs`): ``sum_l d_l * M_l (+ extras)``, with ``M_l`` the
dense MACs of layer l and ``d_l = nnz(W_l) / size(W_l) = 1 - s_l`` its density, measured from
the actual zeros of the params (the sparse model computes with ``W_eff``, exact zeros). This
is the cost of a sparse kernel that skips every zero weight; it ignores activation sparsity.

Training cost per step (:func:`training_macs_per_step`), the RigL convention: each layer runs
three products of about one forward's cost each, at the density it needs:

* forward ``y = x * W_eff``: ``d^fwd_l * M_l``;
* activation gradient ``dL/dx = dL/dy * W_eff^T``: ``d^fwd_l * M_l`` (the stem's is counted
  too, though nothing needs it -- as in the ``3 x forward`` convention);
* weight gradient ``dL/dW = x^T * dL/dy``, needed only where a weight receives a gradient:
  ``d^wg_l * M_l``, with ``d^wg_l = 1`` while GA's ``alpha_t > 0`` (masked weights get
  ``alpha_t * g``) and for a straight-through estimator, ``d^wg_l = d^fwd_l`` once
  ``alpha_t = 0`` (STR), and TopKAST's backward density ``1 - backward_sparsity``.

so ``C_step = sum_l M_l * (2 d^fwd_l + d^wg_l)``; dense training costs ``3 * sum_l M_l``. Over
a run (:func:`training_cost_ratio`), ``sum_steps C_step / (n_steps * 3 * sum_l M_l)``. The
optimizer's own elementwise work (thresholds, masks, momentum) is not counted.

Param paths are the '/'-joined key paths of the first argument of the traced function (dict
keys, attribute names, sequence indices; an ``nnx`` Variable's trailing ``value`` is dropped),
the same strings as the optimizer's leaf paths: tracing ``model.apply`` with
``{'params': ..., 'batch_stats': ...}`` gives ``'params/conv_init/kernel'``; tracing
``lambda p, x: model.apply({'params': p, ...}, x)`` gives ``'conv_init/kernel'``. The lookup
functions below accept either form against either tree.

This package imports only jax and numpy: :mod:`.count` traces dense MACs, :mod:`.cost` turns
densities into inference and training cost, :mod:`.paths` matches param paths.
"""

from autosparse_jax.flops.cost import (
  RunningTrainingCost,
  TrainingCostRecord,
  densities_from_record,
  inference_macs,
  inference_ratio_from_density,
  layer_density,
  training_cost_ratio,
  training_macs_per_step,
  weight_grad_density,
)
from autosparse_jax.flops.count import count_macs, global_avg_pool_macs, macs_to_flops

__all__ = [
  "RunningTrainingCost",
  "TrainingCostRecord",
  "count_macs",
  "densities_from_record",
  "global_avg_pool_macs",
  "inference_ratio_from_density",
  "inference_macs",
  "layer_density",
  "macs_to_flops",
  "training_cost_ratio",
  "training_macs_per_step",
  "weight_grad_density",
]

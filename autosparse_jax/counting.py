"""Exact counts over large arrays, in arithmetic that XLA fuses into the sum.

XLA:CPU writes a compare-and-select out to memory before it reduces it (about 3 GB/s on
arrays larger than the cache), while arithmetic it fuses into the reduction (about 25 GB/s
here). So a count ``#{|w| > tau}`` sums :func:`step`, ``min(max(|w| - tau, 0) * 2^123, 1)``,
which equals ``[|w| > tau]`` exactly for ``tau`` in ``[2^-88, max finite]``, and falls back
to the compare outside that range or on arrays small enough to stay in cache
(:func:`fused_or_compared`). Sums of 0/1 run as float32 row sums (each an
integer at most 2^24, exact in any order) and then an int32 sum; sharded, each shard sums
locally and a scalar is all-reduced. :func:`count_above` is the sparsity ceiling's count;
:mod:`autosparse_jax.topk`'s search passes and the STR/AutoSparse threshold gradient use
:func:`step` the same way; :func:`count` counts a mask already made (DST, stats).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

EXACT_F32 = 2**24  # every integer up to here is a float32: sums of 0/1 below it are exact


def row_sums(x: jax.Array) -> jax.Array:
  """``sum(x)`` as int32 for a float32 array of small non-negative integers whose sums along
  the last axis are at most 2^24: float32 row sums (exact in any order), then an int32 sum."""
  return jnp.sum(jnp.sum(x, axis=-1).astype(jnp.int32))


def count(mask: jax.Array) -> jax.Array:
  """``#{mask}`` as an int32 scalar, exact: float32 sums along the last axis (each partial sum
  is an integer ``<= mask.shape[-1] <= 2^24``, so exact in any order), then an int32 sum of
  those. The same number as ``jnp.sum(mask, dtype=jnp.int32)``, for which XLA:CPU writes and
  then reduces an int32 array, slower on large kernels; sharded, each shard sums locally."""
  if mask.ndim == 0 or mask.shape[-1] > EXACT_F32:
    return jnp.sum(mask, dtype=jnp.int32)
  return row_sums(mask.astype(jnp.float32))


# Thresholds tau in [2^-88, max finite] make ``min(max(a - tau, 0) * 2^123, value)`` equal to
# ``value * [a > tau]`` for every float32 a >= 0 (inf included), with no rounding and whether
# or not the hardware flushes subnormals to zero (XLA:CPU, TPU do): for a > tau, a - tau is at
# least ulp(tau) >= 2^-111, a normal number, and 2^-111 * 2^123 = 2^12 >= value for every value
# used here; a subnormal a (read as 0 where flushed) lies below every such tau either way. NaN
# entries have no magnitude order and are not supported.
_FLOOR = 2.0**-88
_SCALE = 2.0**123  # values up to 2^12: L + 1 <= 4096 for rows of L(L + 2) <= 2^24
F32_MAX = float(jnp.finfo(jnp.float32).max)


def step(a: jax.Array, tau: jax.Array, value: float = 1.0) -> jax.Array:
  """``value * [a > tau]`` by arithmetic alone (see ``_FLOOR``): XLA:CPU fuses it into
  the reduction that sums it, where a compare and select is first written out to memory (about
  8x slower on kernels larger than the cache)."""
  return jnp.minimum(jnp.maximum(a - tau, 0.0) * _SCALE, value)


# Below this many entries an array stays in cache, where XLA:CPU's written-out compare costs
# about what the fused sum does, and the branch between the two only adds dispatch.
FUSED_MIN_SIZE = 2**20


def fused_or_compared(w: jax.Array, taus: jax.Array, fused, compared, *operands):
  """``fused(*operands)`` when :func:`step` is exact for every threshold in ``taus``
  (``[2^-88, max finite]``; not NaN) and ``w`` is large enough for it to pay, else
  ``compared(*operands)``: a ``lax.cond`` whose branches read the operands themselves (an
  ``|w|`` shared with the rest of a step would be written out first)."""
  if w.size < FUSED_MIN_SIZE or w.ndim == 0 or w.shape[-1] > EXACT_F32:
    return compared(*operands)
  exact = jnp.all((taus >= _FLOOR) & (taus <= F32_MAX))
  return jax.lax.cond(exact, fused, compared, *operands)


def count_above(w: jax.Array, tau: jax.Array | float) -> jax.Array:
  """``#{|w| > tau}`` as an int32 scalar (e.g. a layer's kept weights), with ``tau`` a scalar or
  broadcasting against ``w`` (one per channel): the number ``count(jnp.abs(w) > tau)`` gives,
  compared as float32. By fused arithmetic (:func:`step`) when every ``tau`` is in
  ``[2^-88, max finite]``, by that compare otherwise; each in its own branch, which reads
  ``w`` itself (an ``|w|`` shared with the rest of a step would be written out first)."""
  tau = jnp.asarray(tau, jnp.float32)

  def fused(w):
    return row_sums(step(jnp.abs(w.astype(jnp.float32)), tau, 1.0))

  def compared(w):
    return count(jnp.abs(w.astype(jnp.float32)) > tau)

  return fused_or_compared(w, tau, fused, compared, w)


def counts_at(b: jax.Array, ts: jax.Array) -> jax.Array:
  """``#{b >= t}`` for each of the few thresholds ``ts`` over an int32 array, exact. Two
  thresholds (TopKAST's two budgets) share one pass when the last axis ``L`` allows: the row
  sums of ``[b >= t0] + (L + 1) [b >= t1]`` are ``c0 + (L + 1) c1 <= L (L + 2) <= 2^24``, exact
  in float32, and split back by ``divmod``; otherwise one :func:`count` per threshold."""
  if ts.shape[0] == 1:
    return count(b >= ts[0])[None]
  if ts.shape[0] == 2 and b.ndim and b.shape[-1] * (b.shape[-1] + 2) <= EXACT_F32:
    scale = b.shape[-1] + 1
    # One select, not a sum of two: XLA:CPU then reduces without materialising two arrays.
    low = b >= ts[0]
    both = jnp.where(b >= ts[1], jnp.where(low, scale + 1.0, scale), jnp.where(low, 1.0, 0.0))
    rows = jnp.sum(both, axis=-1).astype(jnp.int32)
    return jnp.stack([jnp.sum(rows % scale), jnp.sum(rows // scale)])
  return jnp.stack([count(b >= ts[i]) for i in range(ts.shape[0])])

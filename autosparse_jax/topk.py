"""Exact top-k masks by counting, without sorting or gathering a sharded tensor.

For a kernel ``w`` and a count ``k`` the mask selects exactly ``k`` entries: every entry whose
magnitude is above the k-th largest magnitude ``v``, and of the entries equal to ``v`` those
with the lowest flat (row-major) indices. ``v`` is found by bisection over the bit patterns of
``|w|`` as float32 (for non-negative floats the integer order of the bits is the numeric
order), so each of the 31 steps is one elementwise compare and one sum; ties are then cut by a
bisection over the flat index. Sums of a sharded array reduce shard-locally and all-reduce a
scalar, so no shard ever sees another's data, unlike ``jax.lax.top_k`` or a sort.

All layers are searched in one loop (one set of iterations for the whole tree), so the cost is
about 31 fused passes over the prunable weights, plus the tie-break passes only when ties
straddle the cut.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

_VALUE_BITS = 31  # non-negative float32 bit patterns lie in [0, 2**31)


class Cutoff(NamedTuple):
  """Selects ``(bits > value) | ((bits == value) & (flat_index < index))``: exactly k entries."""

  value: jax.Array  # int32 bit pattern of the k-th largest |w|
  index: jax.Array  # int32 flat-index bound for entries tied with it


def magnitude_bits(w: jax.Array) -> jax.Array:
  """Bit patterns of ``|w|`` as int32, ordered like the magnitudes."""
  return jax.lax.bitcast_convert_type(jnp.abs(w.astype(jnp.float32)), jnp.int32)


def flat_index(shape: tuple[int, ...]) -> jax.Array:
  """Row-major flat index of every entry, built from iotas (shard-local under sharding)."""
  index = jnp.zeros(shape, jnp.int32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.int32, shape, axis) * stride
    stride *= shape[axis]
  return index


def _count(mask: jax.Array) -> jax.Array:
  return jnp.sum(mask, dtype=jnp.int32)


def cutoffs(weights: list[jax.Array], counts: list[jax.Array | int]) -> list[Cutoff]:
  """The exact top-``count`` cut of every weight array, searched together.

  Args:
    weights: arrays of any shape and float dtype.
    counts: how many entries of each to keep, in ``[0, size]`` (traced values are fine).
  """
  bits = [magnitude_bits(w) for w in weights]
  ks = [jnp.asarray(k, jnp.int32) for k in counts]

  # Largest t with count(bits >= t) >= k, by bisection on [lo, hi).
  def value_step(_, carry):
    los, his = carry
    new_lo, new_hi = [], []
    for b, k, lo, hi in zip(bits, ks, los, his, strict=True):
      mid = lo + (hi - lo) // 2
      enough = _count(b >= mid) >= k
      new_lo.append(jnp.where(enough, mid, lo))
      new_hi.append(jnp.where(enough, hi, mid))
    return new_lo, new_hi

  zeros = [jnp.zeros((), jnp.int32) for _ in bits]
  tops = [jnp.full((), 2**_VALUE_BITS - 1, jnp.int32) for _ in bits]
  # hi is exclusive; the largest pattern 2**31 - 1 is NaN, never a magnitude we keep by count.
  values, _ = jax.lax.fori_loop(0, _VALUE_BITS, value_step, (zeros, tops))

  # Ties at the cut: keep the `need` lowest flat indices among entries equal to the value.
  result = []
  for w, b, k, v in zip(weights, bits, ks, values, strict=True):
    need = k - _count(b > v)
    tied = b == v
    n_tied = _count(tied)

    def tie_break(tied=tied, need=need, shape=w.shape, size=w.size):
      idx = flat_index(shape)

      def index_step(_, carry):
        lo, hi = carry  # smallest m with count(tied & idx < m) >= need lies in (lo, hi]
        mid = lo + (hi - lo) // 2
        enough = _count(tied & (idx < mid)) >= need
        return jnp.where(enough, lo, mid), jnp.where(enough, mid, hi)

      steps = max(1, int(size).bit_length())
      _, hi = jax.lax.fori_loop(0, steps, index_step, (jnp.int32(-1), jnp.int32(size)))
      return hi

    index = jax.lax.cond(need >= n_tied, lambda size=w.size: jnp.int32(size), tie_break)
    # k = 0: nothing may be kept, so the cut sits above every magnitude.
    result.append(Cutoff(jnp.where(k > 0, v, 2**_VALUE_BITS - 1), jnp.where(k > 0, index, 0)))
  return result


def mask(w: jax.Array, cut: Cutoff) -> jax.Array:
  """Boolean mask of the entries of ``w`` kept by ``cut``."""
  b = magnitude_bits(w)
  above = b > cut.value
  tied = (b == cut.value) & (flat_index(w.shape) < cut.index)
  return above | tied


def keep_count(size: int, sparsity: jax.Array | float) -> jax.Array:
  """Entries kept at a sparsity: ``round((1 - sparsity) * size)``, and at least one, so that
  no pruned layer is ever cut off entirely (a sparsity < 1 always leaves a weight)."""
  kept = jnp.round((1.0 - jnp.asarray(sparsity, jnp.float32)) * size).astype(jnp.int32)
  return jnp.clip(kept, min(1, size), size)

"""Exact top-k masks by counting, without sorting or gathering a sharded tensor.

For a kernel ``w`` and a count ``k`` the mask selects exactly ``k`` entries: every entry whose
magnitude is above the k-th largest magnitude ``v``, and of the entries equal to ``v`` those
with the lowest flat (row-major) indices. ``v`` is searched over the bit patterns ``b`` of
``|w|`` as float32 (for non-negative floats the integer order of the bits is the numeric
order); each pass of the search is one elementwise compare and one sum over ``w`` (see the
end), and sums of a sharded array reduce shard-locally and all-reduce a scalar, so no shard
ever sees another's data, unlike ``jax.lax.top_k`` or a sort.

The search keeps a bracket ``lo < hi`` with ``c(lo) >= k > c(hi)``, ``c(t) = #{b >= t}``, and
probes one ``t`` per pass:

1. first the ``start`` pattern (the previous step's cut, which moves little between steps; a
   cold search starts at the root-mean-square magnitude, one extra sum);
2. then, until both sides are probed, steps away from it: the first sized from the count at
   ``start`` (``g`` entries still to pass out of ``k`` is a move of about ``g / k`` of the cut's
   value, ``g / k * 2^23`` patterns; twice that), then 4x larger per pass (a jump, a restore or
   a schedule change costs a few passes more, never exactness);
3. then linear interpolation of ``c`` inside the bracket, aiming at ``c = k - 1/2``, with a
   halving of the bracket whenever the previous pass halved neither its width nor its count gap.

It stops when ``hi = lo + 1`` (then ``v = lo``), or when ``c(lo) = k`` (``v = min{b >= lo}``)
or ``c(hi) = k - 1`` (``v = max{b < hi}``): one min or max reduction then finishes. When ties
at ``v`` straddle the cut, the same search finds the ``need``-th largest of the key
``size - flat_index`` over the tied entries (0 elsewhere), started where evenly spread ties
would put it. :func:`search` returns the passes it took: from the previous step's cut about
4-12 per kernel on the tests and benchmarks (ties included), against 32 plus up to
``log2(size)`` tie-break passes for a bisection from scratch.

All arrays are searched in one loop; an array listed several times (TopKAST's two budgets) is
read once per pass for all its counts.

A pass counts ``#{b >= t}`` as ``#{|w| > tau}``, ``tau`` the float just below ``t``, with the
fused arithmetic of :mod:`autosparse_jax.counting` where ``tau`` allows it (most passes), and by
comparing bit patterns otherwise (zero, subnormal or infinite thresholds). The finishing
min/max and the tie count work the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from autosparse_jax.counting import (
  EXACT_F32,
  F32_MAX,
  counts_at,
  fused_or_compared,
  row_sums,
  step,
)

_TOP = 2**31 - 1  # exclusive upper bound: non-negative float32 patterns lie below (NaN aside)
# Galloping over keys that are not magnitudes (the tie-break's flat indices): the first step
# away from ``start`` in key units, each further one 16x the previous.
_FIRST_STEP_LOG2 = 8
_GROWTH_LOG2 = 4
_MAX_PASSES = 200  # never reached: width or count gap halves every second pass after ~15


class Cutoff(NamedTuple):
  """Selects ``(bits > value) | ((bits == value) & (flat_index < index))``: exactly k entries."""

  value: jax.Array  # int32 bit pattern of the k-th largest |w|
  index: jax.Array  # int32 flat-index bound for entries tied with it


class Search(NamedTuple):
  """What :func:`search` found: one cut per (array, count) and the passes it took."""

  cuts: list[Cutoff]
  passes: jax.Array  # int32: whole-array compare-and-count (or min/max) passes, all arrays


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


def _magnitude_counts_at(w: jax.Array, ts: jax.Array) -> jax.Array:
  """``#{magnitude_bits(w) >= t}`` for each of the few bit patterns ``ts``: as
  ``#{|w| > tau}`` with ``tau`` the float just below ``t``, by fused arithmetic (two
  thresholds in one sum, encoded as in :func:`autosparse_jax.counting.counts_at`) when every
  ``tau`` allows it; otherwise by comparing bit patterns."""
  taus = jax.lax.bitcast_convert_type(ts - 1, jnp.float32)  # t = 0 gives NaN: not fusable

  # Each branch takes |w| from w itself: an |w| shared by both would be written out first.
  def fused(w):
    a = jnp.abs(w.astype(jnp.float32))
    if ts.shape[0] == 2 and a.shape[-1] * (a.shape[-1] + 2) <= EXACT_F32:
      scale = a.shape[-1] + 1
      rows = jnp.sum(step(a, taus[0], 1.0) + step(a, taus[1], scale), axis=-1)
      rows = rows.astype(jnp.int32)
      return jnp.stack([jnp.sum(rows % scale), jnp.sum(rows // scale)])
    return jnp.stack([row_sums(step(a, taus[i], 1.0)) for i in range(ts.shape[0])])

  def compared(w):
    return counts_at(magnitude_bits(w), ts)

  return fused_or_compared(w, taus, fused, compared, w)


class _Key(NamedTuple):
  """A searched array, through what the search needs of it (closures, so that each computes
  its key from the source array inside the pass that reads it):

  * ``counts(ts)``: ``#{key >= t}`` for each of the few thresholds ``ts``;
  * ``extreme(lo, hi, use_min)``: ``min{key >= lo}`` if ``use_min`` else ``max{key < hi}``.
  """

  counts: Callable[[jax.Array], jax.Array]
  extreme: Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def _int_key(get: Callable[[], jax.Array]) -> _Key:
  """The search's view of the non-negative int32 array ``get()``."""

  def extreme(lo, hi, use_min):
    return jax.lax.cond(
      use_min,
      lambda: jnp.min(jnp.where(get() >= lo, get(), _TOP)),
      lambda: jnp.max(jnp.where(get() < hi, get(), -1)),
    )

  return _Key(lambda ts: counts_at(get(), ts), extreme)


def _magnitude_key(w: jax.Array) -> _Key:
  """The search's view of ``magnitude_bits(w)``: counts and extremes by fused arithmetic on
  ``|w|`` where the thresholds allow (:func:`autosparse_jax.counting.step`), by comparing bit
  patterns otherwise."""
  exact = _int_key(lambda: magnitude_bits(w))

  def extreme(lo, hi, use_min):
    # The entries >= lo (or < hi) include some in [lo, hi), finite when hi <= inf's pattern.
    taus = jax.lax.bitcast_convert_type(jnp.stack([lo, hi]) - 1, jnp.float32)

    # One min-reduction either way: outside the side an entry becomes the largest float (min)
    # or 0 (max, taken as -min(-x)); the kept entries >= hi may be inf, clipped (the answer is
    # finite). The branch takes |w| from w itself, as a shared |w| would be written out first.
    def fused(w):
      a = jnp.abs(w.astype(jnp.float32))
      low = jnp.minimum(jnp.maximum(a, (1.0 - step(a, taus[0])) * F32_MAX), F32_MAX)
      high = jnp.minimum(a, (1.0 - step(a, taus[1])) * F32_MAX)
      u = use_min.astype(jnp.float32)
      r = jnp.min(u * low - (1.0 - u) * high)
      return jax.lax.bitcast_convert_type(jnp.where(use_min, r, -r), jnp.int32)

    return fused_or_compared(w, taus, fused, lambda w: exact.extreme(lo, hi, use_min), w)

  return _Key(lambda ts: _magnitude_counts_at(w, ts), extreme)


def _rms_bits(w: jax.Array) -> jax.Array:
  w = w.astype(jnp.float32)
  rms = jnp.sqrt(jnp.mean(w * w))
  return jax.lax.bitcast_convert_type(rms, jnp.int32)


class _Bracket(NamedTuple):
  lo: jax.Array  # count(b >= lo) = c_lo >= k
  c_lo: jax.Array
  hi: jax.Array  # count(b >= hi) = c_hi < k
  c_hi: jax.Array
  lo_probed: jax.Array
  hi_probed: jax.Array
  gallop: jax.Array  # steps taken away from start
  last_width: jax.Array  # hi - lo before the last pass with both sides probed
  last_gap: jax.Array  # c_lo - c_hi then (bisect next when neither halved)


def _done(br: _Bracket, k: jax.Array) -> jax.Array:
  return (br.hi - br.lo <= 1) | (br.c_lo == k) | (br.c_hi == k - 1) | (k <= 0)


def _gallop_step(br: _Bracket, k: jax.Array, magnitudes: bool) -> jax.Array:
  """How far the next probe steps away from the one side probed so far.

  For magnitude bit patterns, sized from the count: ``g`` entries still to step over out of
  ``k`` is a relative move of the cut's value of about ``g / k`` (less where the entries are
  denser than proportional), which is ``g / k * 2^23`` patterns (a float has ``2^23`` per
  binade); twice that, times 4 per failed step. Otherwise ``2^8`` patterns, times 16."""
  if not magnitudes:
    return jnp.left_shift(jnp.int32(1), _FIRST_STEP_LOG2 + _GROWTH_LOG2 * jnp.minimum(br.gallop, 5))
  left = jnp.where(br.lo_probed, br.c_lo - k, k - br.c_hi).astype(jnp.float32) + 1.0
  move = left / jnp.maximum(k, 1).astype(jnp.float32) * 2.0**24 * 4.0 ** jnp.minimum(br.gallop, 8)
  return jnp.clip(move, 1.0, 2.0**30).astype(jnp.int32)


def _probe(br: _Bracket, k: jax.Array, start: jax.Array, magnitudes: bool) -> jax.Array:
  """The next threshold to count, strictly inside ``(lo, hi)``."""
  width = br.hi - br.lo
  step = _gallop_step(br, k, magnitudes)
  up = br.lo + jnp.minimum(step, width - 1)
  down = br.hi - jnp.minimum(step, width - 1)
  aim = (br.c_lo - k).astype(jnp.float32) + 0.5  # entries to step over, from lo
  frac = aim / (br.c_lo - br.c_hi).astype(jnp.float32)
  offset = jnp.clip(frac * width.astype(jnp.float32), 1.0, 2.0**30).astype(jnp.int32)
  interp = br.lo + jnp.minimum(offset, width - 1)
  bisect = br.lo + width // 2
  both = br.lo_probed & br.hi_probed
  gap = br.c_lo - br.c_hi
  slow = (width > br.last_width - br.last_width // 2) & (gap > br.last_gap - br.last_gap // 2)
  return jnp.where(
    both,
    jnp.where(slow, bisect, interp),
    jnp.where(
      br.lo_probed,
      up,
      jnp.where(br.hi_probed, down, jnp.clip(start, br.lo + 1, br.hi - 1)),
    ),
  )


def _kth_largest(keys, order, sizes, ks, starts, magnitudes):
  """For each position i, the ``ks[i]``-th largest of the key ``keys[g]`` (a :class:`_Key`)
  of its group ``g`` (``order[g]`` lists a group's positions; a group's array is read once
  per pass for all of them), by the bracket search of the module docstring; ``magnitudes``:
  the keys are magnitude bit patterns (galloping steps sized by :func:`_gallop_step`). Returns
  ``(value, min-finished, max-finished)`` per position, the final brackets and the passes.
  """
  n = len(ks)

  def initial(size):
    return _Bracket(
      lo=jnp.int32(0),
      c_lo=jnp.int32(size),
      hi=jnp.int32(_TOP),
      c_hi=jnp.int32(0),
      lo_probed=jnp.bool_(False),
      hi_probed=jnp.bool_(False),
      gallop=jnp.int32(0),
      last_width=jnp.int32(_TOP),
      last_gap=jnp.int32(size),
    )

  def cond(carry):
    brs, passes = carry
    live = jnp.stack([~_done(brs[i], ks[i]) for i in range(n)])
    return jnp.any(live) & (passes < _MAX_PASSES)

  def body(carry):
    brs, passes = carry
    brs = list(brs)
    for key, pos in zip(keys, order, strict=True):
      probes = [_probe(brs[i], ks[i], starts[i], magnitudes) for i in pos]
      ts = jnp.stack(probes)
      live = jnp.any(jnp.stack([~_done(brs[i], ks[i]) for i in pos]))
      cs = jax.lax.cond(live, lambda ts, key=key: key.counts(ts), lambda ts: jnp.zeros_like(ts), ts)
      for j, i in enumerate(pos):
        br, k, t, c = brs[i], ks[i], probes[j], cs[j]
        go = ~_done(br, k)
        new_lo = go & (c >= k)
        new_hi = go & (c < k)
        both = go & br.lo_probed & br.hi_probed
        galloping = ~(br.lo_probed & br.hi_probed) & (br.lo_probed | br.hi_probed)
        brs[i] = _Bracket(
          lo=jnp.where(new_lo, t, br.lo),
          c_lo=jnp.where(new_lo, c, br.c_lo),
          hi=jnp.where(new_hi, t, br.hi),
          c_hi=jnp.where(new_hi, c, br.c_hi),
          lo_probed=br.lo_probed | new_lo,
          hi_probed=br.hi_probed | new_hi,
          gallop=br.gallop + (go & galloping).astype(jnp.int32),
          last_width=jnp.where(both, br.hi - br.lo, br.last_width),
          last_gap=jnp.where(both, br.c_lo - br.c_hi, br.last_gap),
        )
    return brs, passes + 1

  brackets = [initial(sizes[i]) for i in range(n)]
  brackets, passes = jax.lax.while_loop(cond, body, (brackets, jnp.int32(0)))

  # v = lo when the bracket is one pattern wide; else one min (c(lo) = k) or max
  # (c(hi) = k - 1) reduction, for all positions of a group in the same pass.
  values: list = [None] * n
  finishing = []
  for key, pos in zip(keys, order, strict=True):
    brs = [brackets[i] for i in pos]
    k = jnp.stack([ks[i] for i in pos])
    lo, hi = jnp.stack([br.lo for br in brs]), jnp.stack([br.hi for br in brs])
    c_lo = jnp.stack([br.c_lo for br in brs])
    narrow = hi - lo <= 1
    use_min = ~narrow & (c_lo == k) & (k > 0)
    use_max = ~narrow & ~use_min & (k > 0)

    def finish(key=key, lo=lo, hi=hi, use_min=use_min, use_max=use_max):
      return jnp.stack(
        [
          jax.lax.cond(
            use_min[j] | use_max[j],
            lambda j=j: key.extreme(lo[j], hi[j], use_min[j]),
            lambda j=j: lo[j],
          )
          for j in range(lo.shape[0])
        ]
      )

    any_finish = jnp.any(use_min | use_max)
    v = jax.lax.cond(any_finish, finish, lambda lo=lo: lo)
    finishing.append(any_finish)
    for j, i in enumerate(pos):
      values[i] = (v[j], use_min[j], use_max[j])
  # Each position's finish reads its array once: one pass over all of them together.
  passes = passes + jnp.any(jnp.stack(finishing)).astype(jnp.int32)
  return values, brackets, passes


def search(
  weights: Sequence[jax.Array],
  counts: Sequence[jax.Array | int],
  start: Sequence[jax.Array] | None = None,
) -> Search:
  """The exact top-``count`` cut of every weight array, searched together.

  Args:
    weights: arrays of any shape and float dtype; the same array object may appear several
      times (with different counts), and is then read once per pass.
    counts: how many entries of each to keep, in ``[0, size]`` (traced values are fine).
    start: an int32 bit-pattern guess of each cut (e.g. the previous step's ``Cutoff.value``);
      any value is correct, a close one is fast. None: the root-mean-square magnitude.
  """
  ks = [jnp.asarray(k, jnp.int32) for k in counts]
  groups: dict[int, list[int]] = {}
  for i, w in enumerate(weights):
    groups.setdefault(id(w), []).append(i)
  order = list(groups.values())  # per distinct array, the positions that search it
  keys = [_magnitude_key(weights[pos[0]]) for pos in order]
  group_of = {i: g for g, pos in enumerate(order) for i in pos}
  passes = jnp.int32(0)
  if start is None:
    rms = [_rms_bits(weights[pos[0]]) for pos in order]
    starts = [rms[group_of[i]] for i in range(len(weights))]
    passes = passes + 1
  else:
    starts = [jnp.asarray(s, jnp.int32) for s in start]
  sizes = [w.size for w in weights]
  found, brackets, value_passes = _kth_largest(keys, order, sizes, ks, starts, True)
  passes = passes + value_passes

  # Entries above v number c_hi (no pattern lies strictly between v and hi), and those equal
  # to v c_lo - c_hi when the bracket is one pattern wide; after a min-finish every tied entry
  # is kept (c(v) = c(lo) = k); after a max-finish one pass counts them: c(v) - c(v + 1).
  need, n_tied, max_finish = [], [], []
  for i, ((_, use_min, use_max), br) in enumerate(zip(found, brackets, strict=True)):
    need.append(jnp.where(use_min, 0, ks[i] - br.c_hi))
    n_tied.append(jnp.where(use_min | use_max, 0, br.c_lo - br.c_hi))
    max_finish.append(use_max)
  any_max = jnp.any(jnp.stack(max_finish))

  def tied(i):
    c = keys[group_of[i]].counts(jnp.stack([found[i][0], found[i][0] + 1]))
    return jnp.where(max_finish[i], c[0] - c[1], 0)

  counted = jax.lax.cond(
    any_max,
    lambda: [tied(i) for i in range(len(weights))],
    lambda: [jnp.int32(0) for _ in weights],
  )
  passes = passes + any_max.astype(jnp.int32)
  n_tied = [t + c for t, c in zip(n_tied, counted, strict=True)]
  straddle = [(nd < nt) & (k > 0) for nd, nt, k in zip(need, n_tied, ks, strict=True)]

  # Ties straddle the cut: keep the `need` lowest flat indices among the entries equal to v,
  # i.e. the need-th largest of the key size - index over those entries (0 elsewhere), by the
  # same search, started where evenly spread ties would put it.
  def tie_key(i):
    w, v = weights[i], found[i][0]
    return _int_key(lambda: jnp.where(magnitude_bits(w) == v, w.size - flat_index(w.shape), 0))

  tie_ks = [jnp.where(st, nd, 0) for st, nd in zip(straddle, need, strict=True)]
  tie_starts = [
    sz - (sz * (nd.astype(jnp.float32) / jnp.maximum(nt, 1).astype(jnp.float32))).astype(jnp.int32)
    for sz, nd, nt in zip(sizes, need, n_tied, strict=True)
  ]
  any_tie = jnp.any(jnp.stack(straddle))

  def tie_break():
    every = list(range(len(weights)))
    got, _, tie_passes = _kth_largest(
      [tie_key(i) for i in every], [[i] for i in every], sizes, tie_ks, tie_starts, False
    )
    bounds = [
      jnp.where(st, sz - g[0] + 1, sz) for st, sz, g in zip(straddle, sizes, got, strict=True)
    ]
    return bounds, tie_passes

  index, tie_passes = jax.lax.cond(
    any_tie, tie_break, lambda: ([jnp.int32(sz) for sz in sizes], jnp.int32(0))
  )
  passes = passes + tie_passes
  result = []
  for i, k in enumerate(ks):
    # k = 0: nothing may be kept, so the cut sits above every magnitude.
    result.append(Cutoff(jnp.where(k > 0, found[i][0], _TOP), jnp.where(k > 0, index[i], 0)))
  return Search(result, passes)


def cutoffs(
  weights: Sequence[jax.Array],
  counts: Sequence[jax.Array | int],
  start: Sequence[jax.Array] | None = None,
) -> list[Cutoff]:
  """The cuts of :func:`search` alone."""
  return search(weights, counts, start).cuts


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

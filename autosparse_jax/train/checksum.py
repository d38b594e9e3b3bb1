"""Checksums of every leaf of a train state, stored with each checkpoint and verified on restore.

orbax's data files carry no checksum, so a flipped bit in one of them restores as a silently
altered weight. Each leaf ``x`` (its bits as unsigned words ``v_i``, ``i`` the flat index) gets
two 32-bit sums, with wrap-around:

  ``a = sum_i v_i * (2 i + 1)``        and        ``b = sum_i fmix32(v_i XOR fmix32(i))``

``fmix32`` is MurmurHash3's finaliser, a bijection of 32-bit words. Changing one element
changes exactly one term of ``b`` to a different value, so ``b`` catches any change confined to
one element; a single flipped bit (``v_i`` off by ``2^k``) moves ``a`` by ``2^k`` times an odd
number, never 0 mod ``2^32``. Changes spread over several elements go unseen with probability
about ``2^-64``. Integer sums are exact in any order, so the checksums are one jitted reduction
over the array wherever its shards live (no gather to one host) and equal whatever the sharding
or device count a state is saved or restored with.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _fmix32(h: jax.Array) -> jax.Array:
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
  """The bits of ``x`` as uint32 words (one per element; 64-bit elements as two)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32).reshape(-1)
  bits = x.dtype.itemsize * 8
  if bits == 64:
    return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
  unsigned = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}[bits]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).reshape(-1)


def _leaf_checksum(x: jax.Array) -> jax.Array:
  v = _words(x)
  i = jnp.arange(v.shape[0], dtype=jnp.uint32)
  a = jnp.sum(v * (2 * i + 1), dtype=jnp.uint32)
  b = jnp.sum(_fmix32(v ^ _fmix32(i)), dtype=jnp.uint32)
  return jnp.stack([a, b])


@jax.jit
def _checksums(tree: Any) -> list[jax.Array]:
  return [_leaf_checksum(jnp.asarray(x)) for x in jax.tree.leaves(tree)]


def tree_checksums(tree: Any) -> dict[str, str]:
  """``{key path: 16 hex digits}`` for every leaf of ``tree`` (arrays, possibly sharded)."""
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  sums = jax.device_get(_checksums(tree))
  return {p: "".join(f"{int(w):08x}" for w in np.asarray(s)) for p, s in zip(paths, sums)}  # noqa: B905


class ChecksumMismatch(ValueError):
  """A restored state differs from the one that was saved."""


def verify(tree: Any, expected: dict[str, str]) -> None:
  """Raises :class:`ChecksumMismatch` naming the leaves of ``tree`` whose checksum is not the
  ``expected`` one (or that are missing or extra)."""
  actual = tree_checksums(tree)
  bad = sorted(k for k in actual.keys() | expected.keys() if actual.get(k) != expected.get(k))
  if bad:
    shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    raise ChecksumMismatch(f"checksum mismatch (data altered on disk) in {shown}")

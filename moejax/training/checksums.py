"""Checksums of arrays, computed where they live: what a checkpoint records and verifies.

Each array's bits, read as unsigned words (a 32-bit word per float32, a 16-bit one per
bfloat16, ...), give two sums modulo 2^32: the plain sum, and the sum weighted by the odd
numbers 1, 3, 5, ... in element order. A change of one element always changes the
weighted sum (an odd weight is invertible modulo 2^32), and a swap of two changes it
unless their weights agree. Both reduce on the devices that hold the array (a sharded
array is summed where its shards are, with XLA's reductions); only the sums reach the
host. Not a cryptographic hash: it finds corruption, not tampering.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from moejax.training.tree_paths import path_name

_WORDS = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}


def _words(x: jax.Array) -> jax.Array:
  """The bits of `x` as uint32 words `[n]`."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32).reshape(-1)
  words = jax.lax.bitcast_convert_type(x, _WORDS[x.dtype.itemsize])  # 8 bytes: [..., 2]
  return words.astype(jnp.uint32).reshape(-1)


def _sums(x: jax.Array) -> jax.Array:
  """`[2]` uint32: the plain and the odd-weighted sum of `x`'s words."""
  words = _words(x)
  weights = 2 * jnp.arange(words.shape[0], dtype=jnp.uint32) + 1
  return jnp.stack([jnp.sum(words, dtype=jnp.uint32), jnp.sum(words * weights, dtype=jnp.uint32)])


def _finite(x: jax.Array) -> jax.Array:
  if not jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.bool_(True)
  return jnp.all(jnp.isfinite(x))


@jax.jit
def _sums_and_finite(tree):
  return jax.tree.map(_sums, tree), jax.tree.map(_finite, tree)


def checksums(tree) -> tuple[dict[str, list[int]], list[str]]:
  """`({leaf path: [sum, weighted sum]}, [paths of floating leaves that are not finite])`
  of a pytree of arrays (plain arrays: PRNG keys as their data)."""
  sums, finite = jax.device_get(_sums_and_finite(tree))
  named = {
    path_name(p): [int(v) for v in np.asarray(s)]
    for p, s in jax.tree_util.tree_leaves_with_path(sums)
  }
  bad = [path_name(p) for p, ok in jax.tree_util.tree_leaves_with_path(finite) if not bool(ok)]
  return named, bad


def mismatches(saved: dict[str, list[int]], found: dict[str, list[int]]) -> list[str]:
  """The paths of `saved` whose sums `found` does not repeat (or lacks)."""
  return [name for name, value in saved.items() if name in found and found[name] != value]

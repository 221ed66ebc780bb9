"""Batched solves with symmetric positive definite matrices, with and without LAPACK.

The ESVM's exact Newton step solves one small SPD system per target (`esvm.newton_step`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def spd_solve(m: jax.Array, b: jax.Array, pure: bool = False) -> jax.Array:
  """m^-1 b for SPD m [B, r, r] and b [B, r], by Cholesky; only m's lower triangle is read.

  With `pure`, no LAPACK call (`cholesky`).
  """
  return cho_solve(cholesky(m, pure), b, pure)


def cholesky(m: jax.Array, pure: bool = False) -> jax.Array:
  """The lower Cholesky factors [B, r, r] of SPD m [B, r, r]; only m's lower triangle is read.

  With `pure`, a left-looking Cholesky from XLA loops and products only, slower than LAPACK:
  several XLA:CPU devices running jaxlib's batched LAPACK kernels at once can deadlock its thread
  pool (benchmarks/repro_lapack_deadlock.py), so multi-device CPU meshes take this one.
  """
  if not pure:
    return jax.lax.linalg.cholesky(m, symmetrize_input=False)
  m = jnp.asarray(m)
  r = m.shape[-1]
  rows = jnp.arange(r)

  def column(j, chol):
    # Column j of L from rows j.. of m[:, j] - L L[j, :]^T (entries right of j are still zero).
    col = m[:, :, j] - jnp.einsum("bik,bk->bi", chol, chol[:, j, :])
    col = jnp.where(rows[None, :] >= j, col, 0.0)
    return chol.at[:, :, j].set(col * jax.lax.rsqrt(col[:, j])[:, None])

  return jax.lax.fori_loop(0, r, column, jnp.zeros_like(m))


def cho_solve(chol: jax.Array, b: jax.Array, pure: bool = False) -> jax.Array:
  """(L L^T)^-1 b for lower Cholesky factors L [B, r, r] and b [B, r].

  The triangular solves take b as a row ([B, 1, r]): XLA:CPU runs that form faster than the
  column form of jax.scipy's cho_solve. With `pure`, XLA loops instead of LAPACK (`cholesky`).
  """
  if not pure:
    y = jax.lax.linalg.triangular_solve(chol, b[:, None, :], left_side=False, lower=True,
                                        transpose_a=True)  # y^T = b^T L^-T, i.e. L y = b
    return jax.lax.linalg.triangular_solve(chol, y, left_side=False, lower=True)[:, 0]  # L^T c = y
  b = jnp.asarray(b)
  bsz, r = b.shape

  def forward(j, y):  # L y = b; y is still zero from j on, so the sum runs over i < j
    row = chol[:, j, :]
    return y.at[:, j].set((b[:, j] - jnp.sum(row * y, -1)) / row[:, j])

  def backward(k, c):  # L^T c = y; c is still zero up to r - 1 - k
    j = r - 1 - k
    col = chol[:, :, j]
    return c.at[:, j].set((y[:, j] - jnp.sum(col * c, -1)) / col[:, j])

  y = jax.lax.fori_loop(0, r, forward, jnp.zeros((bsz, r), b.dtype))
  return jax.lax.fori_loop(0, r, backward, jnp.zeros((bsz, r), b.dtype))

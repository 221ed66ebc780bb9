"""Batched Exemplar-SVM solver: sklearn's LinearSVC problem for many targets at once.

For one target feature t and candidate features x_1..x_n (all negatives), sklearn's
`LinearSVC(C, class_weight='balanced', loss='squared_hinge', penalty='l2', fit_intercept=True,
intercept_scaling=1)` calls liblinear's L2-regularised squared-hinge primal solver on augmented
features [x, 1] (so the intercept is regularised like a weight):

  min_w  0.5 ||w||^2 + c_pos * max(0, 1 - w.t)^2 + c_neg * sum_i max(0, 1 + w.x_i)^2,

with balanced class weights n_total / (2 n_class): c_pos = C (n + 1) / 2 for the one positive and
c_neg = C (n + 1) / (2 n) for each negative. The objective is strictly convex, so its minimiser is
unique and any exact solver reproduces sklearn's decision values w.x_i.

The solver is a semi-smooth (generalised) Newton method with an exact line search, batched over
targets with `jax.vmap` inside one jit:

* The squared hinge is piecewise quadratic, so its generalised Hessian is
  H = I + 2 c_pos [t.w < 1] t t^T + 2 c_neg B^T B, with B the rows of the candidates that violate
  their margin (w.x_i > -1). Near the optimum only few candidates do (tens for CIFAR-10-like
  features out of 5,000), so H is a rank-one stiff term plus a low-rank term, and Woodbury gives
  the exact Newton step from an [m, m] Cholesky on the top-m rows (`num_rows`). Once the set of
  violators is right, one step is exact. For candidate sets of up to `shared_gram_max` rows
  (same-class sets), the [m, m] matrices are gathered from the candidates' Gram matrix, formed
  once and shared by all targets; larger sets gather the m rows instead.
* The products with the whole candidate matrix (x s, x^T r for the gradient, and with the
  shared Gram x P^-1 g and x^T c for the Woodbury terms; the decision values x w are carried
  from step to step and x t is formed once per target) are, with a shared candidate matrix,
  matrix-matrix products [targets, d + 1] x [d + 1, candidates]: what accelerators (and BLAS)
  do well.
* The step length minimises the convex piecewise-quadratic line function exactly (safeguarded
  Newton on its derivative), so every iteration decreases the objective.
* Convergence, per target: the Newton step measured in decision-value units,
  ||[x; t] H^-1 g||_inf, a norm of the gradient that says how far any decision value can still
  move. In float32 the plain ||g|| cannot go much below eps * c_pos * ||t||^2 * ||w|| (the
  positive's cost grows with the number of candidates), whereas this scaled norm reaches ~1e-6.
  Both, and the P^-1-scaled gradient norm, are reported per target. When an exact step keeps
  the set of margin violators unchanged, the step at the new weights is known without another
  iteration ((1 - a) times the step taken, up to the solve's rounding), so converged targets do
  not spend an iteration verifying it.
* The candidates are held sorted by norm (`Problem.inverse`): the small-norm ones are margin
  violators for most targets, so the active sets' Gram blocks come mostly from one small,
  cache-resident corner of the Gram, and only that matrix's upper triangle is read.
* Several XLA:CPU devices running jaxlib's batched LAPACK kernels at once can deadlock its
  thread pool, so `Solver` on a multi-device CPU mesh solves the [r, r] systems with a
  LAPACK-free Cholesky (`_spd_solve_pure`); single devices and accelerators use LAPACK/cuSOLVER.

A vmapped `while_loop` iterates until every target has converged and freezes those that have,
so a target's result does not depend on the others in its batch (up to the rounding of the
batched products). Everything is float32 and deterministic.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class SolverStats(NamedTuple):
  """Per-target solver diagnostics, each [targets].

  Attributes:
    iterations: Newton iterations taken.
    num_violators: candidates inside their margin (w.x_i > -1) at the returned weights; the
      Newton step is exact while this is at most `num_rows`.
    grad_norm: ||gradient|| of the objective at the returned weights (Euclidean; in float32 it
      cannot fall below about eps * c_pos * ||t||^2 * ||w||, the rounding of the positive's term).
    scaled_grad_norm: sqrt(g^T P^-1 g), P = I + 2 c_pos t t^T: the gradient norm with the
      positive's stiff direction scaled out; an upper bound of the Newton decrement.
    newton_step: the last Newton step in decision-value units, max over the candidates and the
      target of |[x_i, 1] . H^-1 g|, or its bound from the active-set certificate (see
      `newton_step`); the convergence test.
    converged: newton_step <= tol.
  """

  iterations: jax.Array
  num_violators: jax.Array
  grad_norm: jax.Array
  scaled_grad_norm: jax.Array
  newton_step: jax.Array
  converged: jax.Array


def class_weights(num_candidates: int, C: float) -> tuple[float, float]:
  """(c_pos, c_neg): per-example costs of sklearn's class_weight='balanced' for 1 vs n."""
  total = num_candidates + 1
  return C * total / 2.0, C * total / (2.0 * num_candidates)


def _augment(x: jax.Array) -> jax.Array:
  # intercept_scaling=1: liblinear appends a constant-1 feature, its weight is the intercept.
  return jnp.concatenate([x, jnp.ones(x.shape[:-1] + (1,), x.dtype)], axis=-1)


class Problem(NamedTuple):
  """One candidate set, prepared once on the device and shared by all targets (`prepare`).

  The candidates are held in the solver's own order (see `inverse`), which all candidate-indexed
  arrays here follow; `finish` and `solve` return decision values in the caller's order.

  Attributes:
    x: [n, D] augmented candidates (D = d + 1), padding rows all zero (they add nothing to sums).
    valid: [n] bool, False on padding rows.
    gram: x x^T [n, n] shared by all targets, or None to gather each step's rows instead.
    ridge_inv: [D, D] A^-1 for A = I + 2 c_neg x_K^T x_K, x_K the `init_rows` smallest-norm
      candidates (the Hessian with those inside their margin), for the starting point: a
      matrix product per batch instead of triangular solves (see `pure_solve` in `newton_step`
      for why LAPACK calls are avoided there).
    ridge_rhs: [D] A^-1 x_K^T 1.
    c_pos, c_neg: the balanced class weights (scalars).
    inverse: int32 [n]: row inverse[i] here is the caller's candidate i. The valid candidates
      are sorted by norm, smallest first: a candidate near the origin has a decision value near
      the intercept for every target, so small-norm candidates are margin violators for most
      targets (for CIFAR-10 features the 1,000 smallest of 5,000 hold ~2/3 of all targets'
      active-set entries). Together they make a compact, cache-resident corner of the Gram,
      which the per-step gather of the active set's block reads far more often than the rest.
  """

  x: jax.Array
  valid: jax.Array
  gram: jax.Array | None
  ridge_inv: jax.Array
  ridge_rhs: jax.Array
  c_pos: jax.Array
  c_neg: jax.Array
  inverse: jax.Array

  def caller_order(self, a: jax.Array) -> jax.Array:
    """A [..., n] candidate-indexed array of the solver's order in the caller's order."""
    return a[..., self.inverse]


# Candidates assumed inside their margin by the starting point (`initial_weights`).
INIT_ROWS = 256


def prepare(candidates: jax.Array, C: float, valid: jax.Array | None = None,
            shared_gram_max: int = 8192, init_rows: int = INIT_ROWS) -> Problem:
  """Augments the candidates, masks padding, and forms what all targets share (traceable).

  Args:
    candidates: [n, d] float candidates shared by all targets.
    C: sklearn's C.
    valid: optional bool [n]; False marks padding rows (the class weights count valid rows).
    shared_gram_max: with at most this many candidates their [n, n] Gram is formed here.
    init_rows: the starting point counts this many smallest-norm candidates as margin violators
      (`initial_weights`).
  """
  n = candidates.shape[0]
  candidates = candidates.astype(jnp.float32) if not jnp.issubdtype(
      candidates.dtype, jnp.floating) else candidates
  dtype = candidates.dtype
  if valid is None:
    valid = jnp.ones((n,), bool)
  # The solver's order (see `Problem.inverse`): valid candidates by norm, then the padding.
  order = jnp.argsort(jnp.where(valid, jnp.sum(candidates * candidates, -1), jnp.inf),
                      stable=True)
  candidates, valid = candidates[order], valid[order]
  inverse = jnp.argsort(order).astype(jnp.int32)
  count = jnp.sum(valid).astype(dtype)
  c_pos, c_neg = C * (count + 1) / 2.0, C * (count + 1) / (2.0 * count)
  x = _augment(candidates) * valid[:, None].astype(dtype)
  gram = _upper_gram(x) if n <= shared_gram_max else None
  x_k = x[:max(1, min(int(init_rows), n))]  # valid rows come first; padding rows are zero
  a = jnp.eye(x.shape[1], dtype=dtype) + 2.0 * c_neg * (x_k.T @ x_k)
  chol = jnp.linalg.cholesky(a)
  inv = jax.scipy.linalg.cho_solve((chol, True), jnp.eye(x.shape[1], dtype=dtype))
  inv = 0.5 * (inv + inv.T)
  return Problem(x, valid, gram, inv, inv @ jnp.sum(x_k, 0), c_pos, c_neg, inverse)


def _upper_gram(x: jax.Array, block: int = 1024) -> jax.Array:
  """x x^T where only the upper triangle is meaningful (below it: zeros or x x^T entries).

  `_gram_block` reads nothing else, so for large sets only the row blocks' products with the
  rows from their own start on are formed: ~60% of the products for 5,000 candidates, and ~20%
  less time than the whole product. (Its rounding need not be symmetric either.)
  """
  n = x.shape[0]
  if n <= 2 * block:
    return x @ x.T
  gram = jnp.zeros((n, n), x.dtype)
  for start in range(0, n, block):
    gram = jax.lax.dynamic_update_slice(gram, x[start:start + block] @ x[start:].T,
                                        (start, start))
  return gram


def initial_weights(targets: jax.Array, prob: Problem) -> jax.Array:
  """Starting weights [targets, D]: the minimiser with the `init_rows` smallest-norm candidates
  inside their margin and the others ignored.

  That objective is a ridge regression whose Hessian A + 2 c_pos t t^T is shared by all targets
  up to the rank-one positive term, so its minimiser costs one shared [D, D] factorisation plus
  Sherman-Morrison per target. The small-norm candidates are the margin violators of most
  targets' optima (see `Problem.inverse`), so this lands near the optimum: on CIFAR-10 features
  (5,000 candidates) 256 of them take ~1 Newton step fewer (5.3-5.8 on average) than counting
  every candidate (6.6), which in turn takes about a third fewer than w = 0 (which first swings
  to w ~ t, with every negative violating). Only a starting point: the Newton iterations make
  the result exact whatever its rounding.
  """
  t = _augment(targets.astype(prob.x.dtype))
  k = 2.0 * prob.c_pos
  p = t @ prob.ridge_inv  # A^-1 t  [targets, D] (A symmetric)
  a_b = k * p - 2.0 * prob.c_neg * prob.ridge_rhs  # A^-1 b, b = k t - 2 c_neg x_K^T 1
  tb = jnp.sum(t * a_b, -1, keepdims=True)
  tp = jnp.sum(t * p, -1, keepdims=True)
  return a_b - k * p * tb / (1.0 + k * tp)


# Safety margins of the active-set certificate in `newton_step` (relative to the step taken).
CERT_FACTOR = 10.0
CERT_SLACK = 1e-3


def _spd_solve(m: jax.Array, b: jax.Array, pure: bool = False) -> jax.Array:
  """m^-1 b for SPD m [B, r, r] and b [B, r], by Cholesky; only m's lower triangle is read.

  With `pure`, `_spd_solve_pure` (no LAPACK call) instead.

  The two triangular solves take b as a row ([B, 1, r], right-hand side): XLA:CPU runs that
  form about 1.5x faster than the column form jax.scipy.linalg.cho_solve uses.
  """
  if pure:
    return _spd_solve_pure(m, b)
  chol = jax.lax.linalg.cholesky(m, symmetrize_input=False)
  y = jax.lax.linalg.triangular_solve(chol, b[:, None, :], left_side=False, lower=True,
                                      transpose_a=True)  # y^T = b^T L^-T, i.e. L y = b
  return jax.lax.linalg.triangular_solve(chol, y, left_side=False, lower=True)[:, 0]  # L^T c = y


def _spd_solve_pure(m: jax.Array, b: jax.Array) -> jax.Array:
  """m^-1 b as `_spd_solve`, from XLA loops and products only (no LAPACK custom call).

  jaxlib 0.10's CPU LAPACK kernels (Cholesky, triangular solve) split a batch over XLA:CPU's
  intra-op thread pool and block a pool thread until the pieces finish. When several CPU devices
  run such a kernel at once (a program sharded over JAX_NUM_CPU_DEVICES host devices), every pool
  thread can end up blocked waiting for pieces that no thread is left to run: the process hangs
  (gdb: all `tf_XLAEigen` threads in `jax::ParallelBatchMap` / `BlockingCounter::Wait` under
  `jax::CholeskyFactorization::Kernel`). This left-looking Cholesky (one column per loop step,
  O(B r^3) memory traffic, so slower than LAPACK) is used only on such CPU meshes.
  """
  m, b = jnp.asarray(m), jnp.asarray(b)
  bsz, r, _ = m.shape
  rows = jnp.arange(r)

  def column(j, chol):
    # Column j of L from rows j.. of m[:, j] - L L[j, :]^T (entries right of j are still zero).
    col = m[:, :, j] - jnp.einsum("bik,bk->bi", chol, chol[:, j, :])
    col = jnp.where(rows[None, :] >= j, col, 0.0)
    return chol.at[:, :, j].set(col * jax.lax.rsqrt(col[:, j])[:, None])

  chol = jax.lax.fori_loop(0, r, column, jnp.zeros_like(m))

  def forward(j, y):  # L y = b; y is still zero from j on, so the sum runs over i < j
    row = chol[:, j, :]
    return y.at[:, j].set((b[:, j] - jnp.sum(row * y, -1)) / row[:, j])

  def backward(k, c):  # L^T c = y; c is still zero up to r - 1 - k
    j = r - 1 - k
    col = chol[:, :, j]
    return c.at[:, j].set((y[:, j] - jnp.sum(col * c, -1)) / col[:, j])

  y = jax.lax.fori_loop(0, r, forward, jnp.zeros((bsz, r), b.dtype))
  return jax.lax.fori_loop(0, r, backward, jnp.zeros((bsz, r), b.dtype))


def _first_violators(violators: jax.Array, num_rows: int) -> tuple[jax.Array, jax.Array]:
  """Positions of each row's first `num_rows` violators, and every candidate's violator rank.

  Args:
    violators: bool [B, n].
    num_rows: r.

  Returns:
    (idx int32 [B, r]: the candidates of the first r violators, ascending (entries past a row's
    count are clamped to n - 1 and must be masked); pos int32 [B, n]: among the violators, how
    many come before each candidate (its slot in idx when it is a violator and pos < r)).
    Equivalent to `jnp.nonzero(size=r)` per row, but a binary search in the running count
    instead of a scatter over all B x n entries, which XLA:CPU runs several times slower.
  """
  n = violators.shape[1]
  running = jnp.cumsum(violators, axis=1, dtype=jnp.int32)  # [B, n]
  ranks = jnp.arange(1, num_rows + 1, dtype=jnp.int32)
  idx = jax.vmap(lambda c: jnp.searchsorted(c, ranks, side="left"))(running)
  return jnp.minimum(idx, n - 1).astype(jnp.int32), running - 1


def _rowdot(a, b):
  return jnp.sum(a * b, -1)


def _half_precondition(r, t, gamma):
  # P^-1/2 r for P = I + 2 c_pos [u < 1] t t^T: P^-1/2 = I - gamma t t^T, per row. The
  # positive's cost c_pos grows with the number of candidates, so t is by far the stiffest
  # direction of H.
  return r - (gamma * _rowdot(r, t))[:, None] * t


def _gradient(w, v, u, t, x, c_pos, c_neg):
  # v = w x^T (decision values) [B, n], u = t.w [B]. Padding rows of x are zero: no effect.
  return (w - (2.0 * c_pos * jnp.maximum(1.0 - u, 0.0))[:, None] * t
          + 2.0 * c_neg * (jnp.maximum(1.0 + v, 0.0) @ x))


def _line_search(w, s, v, u, xs, ts, valid, c_pos, c_neg, line_steps):
  """Exact minimisers a [B] of the convex piecewise-quadratic phi(a) = f(w + a s), per row.

  Newton's method on phi', safeguarded by a bracket [lo, hi] with phi'(lo) < 0 < phi'(hi). On a
  piecewise quadratic it lands exactly on the minimiser once it is on the right piece, so the
  loop stops when every row has reached its fixed point instead of running all `line_steps`
  passes over [B, n].
  """
  dtype = w.dtype
  ws, ss = _rowdot(w, s), _rowdot(s, s)
  xs = jnp.where(valid, xs, 0.0)

  def cond(state):
    k, _, _, _, done = state
    return (k < line_steps) & ~jnp.all(done)

  def body(state):
    k, a, lo, hi, done = state
    mp = jnp.maximum(1.0 - u - a * ts, 0.0)
    mn = jnp.maximum(1.0 + v + a[:, None] * xs, 0.0)
    d1 = ws + a * ss - 2.0 * c_pos * mp * ts + 2.0 * c_neg * jnp.sum(mn * xs, -1)
    d2 = ss + 2.0 * c_pos * (mp > 0) * ts * ts + 2.0 * c_neg * jnp.sum(
        jnp.where(mn > 0, xs * xs, 0.0), -1)
    lo = jnp.where(d1 < 0, a, lo)
    hi = jnp.where(d1 > 0, a, hi)
    a_new = a - d1 / d2
    inside = (a_new > lo) & (a_new < hi)
    fallback = jnp.where(jnp.isfinite(hi), 0.5 * (lo + hi), 2.0 * a)
    a_new = jnp.where(d1 == 0, a, jnp.where(inside, a_new, fallback))
    a_new = jnp.where(done, a, a_new)
    return k + 1, a_new, lo, hi, done | (a_new == a)

  b = w.shape[0]
  _, a, _, _, _ = jax.lax.while_loop(
      cond, body, (0, jnp.ones((b,), dtype), jnp.zeros((b,), dtype),
                   jnp.full((b,), jnp.inf, dtype), jnp.zeros((b,), bool)))
  return a


def newton_step(t: jax.Array, w: jax.Array, prob: Problem, num_rows: int, line_steps: int = 12,
                pure_solve: bool = False, v: jax.Array | None = None,
                tx: jax.Array | None = None):
  """One semi-smooth Newton iteration with exact line search for a batch of targets.

  Written on whole batches (no vmap) so that every product with the candidates is a matrix
  product [B, D] x [D, n].

  Args:
    t: [B, D] augmented targets; w: [B, D] current weights.
    prob: the prepared candidate set.
    num_rows: r, the active-set size of the exact Newton step (static).
    line_steps: most safeguarded Newton steps of the exact line search.
    pure_solve: solve the [r, r] systems without LAPACK (`_spd_solve_pure`): for programs that
      run on several XLA:CPU devices at once, where the LAPACK kernels can deadlock.
    v: optional decision values w x^T [B, n] carried over from the previous step (the `v` this
      returns); None: formed here.
    tx: optional t x^T [B, n], fixed per target; None: formed here (with the Gram only).

  Returns:
    (new weights [B, D], a bound on the Newton step in decision-value units [B]: the step at w,
    or the exactly known, smaller step at the new weights when the active set did not change;
    violators at w [B], violators at the new weights [B], and the decision values at the new
    weights [B, n], updated as v + a x s).
  """
  x, valid, gram = prob.x, prob.valid, prob.gram
  c_pos, c_neg = prob.c_pos, prob.c_neg
  dtype = x.dtype
  tt = _rowdot(t, t)
  # Carrying v over (v + a x s) saves a product per step. Its rounding then adds up over the
  # steps taken, ~|a s| x^T each, which shrink as the iterates converge: on CIFAR-10 features
  # the solutions' distance to sklearn's did not change (max 1.0e-5 vs 9.6e-6, ad hoc), and
  # `finish` forms the returned decision values afresh from w.
  v = w @ x.T if v is None else v
  u = _rowdot(t, w)
  violators = (v > -1.0) & valid
  count = jnp.sum(violators, -1)
  # The violators' positions, padded (padding masked out). With more than r violators the
  # first r are used: H is replaced by a positive definite H' <= H, which still gives a descent
  # direction for the exact line search.
  idx, pos = _first_violators(violators, num_rows)
  mask = (jnp.arange(num_rows)[None, :] < count[:, None]).astype(dtype)
  g = _gradient(w, v, u, t, x, c_pos, c_neg)
  a_pos = 2.0 * c_pos * (u < 1.0)
  gamma = (1.0 - jax.lax.rsqrt(1.0 + a_pos * tt)) / tt
  gh = _half_precondition(g, t, gamma)
  # Generalised Hessian H = P + 2 c_neg B^T B, B = the violators' rows; Woodbury gives the exact
  # Newton step from an [r, r] system per target. P^-1/2 is applied to each side separately:
  # P^-1 applied at once to a vector with a large t component would cancel most of its float32
  # digits.
  eye = jnp.eye(num_rows, dtype=dtype)
  if gram is None:
    rows = x[idx] * mask[..., None]  # [B, r, D]
    rows_p = rows - (gamma[:, None] * jnp.einsum("brd,bd->br", rows, t))[..., None] * t[:, None]
    m = eye + 2.0 * c_neg * jnp.einsum("brd,bsd->brs", rows_p, rows_p)
    rhs = jnp.einsum("brd,bd->br", rows_p, gh)
    coef = _spd_solve(m, rhs, pure_solve)
    s = -_half_precondition(gh - 2.0 * c_neg * jnp.einsum("br,brd->bd", coef, rows_p), t,
                            gamma)
  else:
    # The same step from the shared Gram, without gathering candidate rows: the products with B
    # become full products with x (B t from t x^T, carried or formed here alongside x P^-1 g)
    # and a gather of [r, r] blocks.
    h = _half_precondition(gh, t, gamma)  # P^-1 g
    if tx is None:
      xh, tx = jnp.split(jnp.concatenate([h, t]) @ x.T, 2)
    else:
      xh = h @ x.T
    bh = jnp.take_along_axis(xh, idx, 1) * mask  # B P^-1 g
    bt = jnp.take_along_axis(tx, idx, 1) * mask  # B t
    m_t = eye + 2.0 * c_neg * (_gram_block(gram, idx, mask) - (
        (2.0 * gamma - gamma * gamma * tt)[:, None, None]
        * (bt[:, :, None] * bt[:, None, :])))  # I + 2 c_neg B P^-1 B^T, lower triangle
    coef = _spd_solve(m_t, bh, pure_solve)
    # coef spread over the candidates (zero off the active set), by gathering rather than
    # scattering: entry j is coef[pos_j] for the active violators.
    spread = jnp.where(violators & (pos < num_rows),
                       jnp.take_along_axis(coef, jnp.minimum(pos, num_rows - 1), 1), 0.0)
    btc = spread @ x  # B^T coef
    s = -_half_precondition(gh - 2.0 * c_neg * _half_precondition(btc, t, gamma), t, gamma)
  xs, ts = s @ x.T, _rowdot(t, s)
  # The Newton step in decision-value units, ||[x; t] H^-1 g||_inf: a norm of the gradient that
  # says directly how far any decision value may still move. The convergence test.
  step = jnp.maximum(jnp.max(jnp.abs(jnp.where(valid, xs, 0.0)), -1), jnp.abs(ts))
  a = _line_search(w, s, v, u, xs, ts, valid, c_pos, c_neg, line_steps)
  v_next = v + a[:, None] * xs
  next_violators = (v_next > -1.0) & valid
  next_count = jnp.sum(next_violators, -1)
  # The Newton step at the NEW weights, when it is known without another iteration. If the
  # step was exact (every violator in the active set) and the new weights have the same
  # violators and the same positive status, the objective is one quadratic Q on the whole segment
  # (each margin is linear in the step length, so a term that is off at both ends is off in
  # between). Then grad Q(w + a s) = (1 - a) grad Q(w) and the Newton step there is exactly
  # (1 - a) s: the primal-dual active-set certificate, which lets such a target skip the
  # verification iteration. In float32 the solve itself is off by a relative error delta
  # (~1e-3 seen on ill-conditioned candidate sets), which the line search only partly shows as
  # |1 - a|, so the bound is inflated: (CERT_FACTOR |1 - a| + CERT_SLACK) * step.
  same = (jnp.all(next_violators == violators, -1) & (count <= num_rows)
          & ((u + a * ts < 1.0) == (u < 1.0)))
  next_step = jnp.where(same, (CERT_FACTOR * jnp.abs(1.0 - a) + CERT_SLACK) * step, jnp.inf)
  return w + a[:, None] * s, jnp.minimum(step, next_step), count, next_count, v_next


def _gram_block(gram: jax.Array, idx: jax.Array, mask: jax.Array) -> jax.Array:
  """The LOWER triangles of the active sets' Gram blocks [B, r, r] (padding masked out).

  Only the lower triangle is gathered: the Cholesky factorisations (LAPACK, cuSOLVER and
  `_spd_solve_pure`) read nothing else, and the gather, one cache line of the [n, n] Gram per
  element, is a large part of a Newton step. Above the diagonal each entry repeats its column's
  diagonal entry (a cache hit). The block is built as the transpose of its upper triangle, read
  from the Gram's upper triangle (the only part of the Gram read anywhere): XLA then writes the
  row-major gather as it is into the column-major operand the LAPACK kernels take, instead of
  running down the Gram's columns. idx must be ascending over the unmasked entries (as
  `_first_violators` gives it).
  """
  rows = idx[:, :, None]
  block = gram.at[rows, jnp.maximum(rows, idx[:, None, :])].get(mode="promise_in_bounds")
  return jnp.swapaxes(block * (mask[:, :, None] * mask[:, None, :]), 1, 2)


def finish(targets: jax.Array, w: jax.Array, prob: Problem, iterations: jax.Array,
           step: jax.Array, tol: float):
  """Decision values [targets, n] (caller's order) and `SolverStats` of weights w [targets, D]."""
  t = _augment(targets.astype(prob.x.dtype))
  v = w @ prob.x.T
  u = _rowdot(t, w)
  g = _gradient(w, v, u, t, prob.x, prob.c_pos, prob.c_neg)
  tt = _rowdot(t, t)
  gamma = (1.0 - jax.lax.rsqrt(1.0 + 2.0 * prob.c_pos * (u < 1.0) * tt)) / tt
  return prob.caller_order(v), SolverStats(iterations, jnp.sum((v > -1.0) & prob.valid, -1),
                        jnp.linalg.norm(g, axis=-1),
                        jnp.linalg.norm(_half_precondition(g, t, gamma), axis=-1), step,
                        step <= tol)


def solve(targets: jax.Array, candidates: jax.Array, C: float = 0.1, valid: jax.Array | None = None,
          tol: float = 1e-5, max_iter: int = 50, num_rows: int = 192, line_steps: int = 12,
          shared_gram_max: int = 8192):
  """Solves the Exemplar-SVM of every target against one shared candidate set (traceable).

  One program for the whole batch: a `while_loop` of batched Newton steps that freezes the
  targets that have converged (their weights no longer change) until all have. `Solver` is the
  faster host-driven variant of the same iteration.

  Args:
    targets: [targets, d] target features (each the only positive of its SVM).
    candidates: [candidates, d] negatives shared by all targets.
    C: sklearn's C.
    valid: optional bool [candidates]; False marks padding rows, which are ignored (the class
      weights count only valid rows), so candidate sets of different sizes share one shape.
    tol: convergence tolerance in decision-value units: a target stops once its Newton step
      would move no decision value by more than `tol`.
    max_iter: Newton iterations per target.
    num_rows: r, the most margin violators the exact Newton step handles (an [r, r] Cholesky
      per iteration); with more violators the step is approximate and convergence slower.
    line_steps: most safeguarded Newton steps of the exact line search.
    shared_gram_max: with at most this many candidates, their [n, n] Gram is formed once and
      shared by all targets (each Newton step gathers from it); above, each step gathers rows.

  Returns:
    (weights [targets, d + 1] with the intercept last, decision values [targets, candidates]
    (padding columns meaningless), SolverStats with [targets] fields).
  """
  prob = prepare(candidates, C, valid, shared_gram_max)
  num_rows = min(num_rows, prob.x.shape[0])
  t = _augment(targets.astype(prob.x.dtype))
  b = t.shape[0]

  tx = None if prob.gram is None else t @ prob.x.T  # fixed per target (used with the Gram)

  def cond(state):
    _, _, it, step = state
    return jnp.any((it < max_iter) & (step > tol))

  def body(state):
    w, v, it, step = state
    live = (it < max_iter) & (step > tol)
    w_new, step_new, _, _, v_new = newton_step(t, w, prob, num_rows, line_steps, v=v, tx=tx)
    return (jnp.where(live[:, None], w_new, w), jnp.where(live[:, None], v_new, v),
            it + live.astype(it.dtype), jnp.where(live, step_new, step))

  w0 = initial_weights(targets, prob)
  init = (w0, w0 @ prob.x.T, jnp.zeros((b,), jnp.int32), jnp.full((b,), jnp.inf, prob.x.dtype))
  w, _, it, step = jax.lax.while_loop(cond, body, init)
  v, stats = finish(targets, w, prob, it, step, tol)
  return w, v, stats


@functools.partial(jax.jit, static_argnames=("max_iter", "num_rows", "line_steps",
                                             "return_stats"))
def esvm_scores(targets: jax.Array, candidates: jax.Array, C: float = 0.1, *, tol: float = 1e-5,
                max_iter: int = 50, num_rows: int = 192, line_steps: int = 12,
                return_stats: bool = False):
  """Exemplar-SVM decision values of every candidate for every target, as sklearn computes them.

  Each target's SVM is `sklearn.svm.LinearSVC(C, class_weight='balanced')` (squared hinge, L2
  penalty, intercept_scaling=1) fitted on the target (label 1) against all candidates (label 0);
  the result is its `decision_function` on the candidates. See `solve` for the options.

  Args:
    targets: [targets, d] float target features.
    candidates: [candidates, d] float candidate features, shared by all targets.
    C: sklearn's C.

  Returns:
    Decision values [targets, candidates] (higher = more similar to the target), plus
    `SolverStats` when `return_stats`.
  """
  candidates = jnp.asarray(candidates)
  if not jnp.issubdtype(candidates.dtype, jnp.floating):
    candidates = candidates.astype(jnp.float32)
  _, v, stats = solve(targets, candidates, C, tol=tol, max_iter=max_iter, num_rows=num_rows,
                      line_steps=line_steps)
  return (v, stats) if return_stats else v


# Active-set sizes of `Solver`: the exact Newton step costs an [r, r] Gram gather and Cholesky
# per target (cubic in r), so each target uses the smallest size that holds its violators.
ROW_BUCKETS = (64, 128, 160, 192, 224, 256, 320, 384, 512)

# Batch caps of `Solver` steps on CPU devices, per device: a step's [B, r, r] systems and its
# [B, n] arrays (decision values, steps, masks) are reread by several passes, which run fastest
# while they stay in the last-level cache. On a 2-core CPU with 32 MiB of L3 (a CIFAR-10 class,
# n = 5,000: B = 128 at r <= 128, 64 above), capping B r at 2^14 and B n at 2^20 took the
# benchmark's 1,000-target solve from ~1.8 s to ~1.5 s in an ad hoc A/B (batches of up to 1,024
# before). Accelerators take whole groups.
CPU_BATCH_ROWS = 1 << 14
CPU_BATCH_VALUES = 1 << 20


class Solver:
  """Host-driven batched Newton iterations: the fast path for many targets.

  `solve` runs one fixed-shape program: every target takes as many iterations as the slowest
  in its batch, each with an active set big enough for the target with the most margin
  violators. Here each Newton iteration is one compiled step, and between steps the host drops
  the targets that have converged and groups the rest by their current number of violators:
  each group takes its step with the smallest active-set size r in `ROW_BUCKETS` that holds its
  violators, in a batch padded to a power of two. Cost then follows the mean iteration count and
  the typical active set rather than the maxima. The iterates are those of `solve` wherever a
  target's violators fit in `max_rows` (exact Newton steps); with more violators the steps are
  approximate here too, but with fewer rows at first (`approx_rows`). On CPU devices a group's
  batches are also capped so that a step's working arrays stay in cache (`max_batch`). The
  per-target state (weights, decision values) stays on the device; only batch indices and a few
  [targets] counters cross between host and device per step. The grouping is deterministic.
  """

  def __init__(self, C: float = 0.1, tol: float = 1e-5, max_iter: int = 50,
               max_rows: int = 224, approx_rows: int = 64, approx_iters: int = 4,
               line_steps: int = 12, min_batch: int = 16, max_batch: int | None = None,
               mesh: jax.sharding.Mesh | None = None, shared_gram_max: int = 8192):
    """See `solve` for C, tol, max_iter, line_steps, shared_gram_max.

    Args:
      max_rows: the largest active-set size; beyond it steps are approximate (still convergent).
      approx_rows: active-set size of the approximate steps of targets with more than
        `max_rows` violators in their first `approx_iters` iterations (while the active set is
        still far from the optimum's): a bigger one barely improves those steps but costs
        cubically more. Later approximate steps use `max_rows`.
      approx_iters: see approx_rows.
      min_batch: smallest padded batch of a step.
      max_batch: largest batch of a step (rounded down to a power of two times the mesh size).
        None: on CPU devices, the largest power of two B per device with B r <= CPU_BATCH_ROWS
        and B n <= CPU_BATCH_VALUES (r the step's active-set size, n the candidates); on
        accelerators, no cap (bigger batches fill them better).
      mesh: optional 1-axis mesh; batches are sharded over its axis (padded to a multiple of
        its size). None: the default device.
    """
    self.C, self.tol, self.max_iter = float(C), float(tol), int(max_iter)
    self.line_steps = int(line_steps)
    self.rows = tuple(r for r in ROW_BUCKETS if r < max_rows) + (int(max_rows),)
    self.approx_rows = _bucket(min(int(approx_rows), int(max_rows)), self.rows)
    self.approx_iters = int(approx_iters)
    self.mesh = mesh
    self.num_devices = 1 if mesh is None else mesh.size
    self.min_batch = -(-int(min_batch) // self.num_devices) * self.num_devices
    if max_batch is not None and int(max_batch) < 1:
      raise ValueError(f"max_batch must be positive, got {max_batch}")
    self.max_batch = None if max_batch is None else int(max_batch)
    devices = jax.devices() if mesh is None else list(mesh.devices.flat)
    self.on_cpu = devices[0].platform == "cpu"
    self.shared_gram_max = int(shared_gram_max)
    self._steps: dict[int, Any] = {}
    self._replicated = (None if mesh is None else
                        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    # Several XLA:CPU devices running LAPACK kernels at once can deadlock (`_spd_solve_pure`):
    # such meshes solve without LAPACK, and the candidate set (one Cholesky) is prepared on one
    # device and then copied to all. Accelerators keep the LAPACK/cuSOLVER path.
    self.pure_solve = (mesh is not None and mesh.size > 1
                       and mesh.devices.flat[0].platform == "cpu")
    self._prepare = jax.jit(functools.partial(prepare, C=self.C,
                                              shared_gram_max=self.shared_gram_max))
    self._init = self._sharded(self._initial, (True, False), (False,) * 5)

  def _sharded(self, fn, in_specs, out_specs, donate_argnums=()):
    # fn sees the whole batch (mesh None) or its device's share of it (shard_map); state
    # arrays are replicated (PartitionSpec()), batch arrays split over the mesh axis (True).
    if self.mesh is None:
      return jax.jit(fn, donate_argnums=donate_argnums)
    spec = lambda split: jax.sharding.PartitionSpec(*self.mesh.axis_names[:int(split)])
    return jax.jit(jax.shard_map(fn, mesh=self.mesh, in_specs=tuple(map(spec, in_specs)),
                                 out_specs=tuple(map(spec, out_specs)), check_vma=False),
                   donate_argnums=donate_argnums)

  def _all(self, a: jax.Array) -> jax.Array:
    # Inside `_sharded`: every device's rows of a batch array, in order.
    if self.mesh is None:
      return a
    return jax.lax.all_gather(a, self.mesh.axis_names[0], tiled=True)

  def _initial(self, targets, prob):
    # The per-target state, replicated: augmented targets t, t x^T (fixed; only the Gram path
    # reads it), starting weights w, their decision values v = w x^T, and their violators.
    t = _augment(targets.astype(prob.x.dtype))
    w = initial_weights(targets, prob)
    v = w @ prob.x.T
    tx = t @ prob.x.T if prob.gram is not None else jnp.zeros((t.shape[0], 0), t.dtype)
    count = jnp.sum((v > -1.0) & prob.valid, -1)
    return tuple(self._all(a) for a in (t, tx, w, v, count))

  def _step(self, num_rows: int):
    if num_rows not in self._steps:
      def fn(t_all, tx_all, w_all, v_all, read, write, prob):
        # One Newton step of the targets `read`; their new weights and decision values are
        # written back to rows `write` of the state (out-of-range rows: padding, dropped).
        w, step, _, count, v_new = newton_step(
            t_all[read], w_all[read], prob, min(num_rows, prob.x.shape[0]), self.line_steps,
            self.pure_solve, v=v_all[read], tx=tx_all[read] if prob.gram is not None else None)
        write = self._all(write)
        w_all = w_all.at[write].set(self._all(w), mode="drop")
        v_all = v_all.at[write].set(self._all(v_new), mode="drop")
        return w_all, v_all, step, count
      self._steps[num_rows] = self._sharded(
          fn, (False,) * 4 + (True, True, False), (False, False, True, True),
          donate_argnums=(2, 3))
    return self._steps[num_rows]

  def prepare(self, candidates: jax.Array, valid: jax.Array | None = None) -> Problem:
    """The device-side candidate set, shared by every call (replicated over the mesh)."""
    if self.mesh is None:
      return self._prepare(candidates, valid=valid)
    first = self.mesh.devices.flat[0]
    put = lambda a: None if a is None else jax.device_put(a, first)
    return jax.device_put(self._prepare(put(candidates), valid=put(valid)), self._replicated)

  def _padded(self, sel: np.ndarray) -> np.ndarray:
    # A batch padded to a power of two (few compiled shapes); padding repeats a real target,
    # whose duplicate result is dropped.
    b = max(self.min_batch, 1 << int(np.ceil(np.log2(len(sel)))))
    b = -(-b // self.num_devices) * self.num_devices
    return np.concatenate([sel, np.full((b - len(sel),), sel[0])])

  def __call__(self, targets: np.ndarray, prob: Problem):
    """Solves every target against `prob`.

    The targets' state (weights, decision values, t x^T) stays on the device(s) between steps,
    replicated over the mesh: each step reads and writes the rows of its batch, and only the
    batch's indices, last Newton steps and violator counts cross between host and device.

    Args:
      targets: [targets, d] host array.
      prob: from `prepare`.

    Returns:
      Host arrays: weights [targets, d + 1], iterations [targets], last Newton step [targets].
    """
    targets = np.asarray(targets, np.float32)
    n = len(targets)
    pad = self._padded(np.arange(n))
    t_all, tx_all, w_all, v_all, count = self._init(targets[pad], prob)
    count = np.array(count[:n])
    it = np.zeros((n,), np.int32)
    step = np.full((n,), np.inf, np.float32)
    while True:
      active = np.flatnonzero((step > self.tol) & (it < self.max_iter))
      if not len(active):
        break
      # The counts are exact: they come from the decision values the next step starts from.
      rows = np.asarray(self.rows)
      sizes = rows[np.minimum(np.searchsorted(rows, count[active]), len(rows) - 1)]
      # More violators than max_rows: approximate steps, with few rows while the active set is
      # still far from the optimum's (the first iterations), then with max_rows (a target whose
      # optimum has more violators than max_rows converges only linearly, faster with more rows).
      big = count[active] > self.rows[-1]
      sizes[big] = np.where(it[active][big] < self.approx_iters, self.approx_rows, self.rows[-1])
      # Groups smaller than a minimal batch join the next larger size (a bigger active set is
      # still exact): fewer small calls and fewer compiled shapes.
      present = np.unique(sizes)
      for small, larger in zip(present[:-1], present[1:]):
        if np.sum(sizes == small) < self.min_batch:
          sizes[sizes == small] = larger
      # Every batch of this round is dispatched before any result is read, so that the host's
      # bookkeeping overlaps the device's work.
      pending = []
      for r in np.unique(sizes):
        for sel in self._split(active[sizes == r], self._batch_cap(int(r), prob.x.shape[0])):
          read = self._padded(sel).astype(np.int32)
          write = np.where(np.arange(len(read)) < len(sel), read, len(pad)).astype(np.int32)
          w_all, v_all, out_step, out_count = self._step(int(r))(
              t_all, tx_all, w_all, v_all, read, write, prob)
          pending.append((sel, out_step, out_count))
      for sel, out_step, out_count in pending:
        step[sel], count[sel] = np.asarray(out_step)[:len(sel)], np.asarray(out_count)[:len(sel)]
      it[active] += 1
    return np.array(w_all)[:n], it, step

  def _batch_cap(self, num_rows: int, num_candidates: int) -> int | None:
    """The most targets of one step with r = num_rows (see `max_batch`); None: no cap."""
    if self.max_batch is not None:
      per_device = max(1, self.max_batch // self.num_devices)
    elif self.on_cpu:
      per_device = min(CPU_BATCH_ROWS // num_rows, CPU_BATCH_VALUES // num_candidates)
    else:
      return None
    per_device = 1 << int(np.floor(np.log2(max(1, per_device))))
    return max(self.min_batch, per_device * self.num_devices)

  def _split(self, sel: np.ndarray, cap: int | None = None) -> list[np.ndarray]:
    # Batches of at most `cap` targets. Power-of-two batches (few compiled shapes) without much
    # padding: a group that would waste more than a quarter of its padded batch is cut into the
    # largest power of two that fits and the rest (e.g. 140 -> 128 + 16 rather than 256).
    if cap is not None and len(sel) > cap:
      return [part for i in range(0, len(sel), cap) for part in self._split(sel[i:i + cap])]
    parts = []
    while len(sel):
      b = len(self._padded(sel))
      if len(sel) < 0.75 * b and len(sel) > self.min_batch:
        b //= 2
        parts.append(sel[:b])
        sel = sel[b:]
      else:
        parts.append(sel)
        break
    return parts


def _bucket(value: int, sizes: tuple[int, ...]) -> int:
  for size in sizes:
    if size >= value:
      return size
  return sizes[-1]

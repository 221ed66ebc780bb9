"""Batched Exemplar-SVMs: sklearn's LinearSVC problem, solved exactly for many targets at once.

For a target t and candidates x_1..x_n (all negatives), `LinearSVC(C, class_weight='balanced')`
(squared hinge, L2 penalty, intercept_scaling=1) is liblinear's primal problem on [x, 1]:

  min_w  0.5 ||w||^2 + c_pos max(0, 1 - w.t)^2 + c_neg sum_i max(0, 1 + w.x_i)^2,

c_pos = C (n + 1) / 2, c_neg = C (n + 1) / (2 n). It is strictly convex, so any exact solver gives
sklearn's decision values w.x_i. Here: semi-smooth Newton with an exact line search on whole
batches of targets (`newton_step`). The generalised Hessian is H = P + 2 c_neg B^T B, with
P = I + 2 c_pos [t.w < 1] t t^T and B the margin violators' rows (w.x_i > -1); near the optimum
few candidates usually violate, so Woodbury gives the exact step from an [r, r] Cholesky (r <=
`max_rows`); with more violators (weak encoders, small feature norms), `pcg_step` solves the
same system by preconditioned CG, exact too at a cost independent of r: in d-space, or for sets
with fewer candidates than ~2 D (ImageNet's classes) in candidate space through the shared Gram.
Far from the optimum a Woodbury step may take a coarse form (`newton_step`'s `coarse`: half the
products with the candidates, accurate to ~1e-4), never a convergence test. Convergence is the
Newton step in decision-value units (`NewtonStep.step`): in float32 the plain ||g|| stalls near
eps c_pos ||t||^2 ||w||.

`solve` iterates in one program; `solver.Solver` schedules the same steps from the host, faster
for many targets. Everything is float32 and deterministic. The entry points `esvm_scores` and
`solve` check their inputs (`check_problem`); `esvm_scores` also its result (`check_solution`).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxattr.attribute import linalg
from jaxattr.attribute.options import AttributionError, NotConvergedError, SolverOptions


class SolverStats(NamedTuple):
  """Per-target solver diagnostics, each [targets].

  Attributes:
    iterations: Newton iterations taken.
    num_violators: margin violators (w.x_i > -1) at the returned weights; steps are exact while
      this is at most `max_rows`.
    grad_norm: ||gradient|| (in float32 not below about eps c_pos ||t||^2 ||w||).
    scaled_grad_norm: sqrt(g^T P^-1 g), the positive's stiff direction scaled out.
    newton_step: the last `NewtonStep.step`, the convergence test.
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


class CandidateSet(NamedTuple):
  """One candidate set, prepared once on the device and shared by all targets (`prepare`).

  Candidate-indexed arrays are in the solver's order (`inverse`); `finish` and `solve` return
  decision values in the caller's.

  Attributes:
    x: [n, D] augmented candidates (D = d + 1), padding rows all zero (they add nothing to sums).
    valid: [n] bool, False on padding rows.
    gram: x x^T [n, n] (upper triangle), shared by all targets; None: steps gather rows instead.
    ridge_chol: [D, D] the lower Cholesky factor of A = I + 2 c_neg x_K^T x_K over the K =
      `SolverOptions.init_rows` smallest-norm candidates, for `initial_weights`.
    ridge_rhs: [D] A^-1 x_K^T 1.
    c_pos, c_neg: the balanced class weights (scalars).
    inverse: int32 [n]: row inverse[i] is the caller's candidate i. Valid candidates come sorted
      by norm, smallest first: near the origin a decision value is near the intercept for every
      target, so these violate for most targets and their Gram corner is what steps read most.
    pcg_vectors: [D, D] V, the eigenvectors of x^T x (ascending eigenvalues `pcg_values` [D]):
      the shared part of the preconditioner of `pcg_step` in d-space (`_dspace_cg`), which needs
      a target's own share of violating candidates (rho) in K = I + 2 c_neg rho x^T x, and its
      last k = DSPACE_RANK columns U, the candidates' dominant directions, where the target's
      Hessian is taken exactly. None until `with_pcg` (only sets where some target has many
      violators need it), and None for sets that take CG steps in candidate space instead
      (`gram_cg`).
    pcg_values: [D] the eigenvalues of x^T x (clamped at 0). None with pcg_vectors.
    pcg_xbasis: [n, k] x U. None with pcg_vectors.
    pcg_pairs: [n, k * k] the products (x U)_i (x U)_j of every candidate, so that a target's
      U^T X^T diag(violators) X U is one [B, n] x [n, k * k] product. None with pcg_vectors.
    gram_basis: [n, k] V = U sqrt(2 c_neg Lambda) for the Gram's top-k eigenpairs (U, Lambda):
      V V^T ~ 2 c_neg x x^T. The shared part of the preconditioner of `pcg_step` in candidate
      space (`gram_cg` sets); None until `with_pcg`, and for other sets.
    feature_basis: [D, k] W = x^T U Lambda^-1/2, orthonormal: the same directions in d-space
      (x ~ U Lambda^1/2 W^T), which place a target's rank-one term in that preconditioner.
  """

  x: jax.Array
  valid: jax.Array
  gram: jax.Array | None
  ridge_chol: jax.Array
  ridge_rhs: jax.Array
  c_pos: jax.Array
  c_neg: jax.Array
  inverse: jax.Array
  pcg_vectors: jax.Array | None = None
  gram_basis: jax.Array | None = None
  feature_basis: jax.Array | None = None
  pcg_values: jax.Array | None = None
  pcg_xbasis: jax.Array | None = None
  pcg_pairs: jax.Array | None = None

  @property
  def has_pcg(self) -> bool:
    """Whether `with_pcg` has formed the preconditioner of `pcg_step`."""
    return self.pcg_vectors is not None or self.gram_basis is not None

  def caller_order(self, a: jax.Array) -> jax.Array:
    """A [..., n] candidate-indexed array of the solver's order in the caller's order."""
    return a[..., self.inverse]


def prepare(candidates: jax.Array, options: SolverOptions, valid: jax.Array | None = None,
            pcg: bool = True) -> CandidateSet:
  """Augments the candidates [n, d], masks padding, forms what all targets share (traceable).

  `valid` (bool [n]) marks real rows; the class weights count only those. Of the options, C,
  shared_gram_max and init_rows are read. pcg=False leaves the CG preconditioner to `with_pcg`.
  """
  C = options.C
  n = candidates.shape[0]
  candidates = candidates.astype(
      jnp.float32) if not jnp.issubdtype(candidates.dtype, jnp.floating) else candidates
  dtype = candidates.dtype
  if valid is None:
    valid = jnp.ones((n,), bool)
  # The solver's order (`CandidateSet.inverse`): valid candidates by norm, then the padding.
  order = jnp.argsort(jnp.where(valid, jnp.sum(candidates * candidates, -1), jnp.inf), stable=True)
  candidates, valid = candidates[order], valid[order]
  inverse = jnp.argsort(order).astype(jnp.int32)
  count = jnp.sum(valid).astype(dtype)
  c_pos, c_neg = C * (count + 1) / 2.0, C * (count + 1) / (2.0 * count)
  x = _augment(candidates) * valid[:, None].astype(dtype)
  gram = _upper_gram(x) if n <= options.shared_gram_max else None
  rows = max(1, min(int(options.init_rows), n))
  ridge_chol, ridge_rhs = _ridge(x, c_neg, rows, rows)  # valid rows first; padding rows are zero
  cset = CandidateSet(x, valid, gram, ridge_chol, ridge_rhs, c_pos, c_neg, inverse)
  return with_pcg(cset) if pcg else cset


def with_pcg(cset: CandidateSet) -> CandidateSet:
  """`cset` with the preconditioner of `pcg_step`, formed once per set when a step first needs it.

  Candidate-space sets (`gram_cg`): `gram_basis`, from the shared Gram by a randomized subspace
  iteration (two [n, n] x [n, k + 8] products and small QR/eigh: milliseconds). Others: the
  d-space preconditioner (`with_dspace_pcg`).
  """
  if gram_cg(cset):
    v, w = _gram_basis(cset.x, cset.gram, cset.c_neg, GRAM_CG_RANK)
    return cset._replace(gram_basis=v, feature_basis=w)
  return with_dspace_pcg(cset)


def with_dspace_pcg(cset: CandidateSet) -> CandidateSet:
  """`cset` with the d-space preconditioner of `pcg_step` (`pcg_vectors`, `pcg_values`,
  `pcg_xbasis`, `pcg_pairs`), whatever `gram_cg` says: an [n, D] x [D, n] product and a [D, D]
  eigendecomposition (13 ms at D = 513, 0.4 s at D = 2,049 on this 2-core CPU).

  Through the eigendecomposition, each target's K = I + 2 c_neg rho x^T x takes its own rho
  (measured on random-init Flax features, 250-320 of 5,000 candidates violating, whose x^T x has a
  slowly decaying spectrum: 18-22 CG iterations with a shared rho = 0.5, 13-14 with the target's
  own).
  """
  x = cset.x
  xtx = x.T @ x
  values, vectors = jnp.linalg.eigh(0.5 * (xtx + xtx.T))
  k = min(DSPACE_RANK, x.shape[1])
  xb = x @ vectors[:, -k:]
  pairs = (xb[:, :, None] * xb[:, None, :]).reshape(x.shape[0], k * k)
  return cset._replace(pcg_vectors=vectors, pcg_values=jnp.maximum(values, 0.0), pcg_xbasis=xb,
                       pcg_pairs=pairs)


# `pcg_step` in candidate space (`gram_cg`): rank of the shared preconditioner's basis. Measured on
# ImageNet-shaped classes (norm 29, 250-370 violators): the Gram has one dominant eigenvalue (the
# features' mean direction, 2 c_neg lambda ~ 1e5) and then a fast decay (41, 17, 10, ...); CG takes
# 12-15 iterations without a preconditioner, 5 with rank 16, 4 with 32 and 64.
GRAM_CG_RANK = 32
# `pcg_step` in d-space: rank k of the subspace (top eigenvectors of x^T x) in which the
# preconditioner is each target's exact Hessian (`_dspace_cg`). Measured in float64 (CG to 1e-5):
# at the optimum of many-violator targets (hard_torch: 2 c_neg x^T x has eigenvalues 624, 6.4, 1.8,
# 1.0, 0.6, ...) 5-6 iterations without it, 4 with k = 8, 3-4 with 16, 3 with 32 and 64; on
# random-init Flax features after the early steps (eigenvalues 3.5e5, 1,578, 580, 312, ..., 30 at
# the 20th) 22-23 without, 13-14 with 16, 10-11 with 32. The target's share of A costs a [B, n] x
# [n, k^2] product per Newton step, a quarter of a product with the candidates at k = 16.
DSPACE_RANK = 16
# Sets of at most this many candidates hold their whole Gram (`_upper_gram`), which candidate-space
# CG reads as a symmetric matrix.
GRAM_FULL = 2048


def gram_cg(cset: CandidateSet) -> bool:
  """Whether `pcg_step` runs CG in candidate space (static: shapes only).

  A CG iteration costs an [n, n] product with the shared Gram there, against two [n, D] products
  and a [D, D] one in d-space: cheaper when the set has fewer candidates than ~2 D (ImageNet's
  classes of 732-1,300 images at D = 2,049).
  """
  n, dim = cset.x.shape
  k = min(GRAM_CG_RANK, n)
  return (cset.gram is not None and n <= GRAM_FULL and n * n + 2 * n * k < 2 * n * dim + dim * dim)


def _gram_basis(x: jax.Array, gram: jax.Array, c_neg: jax.Array,
                rank: int) -> tuple[jax.Array, jax.Array]:
  """(`CandidateSet.gram_basis`, `CandidateSet.feature_basis`) for the top-k eigenpairs of the
  Gram x x^T, by a randomized subspace iteration (seeded: deterministic) and Rayleigh-Ritz. Any
  basis gives a positive definite preconditioner; a good one, fewer iterations."""
  n = gram.shape[0]
  q = min(rank + 8, n)
  k = min(rank, q)
  y = gram @ jax.random.normal(jax.random.PRNGKey(0), (n, q), gram.dtype)
  y = jnp.linalg.qr(gram @ jnp.linalg.qr(y)[0])[0]
  small = y.T @ gram @ y
  lam, vec = jnp.linalg.eigh(0.5 * (small + small.T))
  u, lam = y @ vec[:, -k:], lam[-k:]
  keep = lam > 1e-6 * jnp.max(lam)  # drop null directions (rank-deficient features)
  lam = jnp.where(keep, lam, 0.0)
  feature = (x.T @ u) * jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, lam, 1.0)), 0.0)
  return u * jnp.sqrt(2.0 * c_neg * lam), feature


def _ridge(x: jax.Array, c_neg: jax.Array, k: jax.Array | int,
           rows: int) -> tuple[jax.Array, jax.Array]:
  """(lower Cholesky factor of A, A^-1 x_K^T 1) of `initial_weights` with the first k (<= rows,
  static) rows of x."""
  x_k = x[:rows] * (jnp.arange(rows) < k)[:, None].astype(x.dtype)
  chol = jnp.linalg.cholesky(jnp.eye(x.shape[1], dtype=x.dtype) + 2.0 * c_neg * (x_k.T @ x_k))
  return chol, jax.scipy.linalg.cho_solve((chol, True), jnp.sum(x_k, 0))


def _upper_gram(x: jax.Array, block: int = 1024) -> jax.Array:
  """x x^T where only the upper triangle is meaningful (below it: zeros or x x^T entries).

  `_gram_block` reads nothing else, so sets of more than GRAM_FULL rows form only each row block's
  products with the rows from its own start on (its rounding need not be symmetric either);
  smaller ones the whole product (`gram_cg` reads it whole).
  """
  n = x.shape[0]
  if n <= GRAM_FULL:
    return x @ x.T
  gram = jnp.zeros((n, n), x.dtype)
  for start in range(0, n, block):
    gram = jax.lax.dynamic_update_slice(gram, x[start:start + block] @ x[start:].T, (start, start))
  return gram


def initial_weights(targets: jax.Array, cset: CandidateSet) -> jax.Array:
  """Starting weights [targets, D]: the minimiser with the `init_rows` smallest-norm candidates
  inside their margin and the others ignored.

  A ridge regression whose Hessian A + 2 c_pos t t^T differs between targets by a rank-one term:
  one shared Cholesky factor plus Sherman-Morrison. Those candidates are most targets' violators
  at the optimum (`CandidateSet.inverse`), so this starts closer than counting all of them, or w = 0
  (which swings to w ~ t, every negative violating). The Newton steps make the result exact.
  """
  t = _augment(targets.astype(cset.x.dtype))
  k = 2.0 * cset.c_pos
  p = jax.scipy.linalg.cho_solve((cset.ridge_chol, True), t.T).T  # A^-1 t  [targets, D]
  a_b = k * p - 2.0 * cset.c_neg * cset.ridge_rhs  # A^-1 b, b = k t - 2 c_neg x_K^T 1
  tb = jnp.sum(t * a_b, -1, keepdims=True)
  tp = jnp.sum(t * p, -1, keepdims=True)
  return a_b - k * p * tb / (1.0 + k * tp)


# Safety margins of the active-set certificate in `newton_step` (relative to the step taken).
CERT_FACTOR = 10.0
CERT_SLACK = 1e-3


def _first_violators(violators: jax.Array, rows: int) -> tuple[jax.Array, jax.Array]:
  """Positions of each row's first r = `rows` violators (bool [B, n]), and their ranks.

  Returns:
    (idx int32 [B, r]: the first r violators, ascending, entries past a row's count clamped to
    n - 1 (to be masked); pos int32 [B, n]: violators before each candidate (its slot in idx)).
    `jnp.nonzero(size=r)` per row, by a binary search in the running count instead of a scatter
    over all B x n entries, which XLA:CPU runs several times slower.
  """
  n = violators.shape[1]
  running = jnp.cumsum(violators, axis=1, dtype=jnp.int32)  # [B, n]
  ranks = jnp.arange(1, rows + 1, dtype=jnp.int32)
  idx = jax.vmap(lambda c: jnp.searchsorted(c, ranks, side="left"))(running)
  return jnp.minimum(idx, n - 1).astype(jnp.int32), running - 1


def _rowdot(a, b):
  return jnp.sum(a * b, -1)


def _half_precondition(r, t, gamma):
  # P^-1/2 r for P = I + 2 c_pos [u < 1] t t^T: P^-1/2 = I - gamma t t^T, per row. c_pos grows
  # with the number of candidates, so t is by far the stiffest direction of H.
  return r - (gamma * _rowdot(r, t))[:, None] * t


def _gradient(w, v, u, t, x, c_pos, c_neg):
  # v = w x^T (decision values) [B, n], u = t.w [B]. Padding rows of x are zero: no effect.
  return (w - (2.0 * c_pos * jnp.maximum(1.0 - u, 0.0))[:, None] * t + 2.0 * c_neg *
          (jnp.maximum(1.0 + v, 0.0) @ x))


# `_line_search`: a row is done once its Newton correction is at most this many rounding units
# (the dtype's eps) of its step length, or moves no decision value by more than one rounding unit
# (values near the margin are ~1). Near the root, phi' (a sum over every candidate) is rounding
# noise: in float32 the corrections stall at 1e-7-1e-5 of a instead of reaching a fixed point
# (1e-4-1e-3 on the tiny steps of nearly converged targets), and before these tests (and with the
# bracket sending a converged row to the bisection), over half of the rows ran to `line_steps`,
# and with them nearly every batch. Measured on random-init Flax features (1,000 targets of class
# 0): 727 instead of 1,394 loop iterations in all with the first test, Newton iterations 5.67
# instead of 5.71 (max 8 instead of 11); paired A/B 1.09-1.10x, then 1.05x for the second test.
LINE_TOL = 100.0


def _line_search(w, s, v, u, xs, ts, valid, c_pos, c_neg, line_steps, reach):
  """(a [B], loop iterations): exact minimisers of the convex piecewise-quadratic
  phi(a) = f(w + a s), per row, and how many iterations the batch took.

  Newton on phi', safeguarded by a bracket with phi'(lo) < 0 < phi'(hi): exact once on the right
  piece. A row is done when its Newton correction is at most LINE_TOL rounding units of a, or
  moves no decision value by more than a rounding unit (phi' is a sum of thousands of terms whose
  rounding makes finer corrections noise), so the loop stops when every row is done, not after
  all `line_steps`. reach [B]: max(|x s| over valid candidates, |t.s|), the most a unit of a moves
  a decision value (`_advance`'s convergence bound).
  """
  dtype = w.dtype
  eps = jnp.finfo(dtype).eps
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
    correction = d1 / d2
    a_new = a - correction
    # A settled row keeps its a: tested before the bracket, which has a at one end and would send
    # a converged row's own tiny correction to the bisection.
    settled = ((d1 == 0) | (jnp.abs(correction) <= LINE_TOL * eps * jnp.abs(a)) |
               (jnp.abs(correction) * reach <= eps))
    inside = (a_new > lo) & (a_new < hi)
    fallback = jnp.where(jnp.isfinite(hi), 0.5 * (lo + hi), 2.0 * a)
    a_new = jnp.where(settled, a, jnp.where(inside, a_new, fallback))
    a_new = jnp.where(done, a, a_new)
    return k + 1, a_new, lo, hi, done | (a_new == a)

  b = w.shape[0]
  steps, a, _, _, _ = jax.lax.while_loop(cond, body, (0, jnp.ones(
      (b,), dtype), jnp.zeros((b,), dtype), jnp.full((b,), jnp.inf, dtype), jnp.zeros((b,), bool)))
  return a, steps


class NewtonStep(NamedTuple):
  """One `newton_step` of B targets: new weights w [B, D] and decision values v [B, n], margin
  violators before (count [B]) and after (next_count [B]), and step [B], a bound on the Newton
  step in decision-value units (the step taken, or the known smaller one at the new weights).
  """

  w: jax.Array
  step: jax.Array
  count: jax.Array
  next_count: jax.Array
  v: jax.Array


def newton_step(t: jax.Array, w: jax.Array, cset: CandidateSet, rows: int, line_steps: int,
                pure_solve: bool = False, v: jax.Array | None = None, tx: jax.Array | None = None,
                coarse: bool = False) -> NewtonStep:
  """One semi-smooth Newton iteration with exact line search for a batch of targets.

  Written on whole batches (no vmap): every product with the candidates is [B, D] x [D, n].

  Args:
    t, w: [B, D] augmented targets and their current weights.
    cset: the prepared candidate set.
    rows: r, the active-set size of the exact Newton step (static).
    line_steps: most safeguarded Newton steps of the exact line search.
    pure_solve: solve the [r, r] systems without LAPACK (`linalg.cholesky`).
    v: optional decision values w x^T [B, n], the previous step's `NewtonStep.v`.
    tx: optional t x^T [B, n], fixed per target (read with the Gram only).
    coarse: the caller knows that every target has at most r violators and is still far from
      its optimum (a Python bool, or a traced scalar that picks the form at run time in one
      program; read with the Gram only): `_coarse_step`, two products with the
      candidates instead of four, accurate to ~1e-4 in decision values. Its `NewtonStep.step`
      measures progress only: the caller must not take it as converged (nor does the
      active-set certificate apply).
  """
  x, valid, gram = cset.x, cset.valid, cset.gram
  c_pos, c_neg = cset.c_pos, cset.c_neg
  dtype = x.dtype
  tt = _rowdot(t, t)
  # Carried over (v + a x s): a product fewer per step; `finish` forms the returned v afresh.
  v = w @ x.T if v is None else v
  u = _rowdot(t, w)
  violators = (v > -1.0) & valid
  count = jnp.sum(violators, -1)
  # With more than r violators the first r are used: H is replaced by a positive definite
  # H' <= H, which still gives a descent direction for the exact line search.
  idx, pos = _first_violators(violators, rows)
  mask = (jnp.arange(rows)[None, :] < count[:, None]).astype(dtype)
  a_pos = 2.0 * c_pos * (u < 1.0)
  gamma = (1.0 - jax.lax.rsqrt(1.0 + a_pos * tt)) / tt
  if gram is not None and coarse is not False:
    tx = t @ x.T if tx is None else tx
    args = (t, w, v, u, tx, cset, idx, pos, mask, violators, a_pos, gamma, pure_solve)
    if coarse is True:
      s = _coarse_step(*args)
    else:  # a traced flag: one program for both forms (half the compiling of two)
      s = jax.lax.cond(coarse, lambda: _coarse_step(*args), lambda: _accurate_step(*args))
    return _advance(t, w, s, v, u, cset, line_steps, violators, count,
                    jnp.logical_not(coarse) & (count <= rows))
  g = _gradient(w, v, u, t, x, c_pos, c_neg)
  gh = _half_precondition(g, t, gamma)
  # Woodbury on H = P + 2 c_neg B^T B. P^-1/2 goes to each side separately: P^-1 at once, on a
  # vector with a large t component, would cancel most of its float32 digits.
  eye = jnp.eye(rows, dtype=dtype)
  if gram is None:
    b_rows = x[idx] * mask[..., None]  # [B, r, D]
    proj = gamma[:, None] * jnp.einsum("brd,bd->br", b_rows, t)
    rows_p = b_rows - proj[..., None] * t[:, None]
    m = eye + 2.0 * c_neg * jnp.einsum("brd,bsd->brs", rows_p, rows_p)
    rhs = jnp.einsum("brd,bd->br", rows_p, gh)
    coef = linalg.spd_solve(m, rhs, pure_solve)
    s = -_half_precondition(gh - 2.0 * c_neg * jnp.einsum("br,brd->bd", coef, rows_p), t, gamma)
  else:
    s = _accurate_step(t, w, v, u, tx, cset, idx, pos, mask, violators, a_pos, gamma, pure_solve,
                       g=g)
  return _advance(t, w, s, v, u, cset, line_steps, violators, count, count <= rows)


def _accurate_step(t, w, v, u, tx, cset: CandidateSet, idx, pos, mask, violators, a_pos, gamma,
                   pure_solve, g=None):
  # `newton_step`'s Woodbury step from the shared Gram: products with B become products with x
  # (B t from t x^T) and a gather of [r, r] blocks, instead of gathering [r, D] candidate rows.
  x, gram, c_neg = cset.x, cset.gram, cset.c_neg
  tt = _rowdot(t, t)
  g = _gradient(w, v, u, t, x, cset.c_pos, c_neg) if g is None else g
  gh, xh, tx = _preconditioned_values(g, t, gamma, x, tx)
  bh = jnp.take_along_axis(xh, idx, 1) * mask  # B P^-1 g
  bt = jnp.take_along_axis(tx, idx, 1) * mask  # B t
  m_t = _active_system(gram, idx, mask, bt, 2.0 * gamma - gamma * gamma * tt, c_neg)
  coef = linalg.spd_solve(m_t, bh, pure_solve)
  btc = _spread(coef, violators, pos) @ x  # B^T coef
  return -_half_precondition(gh - 2.0 * c_neg * _half_precondition(btc, t, gamma), t, gamma)


def _coarse_step(t, w, v, u, tx, cset: CandidateSet, idx, pos, mask, violators, a_pos, gamma,
                 pure_solve):
  """`newton_step`'s Woodbury step through the Gram, when B holds every violator, from two
  products with the candidates instead of four.

  The gradient is g = f + 2 c_neg B^T q with f = w - alpha t (alpha = 2 c_pos (1 - t.w)+) and
  q = 1 + B w; with M = I + 2 c_neg B P^-1 B^T and H^-1 B^T = P^-1 B^T M^-1,

    s = -H^-1 g = -P^-1 (f - 2 c_neg B^T z),   z = M^-1 (B P^-1 f - q),

  where B P^-1 f comes from B w and B t, both known (v and t x^T): neither g nor B P^-1 g takes a
  product with the candidates, B^T z is the only one (the line search's x s is the other).
  Exact in exact arithmetic, but in float32 z tends to -q (order 1) as the step vanishes, so the
  solve's relative error (~cond(M) eps) stays in the step at ~1e-4 in decision values (measured
  on random-init Flax features), where the accurate form's coefficients vanish with the gradient:
  a step for targets still far from their optimum only.
  """
  x, gram, c_pos, c_neg = cset.x, cset.gram, cset.c_pos, cset.c_neg
  tt = _rowdot(t, t)
  kappa = 2.0 * gamma - gamma * gamma * tt  # P^-1 = I - kappa t t^T
  alpha = 2.0 * c_pos * jnp.maximum(1.0 - u, 0.0)
  bv = jnp.take_along_axis(v, idx, 1) * mask  # B w
  bt = jnp.take_along_axis(tx, idx, 1) * mask  # B t
  # B P^-1 f = B w - kappa (B t)(t.w) - alpha B t / (1 + a_pos t.t): P^-1 t = t / (1 + a_pos t.t)
  # written out, not as alpha (1 - kappa t.t) B t, which cancels most of float32's digits.
  y = bv - bt * (kappa * u + alpha / (1.0 + a_pos * tt))[:, None]
  z = linalg.spd_solve(_active_system(gram, idx, mask, bt, kappa, c_neg), (y - (1.0 + bv)) * mask,
                       pure_solve)
  f = w - alpha[:, None] * t
  return -_half_precondition(
      _half_precondition(f - 2.0 * c_neg * (_spread(z, violators, pos) @ x), t, gamma), t, gamma)


def _preconditioned_values(g, t, gamma, x, tx):
  """(P^-1/2 g, (P^-1 g) x^T [B, n], t x^T [B, n]): t x^T formed in the same product when not
  given."""
  gh = _half_precondition(g, t, gamma)
  h = _half_precondition(gh, t, gamma)  # P^-1 g
  if tx is None:
    xh, tx = jnp.split(jnp.concatenate([h, t]) @ x.T, 2)
    return gh, xh, tx
  return gh, h @ x.T, tx


def _active_system(gram, idx, mask, bt, kappa, c_neg):
  # M = I + 2 c_neg B P^-1 B^T [B, r, r] (lower triangle) from the shared Gram, with
  # P^-1 = I - kappa t t^T and bt = B t.
  block = _gram_block(gram, idx, mask) - kappa[:, None, None] * (bt[:, :, None] * bt[:, None, :])
  return jnp.eye(idx.shape[1], dtype=gram.dtype) + 2.0 * c_neg * block


def _spread(coef, violators, pos):
  # coef [B, r] over the first r violators, spread over the candidates [B, n] (zero elsewhere) by
  # a gather rather than a scatter.
  rows = coef.shape[1]
  return jnp.where(violators & (pos < rows), jnp.take_along_axis(coef, jnp.minimum(pos, rows - 1),
                                                                 1), 0.0)


def _advance(t, w, s, v, u, cset: CandidateSet, line_steps: int, violators, count,
             exact) -> NewtonStep:
  """The exact line search along the step direction s [B, D] and the convergence bound.

  `exact` [B]: s is the Newton step (to the solve's rounding), so the active-set certificate
  below may bound the next one.
  """
  x, valid = cset.x, cset.valid
  xs, ts = s @ x.T, _rowdot(t, s)
  # The convergence test: ||[x; t] H^-1 g||_inf, how far any decision value may still move.
  step = jnp.maximum(jnp.max(jnp.abs(jnp.where(valid, xs, 0.0)), -1), jnp.abs(ts))
  a, _ = _line_search(w, s, v, u, xs, ts, valid, cset.c_pos, cset.c_neg, line_steps, step)
  v_next = v + a[:, None] * xs
  next_violators = (v_next > -1.0) & valid
  next_count = jnp.sum(next_violators, -1)
  # The primal-dual active-set certificate: if the step was exact and the new weights have the
  # same violators and positive status, the objective is one quadratic on the whole segment, so
  # the Newton step there is exactly (1 - a) s and the target skips a verifying iteration. The
  # float32 solve is itself off by a relative error (~1e-3 on ill-conditioned sets) that |1 - a|
  # shows only in part, hence the inflated bound.
  same = (jnp.all(next_violators == violators, -1) & exact & ((u + a * ts < 1.0) == (u < 1.0)))
  next_step = jnp.where(same, (CERT_FACTOR * jnp.abs(1.0 - a) + CERT_SLACK) * step, jnp.inf)
  return NewtonStep(w + a[:, None] * s, jnp.minimum(step, next_step), count, next_count, v_next)


# `pcg_step`: the CG tolerance (relative residual in the preconditioned norm: the step is then
# exact to about float32 rounding) and the most CG iterations per step.
CG_TOL = 1e-5
CG_MAX = 200


def pcg_step(t: jax.Array, w: jax.Array, cset: CandidateSet, line_steps: int,
             v: jax.Array | None = None, cg_tol: float = CG_TOL, cg_max: int = CG_MAX,
             tx: jax.Array | None = None, pure_solve: bool = False) -> NewtonStep:
  """One exact Newton iteration whatever the number of violators: preconditioned CG.

  Solves H s = -g, H = I + 2 c_pos [t.w < 1] t t^T + 2 c_neg X^T diag(violators) X, by conjugate
  gradients whose products are batched matrix products, in one of two equivalent forms chosen per
  candidate set by cost (`gram_cg`), each at a cost per iteration independent of the number of
  violators r, so it replaces the [r, r] Cholesky of `newton_step` when r is large:

  - d-space (`_dspace_cg`): on H itself, two passes over the candidates per iteration,
    preconditioned by the target's exact Hessian on the candidates' dominant directions and its
    own, and elsewhere by K = I + 2 c_neg rho X^T X with rho its share of violating candidates
    (through the shared eigendecomposition `CandidateSet.pcg_vectors`).
  - candidate space (`_gram_space_cg`), for sets with fewer candidates than ~2 D: on the Woodbury
    system of `newton_step` over all r violators, I + 2 c_neg B P^-1 B^T, through the shared Gram
    ([n, n] products), preconditioned by its top eigenvectors restricted to the target's violators.

  The same exact line search and active-set certificate follow (in float32 the step itself stalls
  near 1e-5 once the active set is final; the certificate bounds the next one instead). A step
  whose CG did not reach `cg_tol` within `cg_max` iterations reports step = inf: such a target
  cannot pass the convergence test (it is reported as not converged, never silently
  approximate). Per target independent of the batch: every reduction is per row.

  Args:
    t, w: [B, D] augmented targets and their current weights.
    cset: the prepared candidate set (with `with_pcg`'s preconditioner).
    line_steps: most safeguarded Newton steps of the exact line search.
    v: optional decision values w x^T [B, n].
    cg_tol: relative residual at which CG stops (in the preconditioned norm).
    cg_max: most CG iterations.
    tx: optional t x^T [B, n] (candidate space only).
    pure_solve: the candidate-space preconditioner's [k, k] factors without LAPACK
      (`linalg.cholesky`).
  """
  x, valid = cset.x, cset.valid
  c_pos, c_neg = cset.c_pos, cset.c_neg
  v = w @ x.T if v is None else v
  u = _rowdot(t, w)
  violators = (v > -1.0) & valid
  count = jnp.sum(violators, -1)
  m = violators.astype(x.dtype)
  g = _gradient(w, v, u, t, x, c_pos, c_neg)
  a_pos = 2.0 * c_pos * (u < 1.0)
  if cset.gram_basis is not None:
    s, solved = _gram_space_cg(t, g, m, a_pos, cset, cg_tol, cg_max, tx, pure_solve)
  else:
    s, solved = _dspace_cg(t, g, m, a_pos, cset, cg_tol, cg_max, pure_solve)
  # The CG step is exact to cg_tol, far inside the certificate's slack; an unsolved one is not
  # a step the convergence test may pass on.
  new = _advance(t, w, s, v, u, cset, line_steps, violators, count, solved)
  return new._replace(step=jnp.where(solved, new.step, jnp.inf))


def _cg(matvec, precondition, rhs, cg_tol, cg_max):
  """Preconditioned CG on every row of rhs [B, m] from 0: (solution [B, m], solved [B]).

  A row stops (its iterate frozen) once its residual's preconditioned norm is below cg_tol
  times the initial one; the loop ends when all rows have stopped or after cg_max iterations.
  """
  r = rhs
  z = precondition(r)
  rz0 = _rowdot(r, z)
  limit = (cg_tol * cg_tol) * rz0

  def cond(state):
    k, _, _, _, _, rz = state
    return (k < cg_max) & jnp.any(rz > limit)

  def body(state):
    k, s, r, z, p, rz = state
    live = rz > limit
    hp = matvec(p)
    alpha = jnp.where(live, rz / jnp.where(live, _rowdot(p, hp), 1.0), 0.0)
    s = s + alpha[:, None] * p
    r = r - alpha[:, None] * hp
    z = precondition(r)
    rz_new = _rowdot(r, z)
    beta = jnp.where(live, rz_new / jnp.where(live, rz, 1.0), 0.0)
    p = jnp.where(live[:, None], z + beta[:, None] * p, p)
    return k + 1, s, r, z, p, jnp.where(live, rz_new, rz)

  _, s, _, _, _, rz = jax.lax.while_loop(cond, body, (0, jnp.zeros_like(rhs), r, z, z, rz0))
  return s, rz <= limit


def _dspace_cg(t, g, m, a_pos, cset: CandidateSet, cg_tol, cg_max, pure_solve):
  # H s = -g in d-space ([B, D] iterates). The preconditioner is exact where H differs most from
  # K = I + 2 c_neg rho x^T x (rho: the target's share of violating candidates): on span(Q),
  # Q = [U, q] with U the candidates' k dominant directions (the last columns of `pcg_vectors`)
  # and q the target's t orthogonalised against U (so the positive's stiff rank-one term lies in
  # span(Q)), it is the target's A = Q^T H Q; on the complement, K^-1 (through the eigenvectors V):
  #   P^-1 = Q A^-1 Q^T + (I - Q Q^T) V diag(1 / (1 + 2 c_neg rho lambda)) V^T (I - Q Q^T),
  # symmetric positive definite. A costs one [B, n] x [n, k * k] product with `pcg_pairs` and one
  # [B, D] x [D, n] product for x q per Newton step, and a [k + 1, k + 1] Cholesky factor per
  # target; an iteration adds two [B, D] x [D, D] products and a few [B, D] x [D, k] ones.
  x, c_neg, vectors, xb = cset.x, cset.c_neg, cset.pcg_vectors, cset.pcg_xbasis
  dtype = x.dtype
  k = xb.shape[1]
  basis = vectors[:, -k:]

  def outside(r):  # (I - U U^T) r
    return r - (r @ basis) @ basis.T

  a = t @ basis
  tp = outside(t - a @ basis.T)  # twice: one pass leaves float32's rounding along U
  nt = jnp.sqrt(_rowdot(tp, tp))
  # t (numerically) inside span(U): no q (a zero column of Q keeps P^-1 as above).
  has_q = nt > 1e-3 * jnp.sqrt(_rowdot(t, t))
  nt = jnp.where(has_q, nt, 0.0)
  q = tp * jnp.where(has_q, 1.0 / jnp.where(has_q, nt, 1.0), 0.0)[:, None]
  xq = (q @ x.T) * m  # x q on the violators
  qt = jnp.concatenate([a, nt[:, None]], 1)  # Q^T t
  uu = (m @ cset.pcg_pairs).reshape(-1, k, k)  # U^T X^T diag(m) X U
  uq = xq @ xb  # U^T X^T diag(m) X q
  bxb = jnp.concatenate([
      jnp.concatenate([uu, uq[:, :, None]], 2),
      jnp.concatenate([uq, _rowdot(xq, xq)[:, None]], 1)[:, None, :]
  ], 1)
  system = (jnp.eye(k + 1, dtype=dtype) + a_pos[:, None, None] * (qt[:, :, None] * qt[:, None, :]) +
            2.0 * c_neg * bxb)
  chol = linalg.cholesky(system, pure_solve)
  rho = jnp.sum(m, -1) / jnp.sum(cset.valid).astype(dtype)
  scale = 1.0 / (1.0 + (2.0 * c_neg * rho)[:, None] * cset.pcg_values)  # [B, D]

  def precondition(r):
    c = jnp.concatenate([r @ basis, _rowdot(r, q)[:, None]], 1)  # Q^T r
    y = linalg.cho_solve(chol, c, pure_solve)
    rest = r - c[:, :k] @ basis.T - c[:, k:] * q
    kr = ((rest @ vectors) * scale) @ vectors.T
    kr = outside(kr)  # rounding only: V's columns include U, which K^-1 keeps apart
    kr = kr - _rowdot(kr, q)[:, None] * q
    return kr + y[:, :k] @ basis.T + y[:, k:] * q

  def hessian(p):
    return p + (a_pos * _rowdot(t, p))[:, None] * t + 2.0 * c_neg * (((p @ x.T) * m) @ x)

  return _cg(hessian, precondition, -g, cg_tol, cg_max)


def _gram_space_cg(t, g, m, a_pos, cset: CandidateSet, cg_tol, cg_max, tx, pure_solve):
  # The Newton step of `newton_step`'s Gram form with all r violators, its [r, r] system
  # I + 2 c_neg B P^-1 B^T solved by CG over [B, n] iterates that are zero off the violators.
  # Preconditioner: the same matrix with x replaced by its top-k part U Lambda^1/2 W^T
  # (`CandidateSet.gram_basis` V, `feature_basis` W), I + V_B Mid V_B^T with
  # Mid = W^T P^-1 W = I - kappa a a^T, a = W^T t: the target's stiff rank-one term matters, as t
  # lies mostly along the candidates' dominant direction. Applied by Woodbury with a per-target
  # [k, k] Cholesky factor of I + Mid^1/2 V_B^T V_B Mid^1/2 (positive definite by construction;
  # triangular solves, not an explicit inverse, which would lose that in float32 along the
  # dominant direction).
  x, gram, basis, c_neg = cset.x, cset.gram, cset.gram_basis, cset.c_neg
  dtype = x.dtype
  tt = _rowdot(t, t)
  gamma = (1.0 - jax.lax.rsqrt(1.0 + a_pos * tt)) / tt
  gh, xh, tx = _preconditioned_values(g, t, gamma, x, tx)
  bt = tx * m  # B t
  kappa = 2.0 * gamma - gamma * gamma * tt  # P^-1 = I - kappa t t^T

  def matvec(q):  # (I + 2 c_neg B P^-1 B^T) q, q zero off the violators
    return q + 2.0 * c_neg * (m * (q @ gram) - (kappa * _rowdot(bt, q))[:, None] * bt)

  # Mid^1/2 = I - beta a a^T, with (1 - beta |a|^2)^2 = 1 - kappa |a|^2 (>= 0: |a| <= |t|).
  a = t @ cset.feature_basis  # [B, k]
  aa = _rowdot(a, a)
  root = jnp.sqrt(jnp.maximum(1.0 - kappa * aa, 0.0))
  beta = jnp.where(aa > 0, (1.0 - root) / jnp.where(aa > 0, aa, 1.0), 0.0)

  def half_mid(y):
    return y - (beta * _rowdot(a, y))[:, None] * a

  k = basis.shape[1]
  vbv = jnp.einsum("nk,bnl->bkl", basis, m[:, :, None] * basis)  # V_B^T V_B
  mid_a = jnp.einsum("bkl,bl->bk", vbv, a)
  # Mid^1/2 S Mid^1/2 for symmetric S = V_B^T V_B, expanded (S a = mid_a).
  inner = (vbv - beta[:, None, None] *
           (a[:, :, None] * mid_a[:, None, :] + mid_a[:, :, None] * a[:, None, :]) +
           (beta * beta * _rowdot(a, mid_a))[:, None, None] * (a[:, :, None] * a[:, None, :]))
  chol = linalg.cholesky(jnp.eye(k, dtype=dtype) + inner, pure_solve)

  def precondition(r):
    y = half_mid(linalg.cho_solve(chol, half_mid(r @ basis), pure_solve))
    return r - m * (y @ basis.T)

  coef, solved = _cg(matvec, precondition, xh * m, cg_tol, cg_max)
  btc = coef @ x  # B^T coef
  return -_half_precondition(gh - 2.0 * c_neg * _half_precondition(btc, t, gamma), t, gamma), solved


def _gram_block(gram: jax.Array, idx: jax.Array, mask: jax.Array) -> jax.Array:
  """The LOWER triangles of the active sets' Gram blocks [B, r, r] (padding masked out).

  The Cholesky factorisations read nothing else, and this gather (a cache line per element) is a
  large part of a step; above the diagonal each entry repeats its column's diagonal (a cache hit).
  Transposed from the Gram's upper triangle, so that XLA writes the row-major gather as it is into
  the column-major operand LAPACK takes. idx must be ascending (`_first_violators`).
  """
  rows = idx[:, :, None]
  block = gram.at[rows, jnp.maximum(rows, idx[:, None, :])].get(mode="promise_in_bounds")
  return jnp.swapaxes(block * (mask[:, :, None] * mask[:, None, :]), 1, 2)


def finish(targets: jax.Array, w: jax.Array, cset: CandidateSet, iterations: jax.Array,
           step: jax.Array, tol: float) -> tuple[jax.Array, SolverStats]:
  """Decision values [targets, n] (caller's order) and `SolverStats` of weights w [targets, D]."""
  t = _augment(targets.astype(cset.x.dtype))
  v = w @ cset.x.T
  u = _rowdot(t, w)
  g = _gradient(w, v, u, t, cset.x, cset.c_pos, cset.c_neg)
  tt = _rowdot(t, t)
  gamma = (1.0 - jax.lax.rsqrt(1.0 + 2.0 * cset.c_pos * (u < 1.0) * tt)) / tt
  return cset.caller_order(v), SolverStats(
      iterations, jnp.sum((v > -1.0) & cset.valid, -1), jnp.linalg.norm(g, axis=-1),
      jnp.linalg.norm(_half_precondition(g, t, gamma), axis=-1), step, step <= tol)


def solve(targets: jax.Array, candidates: jax.Array, options: SolverOptions = SolverOptions(),
          valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array, SolverStats]:
  """Solves the Exemplar-SVM of every target against one shared candidate set (traceable).

  One program: a `while_loop` of batched Newton steps that freezes converged targets, so a
  target's result does not depend on the others in its batch (up to the products' rounding).

  Args:
    targets: [targets, d] target features (each the only positive of its SVM).
    candidates: [candidates, d] negatives shared by all targets.
    options: the solver's options (`Solver`'s fields unused).
    valid: optional bool [candidates]; False marks padding rows, ignored (also by the class
      weights), so that candidate sets of different sizes share one shape.

  Returns:
    (weights [targets, d + 1] with the intercept last, decision values [targets, candidates]
    (padding columns meaningless), SolverStats with [targets] fields). Nothing here raises for
    a target that did not converge or came out non-finite: see `stats.converged`, or call
    `esvm_scores`, which does.

  Raises:
    AttributionError: bad inputs (`check_problem`; values only when they are concrete).
  """
  targets, candidates = check_problem(targets, candidates, options, valid, where="esvm.solve")
  cset = prepare(candidates, options, valid)
  rows = min(options.max_rows, cset.x.shape[0])
  t = _augment(targets.astype(cset.x.dtype))
  b = t.shape[0]
  tol, max_iter = options.tol, options.max_iter

  tx = None if cset.gram is None else t @ cset.x.T  # fixed per target (used with the Gram)

  def cond(state):
    _, _, it, step = state
    return jnp.any((it < max_iter) & (step > tol))

  def body(state):
    w, v, it, step = state
    live = (it < max_iter) & (step > tol)
    # More violators than `rows` for a live target: the whole batch takes exact CG steps.
    many = jnp.any(live & (jnp.sum((v > -1.0) & cset.valid, -1) > rows))
    new = jax.lax.cond(many, lambda: pcg_step(t, w, cset, options.line_steps, v=v, tx=tx),
                       lambda: newton_step(t, w, cset, rows, options.line_steps, v=v, tx=tx))
    return (jnp.where(live[:, None], new.w, w), jnp.where(live[:, None], new.v,
                                                          v), it + live.astype(it.dtype),
            jnp.where(live, new.step, step))

  w0 = initial_weights(targets, cset)
  init = (w0, w0 @ cset.x.T, jnp.zeros((b,), jnp.int32), jnp.full((b,), jnp.inf, cset.x.dtype))
  w, _, it, step = jax.lax.while_loop(cond, body, init)
  v, stats = finish(targets, w, cset, it, step, tol)
  return w, v, stats


@functools.partial(jax.jit, static_argnames=("options",))
def _solve_scores(targets: jax.Array, candidates: jax.Array,
                  options: SolverOptions) -> tuple[jax.Array, SolverStats]:
  _, v, stats = solve(targets, candidates, options)
  return v, stats


_finish = jax.jit(finish, static_argnames=("tol",))


@functools.lru_cache(maxsize=8)
def _solver(options: SolverOptions) -> Any:
  """One `solver.Solver` per options (it keeps its compiled steps), for `esvm_scores`."""
  from jaxattr.attribute import solver  # pylint: disable=g-import-not-at-top (imports esvm)
  return solver.Solver(options)


def esvm_scores(targets: jax.Array | np.ndarray, candidates: jax.Array | np.ndarray,
                options: SolverOptions = SolverOptions(), *, return_stats: bool = False,
                allow_nonconverged: bool = False):
  """Exemplar-SVM decision values of every candidate for every target, as sklearn computes them.

  Each target's SVM is `sklearn.svm.LinearSVC(C, class_weight='balanced')` fitted on the target
  (label 1) against all candidates (label 0); this is its `decision_function`. Concrete inputs
  go through the same host-scheduled `solver.Solver` as `ranking.topk` (same steps, float64
  fallback, throughput); under an enclosing `jax.jit` (tracers) the one-program `solve` runs.
  The inputs are checked first (`check_problem`), the result after the solve
  (`check_solution`); under an enclosing `jax.jit` only the shapes and dtypes are.

  Args:
    targets: [targets, d] float target features (one row per target: `t[None]` for one).
    candidates: [candidates >= 1, d] float candidate features, shared by all targets.
    options: the solver's options (static: a new value compiles anew).
    return_stats: also return the `SolverStats`.
    allow_nonconverged: return targets that did not converge within options.max_iter (their
      `stats.converged` is False) instead of raising NotConvergedError.

  Returns:
    Decision values [targets, candidates] (higher = more similar to the target), plus
    `SolverStats` when `return_stats`.

  Raises:
    AttributionError: bad inputs, or non-finite decision values (C too large for the features'
      scale).
    NotConvergedError: some target did not converge (unless `allow_nonconverged`).
  """
  targets, candidates = check_problem(targets, candidates, options, where="esvm_scores")
  if isinstance(targets, jax.core.Tracer) or isinstance(candidates, jax.core.Tracer):
    v, stats = _solve_scores(targets, candidates, options)
  else:
    solver = _solver(options)
    cset = solver.prepare(candidates)
    w, it, step = solver(np.asarray(targets), cset)
    v, stats = _finish(jnp.asarray(targets), jnp.asarray(w, cset.x.dtype), cset, jnp.asarray(it),
                       jnp.asarray(step, cset.x.dtype), options.tol)
  if not isinstance(v, jax.core.Tracer):
    check_solution(v, stats.converged, options, "esvm_scores", allow_nonconverged)
  return (v, stats) if return_stats else v


def _describe(x: Any) -> str:
  return f"shape {tuple(x.shape)} {x.dtype}"


def nonfinite_rows(x: Any) -> np.ndarray:
  """Positions of the rows of a concrete [N, ...] array with a NaN/inf, or a value beyond
  float32's range (what the float32 solver would turn into inf)."""
  if isinstance(x, jax.Array):
    return np.flatnonzero(~np.asarray(jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), -1)))
  x = np.asarray(x).reshape(len(x), -1)
  bad = []
  # In blocks of rows: memory-mapped features (ImageNet: 1.28M x 2048) are read block by block,
  # never whole.
  for start in range(0, len(x), NONFINITE_BLOCK):
    part = np.asarray(x[start:start + NONFINITE_BLOCK])
    ok = np.isfinite(part)
    if part.dtype.itemsize > 4:
      ok &= np.abs(np.where(ok, part, 0)) <= np.finfo(np.float32).max
    bad.append(start + np.flatnonzero(~ok.all(-1)))
  return np.concatenate(bad) if bad else np.zeros((0,), np.int64)


NONFINITE_BLOCK = 1 << 16


def check_problem(targets: Any, candidates: Any, options: SolverOptions, valid: Any = None, *,
                  where: str = "esvm") -> tuple[Any, Any]:
  """Checks an ESVM problem's inputs; returns (targets, candidates) as arrays.

  Shapes and dtypes are checked always (they are static under `jax.jit`); values (NaN/inf,
  beyond float32) only when the arrays are concrete (numpy, or jax arrays outside a trace).

  Args:
    targets: float [T, d].
    candidates: float [N >= 1, d], d >= 1.
    options: a `SolverOptions`.
    valid: optional bool [N].
    where: the entry point, for the messages.

  Raises:
    AttributionError: naming the argument, what was got and what is expected.
  """
  if not isinstance(options, SolverOptions):
    raise AttributionError(f"{where}: options must be a SolverOptions, got "
                           f"{type(options).__name__} {options!r}")
  arrays = []
  for name, x, rows in (("targets", targets, "T targets"), ("candidates", candidates,
                                                            "N candidates")):
    if not isinstance(x, jax.Array):
      x = np.asarray(x)
    if x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.floating):
      raise AttributionError(
          f"{where}: {name} must be a 2-D float array [{rows}, d], got {_describe(x)}: pass one "
          f"row per {name[:-1]} (x[None] for a single one), as float32")
    arrays.append(x)
  targets, candidates = arrays
  if candidates.shape[0] < 1 or candidates.shape[1] < 1:
    raise AttributionError(f"{where}: candidates must have at least one row and one feature "
                           f"column, got {_describe(candidates)}")
  if targets.shape[1] != candidates.shape[1]:
    raise AttributionError(f"{where}: targets have {targets.shape[1]} feature columns but "
                           f"candidates {candidates.shape[1]} (targets {_describe(targets)}, "
                           f"candidates {_describe(candidates)}); both must be [rows, d]")
  if valid is not None:
    flags = valid if isinstance(valid, jax.Array) else np.asarray(valid)
    if flags.shape != (candidates.shape[0],) or flags.dtype != bool:
      raise AttributionError(f"{where}: valid must be bool [{candidates.shape[0]}] (one flag "
                             f"per candidate), got {_describe(flags)}")
  for name, x in (("targets", targets), ("candidates", candidates)):
    if isinstance(x, jax.core.Tracer):
      continue
    bad = nonfinite_rows(x)
    if len(bad):
      raise AttributionError(
          f"{where}: {name} {_describe(x)} hold NaN/inf or values beyond float32's range in "
          f"{len(bad)} of {x.shape[0]} rows (first: {bad[:20].tolist()}); clean or drop those "
          "rows")
  return targets, candidates


def check_solution(scores: Any, converged: Any, options: SolverOptions, where: str,
                   allow_nonconverged: bool, positions: Any = None) -> None:
  """Raises when a concrete ESVM result is unusable.

  Args:
    scores: [T, ...] the targets' decision values (or their top-k scores).
    converged: bool [T], `SolverStats.converged`.
    options: the options they were solved with.
    where: what solved them, for the messages (e.g. 'esvm_scores').
    allow_nonconverged: do not raise for targets that only did not converge.
    positions: [T] how the messages name the targets (default: their rows).

  Raises:
    AttributionError: some target's scores are NaN/inf, whatever `allow_nonconverged`.
    NotConvergedError: some target did not converge, unless `allow_nonconverged`.
  """
  scores = np.asarray(scores)
  rows = np.arange(len(scores)) if positions is None else np.asarray(positions)
  what = "rows" if positions is None else "test positions"
  bad = ~np.isfinite(scores.reshape(len(scores), -1)).all(-1)
  if bad.any():
    raise AttributionError(
        f"{where}: the ESVM solve gave non-finite (NaN/inf) scores for {int(bad.sum())} of "
        f"{len(scores)} targets ({what} {rows[bad][:20].tolist()}) at attribution.C="
        f"{options.C:g}: the float32 problem is too ill-conditioned; lower attribution.C "
        "(sklearn's default 0.1) or scale the features down")
  nonconverged = ~np.asarray(converged, bool)
  if nonconverged.any() and not allow_nonconverged:
    raise NotConvergedError(
        f"{where}: the ESVM of {int(nonconverged.sum())} of {len(scores)} targets did not "
        f"converge ({what} {rows[nonconverged][:20].tolist()}) within attribution.max_iter="
        f"{options.max_iter} iterations at attribution.tol={options.tol:g}; raise "
        f"attribution.max_iter or attribution.max_rows (now {options.max_rows}), loosen "
        "attribution.tol, or pass allow_nonconverged=True to keep them (stats.converged "
        "marks them)")

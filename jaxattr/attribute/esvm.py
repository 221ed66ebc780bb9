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
* The products with the whole candidate matrix (x w, x s, x^T r for the gradient, and with the
  shared Gram two more for the Woodbury terms) are, with a shared candidate matrix,
  matrix-matrix products [targets, d + 1] x [d + 1, candidates]: what accelerators (and BLAS)
  do well.
* The step length minimises the convex piecewise-quadratic line function exactly (safeguarded
  Newton on its derivative), so every iteration decreases the objective.
* Convergence, per target: the Newton step measured in decision-value units,
  ||[x; t] H^-1 g||_inf, a norm of the gradient that says how far any decision value can still
  move. In float32 the plain ||g|| cannot go much below eps * c_pos * ||t||^2 * ||w|| (the
  positive's cost grows with the number of candidates), whereas this scaled norm reaches ~1e-6.
  Both, and the P^-1-scaled gradient norm, are reported per target.

A vmapped `while_loop` iterates until every target has converged and freezes those that have,
so a target's result does not depend on the others in its batch (up to the rounding of the
batched products). Everything is float32 and deterministic.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp


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
      target of |[x_i, 1] . H^-1 g|; the convergence test.
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


def _solve_one(t: jax.Array, x: jax.Array, valid: jax.Array, gram: jax.Array | None,
               c_pos: jax.Array, c_neg: jax.Array, tol: float, max_iter: int, num_rows: int,
               line_steps: int):
  """Solves one target's problem.

  t: [D] augmented target; x: [n, D] augmented candidates, padding rows all zero (so they add
  nothing to any sum); valid: [n] bool, False on padding rows; gram: x x^T [n, n] shared by
  all targets, or None to form each step's [m, m] Gram from the gathered rows.
  """
  neg_inf = jnp.asarray(-jnp.inf, x.dtype)
  dtype = x.dtype
  tt = t @ t

  def gradient(w, v, u):
    # v = x w (candidate decision values) [n], u = t.w (the target's own decision value).
    return w - 2.0 * c_pos * jnp.maximum(1.0 - u, 0.0) * t + 2.0 * c_neg * (
        jnp.maximum(1.0 + v, 0.0) @ x)

  def half_precondition(r, u):
    # P^-1/2 r for P = I + 2 c_pos [u < 1] t t^T: P^-1/2 = I - gamma t t^T. The positive's cost
    # c_pos grows with the number of candidates, so t is by far the stiffest direction of H.
    a_pos = 2.0 * c_pos * (u < 1.0)
    gamma = (1.0 - jax.lax.rsqrt(1.0 + a_pos * tt)) / tt
    return r - gamma * (r @ t) * t, gamma

  def scaled_norm(g, u):
    return jnp.linalg.norm(half_precondition(g, u)[0])

  def newton_direction(g, u, rows, active_rows):
    # Generalised Hessian H = P + 2 c_neg B^T B, B = rows of the margin violators (v > -1). Few
    # candidates violate their margin near the optimum, so H is P plus a low-rank term and
    # Woodbury gives the exact Newton step from an [m, m] system on the top-m rows. With more
    # than m violators the step uses the m largest only: H is replaced by a positive definite
    # H' <= H, which still gives a descent direction for the exact line search.
    # P^-1/2 is applied to both sides: violators lie close to t, and forming B P^-1 B^T as
    # B B^T - beta (B t)(B t)^T would cancel most of its float32 digits.
    gh, gamma = half_precondition(g, u)
    mask = active_rows.astype(dtype)
    rows = rows * mask[:, None]
    bt = rows @ t
    rows_p = rows - gamma * jnp.outer(bt, t)
    m = jnp.eye(rows.shape[0], dtype=dtype) + 2.0 * c_neg * (rows_p @ rows_p.T)
    coef = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(m, lower=True), rows_p @ gh)
    return -half_precondition(gh - 2.0 * c_neg * (coef @ rows_p), u)[0]

  def line_search(w, s, v, u, xs, ts):
    # Exact minimisation of the convex piecewise-quadratic phi(a) = f(w + a s) by Newton's
    # method on phi', safeguarded by a bracket [lo, hi] with phi'(lo) < 0 < phi'(hi).
    ws, ss = w @ s, s @ s

    def derivs(a):
      mp = jnp.maximum(1.0 - u - a * ts, 0.0)
      mn = jnp.maximum(1.0 + v + a * xs, 0.0)
      # Elementwise sums rather than dots: under vmap a dot becomes a slow batched matvec.
      d1 = ws + a * ss - 2.0 * c_pos * mp * ts + 2.0 * c_neg * jnp.sum(mn * xs)
      d2 = ss + 2.0 * c_pos * (mp > 0) * ts * ts + 2.0 * c_neg * jnp.sum(
          jnp.where(mn > 0, xs * xs, 0.0))
      return d1, d2

    def body(_, state):
      a, lo, hi = state
      d1, d2 = derivs(a)
      lo = jnp.where(d1 < 0, a, lo)
      hi = jnp.where(d1 > 0, a, hi)
      a_new = a - d1 / d2
      inside = (a_new > lo) & (a_new < hi)
      fallback = jnp.where(jnp.isfinite(hi), 0.5 * (lo + hi), 2.0 * a)
      a_new = jnp.where(d1 == 0, a, jnp.where(inside, a_new, fallback))
      return a_new, lo, hi

    a, _, _ = jax.lax.fori_loop(
        0, line_steps, body, (jnp.ones((), dtype), jnp.zeros((), dtype),
                              jnp.full((), jnp.inf, dtype)))
    return a

  def cond(state):
    _, _, it, step = state
    return (it < max_iter) & (step > tol)

  def body_rows(state):
    w, v, it, _ = state
    # The m largest decision values hold every violator (while there are at most m). Their v
    # and u are recomputed from w: the incremental updates below carry the rounding of every
    # earlier (large) step, which would otherwise bias the gradient near the optimum.
    _, idx = jax.lax.top_k(jnp.where(valid, v, neg_inf), num_rows)
    rows = x[idx]
    v_rows = rows @ w
    v = v.at[idx].set(v_rows)
    u = t @ w
    g = gradient(w, v, u)
    s = newton_direction(g, u, rows, (v_rows > -1.0) & valid[idx])
    xs, ts = x @ s, t @ s
    # The Newton step in decision-value units, ||[x; t] H^-1 g||_inf: a norm of the gradient
    # that says directly how far any decision value may still move.
    step = jnp.maximum(jnp.max(jnp.abs(xs)), jnp.abs(ts))
    a = line_search(w, s, v, u, xs, ts)
    return w + a * s, v + a * xs, it + 1, step

  def body_gram(state):
    # The same Newton step without gathering candidate rows (slow on CPUs): the [m, m] system
    # comes from the shared Gram, and the products with B become full products with x, which
    # are matrix-matrix products over the batch. v is recomputed from w: the incremental updates
    # carry the rounding of every earlier (large) step, which would bias the gradient.
    w, v, it, _ = state
    v = x @ w
    _, idx = jax.lax.top_k(jnp.where(valid, v, neg_inf), num_rows)
    mask = ((v[idx] > -1.0) & valid[idx]).astype(dtype)
    u = t @ w
    g = gradient(w, v, u)
    gh, gamma = half_precondition(g, u)
    h = half_precondition(gh, u)[0]  # P^-1 g
    bh = (x @ h)[idx] * mask  # B P^-1 g
    bt = xt[idx] * mask
    gram_p = (gram[idx[:, None], idx[None, :]] * jnp.outer(mask, mask)
              - (2.0 * gamma - gamma * gamma * tt) * jnp.outer(bt, bt))  # B P^-1 B^T
    m = jnp.eye(num_rows, dtype=dtype) + 2.0 * c_neg * gram_p
    coef = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(m, lower=True), bh)
    btc = jnp.zeros_like(v).at[idx].add(coef * mask) @ x  # B^T coef
    # As in the rows path, P^-1/2 is applied to each side separately: P^-1 applied at once to a
    # vector with a large t component would cancel most of its float32 digits.
    s = -half_precondition(gh - 2.0 * c_neg * half_precondition(btc, u)[0], u)[0]
    xs, ts = x @ s, t @ s
    step = jnp.maximum(jnp.max(jnp.abs(xs)), jnp.abs(ts))
    a = line_search(w, s, v, u, xs, ts)
    return w + a * s, v + a * xs, it + 1, step

  body = body_rows if gram is None else body_gram
  xt = x @ t

  # Start at w = 0 with intercept -1: every negative sits exactly on its margin (not violating)
  # and only the positive violates its own. At the optimum few negatives violate theirs, so
  # growing that set from empty takes few Newton steps, each exact and cheap.
  w0 = jnp.zeros_like(t).at[-1].set(-1.0)
  init = (w0, x @ w0, 0, jnp.asarray(jnp.inf, dtype))
  w, _, it, step = jax.lax.while_loop(cond, body, init)
  # Final decision values and gradient from w itself.
  v = x @ w
  u = t @ w
  g = gradient(w, v, u)
  return w, v, SolverStats(it, jnp.sum((v > -1.0) & valid), jnp.linalg.norm(g),
                           scaled_norm(g, u), step, step <= tol)


def solve(targets: jax.Array, candidates: jax.Array, C: float = 0.1, valid: jax.Array | None = None,
          tol: float = 1e-5, max_iter: int = 50, num_rows: int = 192, line_steps: int = 12,
          shared_gram_max: int = 8192):
  """Solves the Exemplar-SVM of every target against one shared candidate set (traceable).

  Args:
    targets: [targets, d] target features (each the only positive of its SVM).
    candidates: [candidates, d] negatives shared by all targets.
    C: sklearn's C.
    valid: optional bool [candidates]; False marks padding rows, which are ignored (the class
      weights count only valid rows), so candidate sets of different sizes share one shape.
    tol: convergence tolerance in decision-value units: a target stops once its Newton step
      would move no decision value by more than `tol`.
    max_iter: Newton iterations per target.
    num_rows: m, the most margin violators the exact Newton step handles (an [m, m] Cholesky
      per iteration); with more violators the step is approximate and convergence slower.
    line_steps: safeguarded Newton steps of the exact line search.
    shared_gram_max: with at most this many candidates, their [n, n] Gram is formed once and
      shared by all targets (each Newton step gathers from it); above, each step forms its own.

  Returns:
    (weights [targets, d + 1] with the intercept last, decision values [targets, candidates]
    (padding columns meaningless), SolverStats with [targets] fields).
  """
  n = candidates.shape[0]
  dtype = candidates.dtype
  if valid is None:
    valid = jnp.ones((n,), bool)
  count = jnp.sum(valid).astype(dtype)
  c_pos, c_neg = C * (count + 1) / 2.0, C * (count + 1) / (2.0 * count)
  x = _augment(candidates) * valid[:, None].astype(dtype)
  t = _augment(targets.astype(dtype))
  gram = x @ x.T if n <= shared_gram_max else None
  fn = functools.partial(_solve_one, x=x, valid=valid, gram=gram, c_pos=c_pos, c_neg=c_neg, tol=tol,
                         max_iter=max_iter, num_rows=min(num_rows, n), line_steps=line_steps)
  return jax.vmap(fn)(t)


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

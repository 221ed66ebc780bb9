"""Exact Newton steps whatever the number of margin violators (`esvm.pcg_step`, issue #15):
scikit-learn's solution on problems where most candidates violate, where d > n, and at raw
feature norms; the two forms of the Newton system agree; results do not depend on the batch."""

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.svm import LinearSVC

from benchmarks import esvm_families as fam
from jaxattr import attribute
from jaxattr.attribute import esvm, solver as solver_lib
from jaxattr.attribute.options import SolverOptions


def _sklearn(target, candidates, C=0.1):
  x = np.concatenate([target[None], candidates]).astype(np.float64)
  y = np.r_[1, np.zeros(len(candidates))]
  model = LinearSVC(C=C, class_weight="balanced", dual=False, tol=1e-8, max_iter=100_000)
  return model.fit(x, y).decision_function(candidates.astype(np.float64))


def _solve(targets, candidates, **options):
  solver = attribute.Solver(SolverOptions(**options))
  cset = solver.prepare(candidates)
  w, it, step = solver(targets, cset)
  v = np.asarray(cset.caller_order(np.asarray(w) @ np.asarray(cset.x).T))
  return v, it, step, solver


def _check(targets, candidates, v, it, step, num=3, atol=2e-5):
  assert (step <= SolverOptions().tol).all() and it.mean() <= 10
  for i in range(num):
    ref = _sklearn(targets[i], candidates)
    np.testing.assert_allclose(v[i], ref, atol=atol, rtol=0)
    assert np.array_equal(np.argsort(-ref)[:20], np.argsort(-v[i])[:20])
  return _sklearn(targets[0], candidates)


def test_majority_of_violators_exact_in_few_iterations():
  data = fam.hard_synthetic(dim=48, num_candidates=600, num_targets=8, num_classes=1).generate()
  t, x = data.targets[0], data.candidates[0]
  v, it, step, solver = _solve(t, x, max_rows=64)
  ref = _check(t, x, v, it, step)
  assert (ref > -1).sum() > 300  # most candidates violate at the optimum: CG steps, exact
  assert solver_lib.PCG in solver._steps
  # The single-program path (esvm_scores) gives the same scores.
  scores = np.asarray(attribute.esvm_scores(t, x, SolverOptions(max_rows=64)))
  np.testing.assert_allclose(scores, v, atol=2e-5, rtol=0)


def test_more_dimensions_than_candidates():
  data = fam.imagenet_shaped(norm=3.0, dim=256, num_candidates=120, num_targets=6, rank=32,
                             num_classes=1).generate()
  t, x = data.targets[0], data.candidates[0]
  v, it, step, _ = _solve(t, x, max_rows=32)
  _check(t, x, v, it, step)


def test_imagenet_shaped_classes_exact():
  # ImageNet's regime: 1,300 candidates x 2,048-d, near rank one, norm 29, where CG steps lean
  # hardest on the shared preconditioner's float32 inverse (a Woodbury form of it through the
  # Gram, cheaper but not positive definite in float32, once gave decision values off by 7e-2).
  data = fam.imagenet_shaped(norm=29.0, num_targets=40, num_classes=1).generate()
  t, x = data.targets[0], data.candidates[0]
  v, it, step, solver = _solve(t, x)
  assert solver_lib.PCG in solver._steps  # CG ran
  assert (step <= SolverOptions().tol).all() and it.mean() <= 10
  for i in range(0, 40, 5):
    np.testing.assert_allclose(v[i], _sklearn(t[i], x), atol=1e-4, rtol=0)


def test_raw_feature_norms_converge_or_raise():
  data = fam.imagenet_shaped(norm=1000.0, dim=256, num_candidates=300, num_targets=6, rank=32,
                             num_classes=1).generate()
  t, x = data.targets[0], data.candidates[0]
  v, it, step, _ = _solve(t, x)
  converged = step <= SolverOptions().tol
  for i in np.flatnonzero(converged)[:3]:  # converged means sklearn's answer, never a wrong one
    ref = _sklearn(t[i], x)
    np.testing.assert_allclose(v[i], ref, atol=1e-4 * np.abs(ref).max(), rtol=0)
  if not converged.all():
    with pytest.raises(attribute.NotConvergedError):
      attribute.esvm_scores(t, x)


def test_woodbury_and_cg_steps_agree():
  data = fam.hard_synthetic(dim=32, num_candidates=200, num_targets=6, num_classes=1).generate()
  t, x = data.targets[0], data.candidates[0]
  cset = esvm.prepare(jnp.asarray(x), SolverOptions())
  ta = esvm._augment(jnp.asarray(t))
  w = esvm.initial_weights(jnp.asarray(t), cset)
  for _ in range(2):  # a few exact steps in, where both forms apply (r <= rows = n)
    w = esvm.newton_step(ta, w, cset, 200, 12).w
  a = esvm.newton_step(ta, w, cset, 200, 12)
  b = esvm.pcg_step(ta, w, cset, 12, cg_tol=1e-7)
  scale = np.abs(np.asarray(a.v)).max()
  np.testing.assert_allclose(np.asarray(b.v), np.asarray(a.v), atol=1e-4 * scale, rtol=0)
  np.testing.assert_array_equal(np.asarray(a.count), np.asarray(b.count))


def test_coarse_step_is_the_newton_step_far_from_the_optimum():
  # The coarse form (two products with the candidates) gives the accurate form's step where
  # every violator is in the active set, up to its float32 error (far below the step itself).
  data = fam.hard_synthetic(norm=3.0, dim=64, num_candidates=200, num_targets=6,
                            num_classes=1).generate()
  t, x = data.targets[0], data.candidates[0]
  cset = esvm.prepare(jnp.asarray(x), SolverOptions())
  ta = esvm._augment(jnp.asarray(t))
  w = esvm.initial_weights(jnp.asarray(t), cset)
  a = esvm.newton_step(ta, w, cset, 200, 12)
  b = esvm.newton_step(ta, w, cset, 200, 12, coarse=True)
  moved = np.abs(np.asarray(a.v) - np.asarray(w @ cset.x.T)).max()
  assert moved > 0.25  # far from the optimum: where the solver takes coarse steps
  np.testing.assert_allclose(np.asarray(b.v), np.asarray(a.v), atol=1e-2 * moved, rtol=0)


def test_coarse_steps_reach_the_same_optimum_and_never_converge_a_target(monkeypatch):
  data = fam.hard_synthetic(norm=3.0, dim=64, num_candidates=300, num_targets=12,
                            num_classes=1).generate()
  t, x = data.targets[0], data.candidates[0]
  with_coarse, it, step, solver = _solve(t, x)
  assert solver.coarse_steps > 0
  ref = _check(t, x, with_coarse, it, step)
  monkeypatch.setattr(solver_lib, "COARSE_ABOVE", np.inf)
  accurate, _, _, solver = _solve(t, x)
  assert solver.coarse_steps == 0
  np.testing.assert_allclose(with_coarse, accurate, atol=2e-5, rtol=0)
  assert np.array_equal(np.argsort(-ref)[:20], np.argsort(-accurate[0])[:20])
  # Only exact steps are convergence tests: with every Woodbury step coarse, no target converges.
  monkeypatch.setattr(solver_lib, "COARSE_ABOVE", -1.0)
  _, it, step, solver = _solve(t, x, max_iter=12, fallback64=False)
  assert (it == 12).all() and not (step <= SolverOptions().tol).any()
  assert solver.coarse_steps > 0


def test_results_do_not_depend_on_the_batch():
  data = fam.hard_synthetic(dim=32, num_candidates=300, num_targets=20, num_classes=1).generate()
  t, x = data.targets[0], data.candidates[0]
  everything, _, _, _ = _solve(t, x, max_rows=32)
  alone, _, _, _ = _solve(t[5:6], x, max_rows=32)
  others, _, _, _ = _solve(t[[5, 0, 19, 3]], x, max_rows=32)
  np.testing.assert_allclose(alone[0], everything[5], atol=1e-5, rtol=0)
  np.testing.assert_allclose(others[0], everything[5], atol=1e-5, rtol=0)


def _raw_norm_problem():
  data = fam.imagenet_shaped(norm=1000.0, dim=256, num_candidates=300, num_targets=8, rank=32,
                             num_classes=1).generate()
  return data.targets[0], data.candidates[0]


def test_float64_continuation_for_targets_float32_cannot_finish(monkeypatch):
  # The continuation itself: below FLOAT64_CONDITION (here: always) a target starts in float32
  # and continues in float64 from its float32 weights after FLOAT32_ITERS iterations.
  monkeypatch.setattr(solver_lib, "FLOAT64_CONDITION", np.inf)
  # Accurate steps only: with coarse ones (`solver.COARSE_ABOVE`) float32 finishes this problem
  # in 13-15 iterations, and the continuation would not run.
  monkeypatch.setattr(solver_lib, "COARSE_ABOVE", np.inf)
  t, x = _raw_norm_problem()
  # FLOAT32_ITERS = 20 iterations: too few for float32 at this scale (it needs 42 to over 50).
  # Where float32 stops there depends on the jax version (its steps lose most digits): float64
  # then took 2-12 more iterations on jax 0.10.2 and 15-21 on 0.12.0.1 (AMD EPYC; 11-13 from the
  # start on both), so the continuation gets up to 30.
  v32, it32, step32, _ = _solve(t, x, max_iter=solver_lib.FLOAT32_ITERS, fallback64=False)
  v, it, step, _ = _solve(t, x, max_iter=30)
  redone = ~(step32 <= 1e-5)
  assert redone.any(), it32
  assert (step <= 1e-5).all() and (it[redone] > solver_lib.FLOAT32_ITERS).all(), (it, step)
  np.testing.assert_array_equal(v[~redone], v32[~redone])
  for i in np.flatnonzero(redone)[:2]:
    ref = _sklearn(t[i], x)
    np.testing.assert_allclose(v[i], ref, atol=1e-4 * np.abs(ref).max(), rtol=0)


def test_ill_conditioned_sets_are_solved_in_float64_from_the_start():
  t, x = _raw_norm_problem()
  options = SolverOptions()
  cset = solver_lib.Solver(options).prepare(x)
  assert float(solver_lib._condition(cset.x, cset.c_neg)) > solver_lib.FLOAT64_CONDITION
  v, it, step, _ = _solve(t, x, max_iter=20)
  assert (step <= 1e-5).all() and it.max() <= 20, it
  for i in range(3):
    ref = _sklearn(t[i], x)
    np.testing.assert_allclose(v[i], ref, atol=1e-4 * np.abs(ref).max(), rtol=0)


def test_candidate_space_and_dspace_cg_agree_with_woodbury():
  # ImageNet's shape in small (fewer candidates than dimensions): `pcg_step` takes CG in candidate
  # space through the Gram; forced into d-space (the shared [D, D] preconditioner) and as a
  # Woodbury step with every violator, the same Newton step.
  data = fam.imagenet_shaped(norm=29.0, dim=256, num_candidates=120, num_targets=6, rank=32,
                             num_classes=1).generate()
  t, x = data.targets[0], data.candidates[0]
  cset = esvm.prepare(jnp.asarray(x), SolverOptions())
  assert esvm.gram_cg(cset) and cset.gram_basis is not None and cset.pcg_vectors is None
  dspace = esvm.with_dspace_pcg(cset._replace(gram_basis=None, feature_basis=None))
  ta = esvm._augment(jnp.asarray(t))
  w = esvm.initial_weights(jnp.asarray(t), cset)
  for _ in range(2):
    w = esvm.newton_step(ta, w, cset, 120, 12).w
  a = esvm.newton_step(ta, w, cset, 120, 12)
  b = esvm.pcg_step(ta, w, cset, 12, cg_tol=1e-7)
  c = esvm.pcg_step(ta, w, dspace, 12, cg_tol=1e-7)
  assert (np.asarray(a.count) > 30).all()  # a real system, not a handful of violators
  scale = np.abs(np.asarray(a.v)).max()
  for other in (b, c):
    np.testing.assert_allclose(np.asarray(other.v), np.asarray(a.v), atol=1e-4 * scale, rtol=0)
    np.testing.assert_array_equal(np.asarray(other.count), np.asarray(a.count))
  # The pure (LAPACK-free) factors of multi-device CPU meshes give the same step.
  p = esvm.pcg_step(ta, w, cset, 12, cg_tol=1e-7, pure_solve=True)
  np.testing.assert_allclose(np.asarray(p.v), np.asarray(b.v), atol=1e-5 * scale, rtol=0)


def test_stalled_float32_targets_continue_in_float64(monkeypatch, caplog):
  # A target whose float32 steps stall just above tol (float32's rounding floor) leaves float32
  # at once for the float64 continuation instead of iterating to FLOAT32_ITERS; forced here by
  # calling every unconverged target with a finite step stalled.
  data = fam.hard_synthetic(dim=48, num_candidates=600, num_targets=8, num_classes=1).generate()
  t, x = data.targets[0], data.candidates[0]
  v_ref, _, _, _ = _solve(t, x, max_rows=64)
  monkeypatch.setattr(solver_lib, "STALL_NEAR", np.inf)
  monkeypatch.setattr(solver_lib, "STALL_RATIO", 1e-30)
  caplog.set_level("INFO")
  v, it, step, _ = _solve(t, x, max_rows=64)
  assert "continuing them in float64" in caplog.text
  assert (step <= SolverOptions().tol).all()
  np.testing.assert_allclose(v, v_ref, atol=5e-5, rtol=0)


def _phi_slope(a, w, s, v, u, xs, ts, c_pos, c_neg):
  # phi'(a) of `esvm._line_search` in float64, for one row.
  return (w @ s + a * (s @ s) - 2 * c_pos * max(1 - u - a * ts, 0.0) * ts +
          2 * c_neg * np.sum(np.maximum(1 + v + a * xs, 0.0) * xs))


@pytest.mark.parametrize("near", [False, True])
def test_line_search_settles_at_rounding_level(near):
  """The exact line search stops once its Newton corrections are float32 noise, at the float64
  minimiser: before `esvm.LINE_TOL`, rows whose phi' sat at its rounding floor never reached a
  fixed point (and a converged row was sent to the bisection by its own bracket), so nearly every
  batch ran all `line_steps`. near: from weights next to the optimum, whose tiny steps leave a
  itself to rounding (only a's effect on the decision values is checked there)."""
  rng = np.random.default_rng(0)
  n, d, b = 5000, 128, 64
  x = esvm._augment(jnp.asarray(rng.normal(size=(n, d)).astype(np.float32) * 0.3))
  t = esvm._augment(jnp.asarray(rng.normal(size=(b, d)).astype(np.float32) * 0.3))
  c_pos, c_neg = esvm.class_weights(n, 0.1)
  w = jnp.asarray(rng.normal(size=(b, d + 1)).astype(np.float32) * 0.05)
  if near:
    solver = attribute.Solver(SolverOptions())
    w_opt, _, _ = solver(np.asarray(t)[:, :-1], solver.prepare(np.asarray(x)[:, :-1]))
    w = jnp.asarray(w_opt) + 1e-6 * w
  v, u = w @ x.T, esvm._rowdot(t, w)
  # The solver's case: Newton directions (float64), their minimisers near 1.
  g = np.asarray(esvm._gradient(w, v, u, t, x, c_pos, c_neg), np.float64)
  x64, t64 = np.asarray(x, np.float64), np.asarray(t, np.float64)
  s = np.empty_like(g)
  for i in range(b):
    act = x64[np.asarray(v[i]) > -1]
    h = (np.eye(d + 1) + 2 * c_neg * act.T @ act +
         2 * c_pos * float(u[i] < 1) * np.outer(t64[i], t64[i]))
    s[i] = -np.linalg.solve(h, g[i])
  s = jnp.asarray(s.astype(np.float32))
  xs, ts = s @ x.T, esvm._rowdot(t, s)
  valid = jnp.ones((n,), bool)
  reach = jnp.maximum(jnp.max(jnp.abs(xs), -1), jnp.abs(ts))
  a, steps = esvm._line_search(w, s, v, u, xs, ts, valid, c_pos, c_neg, 40, reach)
  assert int(steps) <= 8, int(steps)
  f64 = [np.asarray(z, np.float64) for z in (w, s, v, u, xs, ts)]
  for i in range(b):
    args = [z[i] for z in f64] + [c_pos, c_neg]
    lo, hi = 0.0, 1.0
    while _phi_slope(hi, *args) < 0:
      hi *= 2
    for _ in range(100):
      mid = 0.5 * (lo + hi)
      lo, hi = (mid, hi) if _phi_slope(mid, *args) < 0 else (lo, mid)
    if near:  # a moves the decision values by at most ~1e-5 here
      assert abs(float(a[i]) - lo) * float(reach[i]) <= 1e-6, (i, float(a[i]), lo)
    else:
      assert abs(float(a[i]) - lo) <= 1e-4 * lo, (i, float(a[i]), lo)


def test_large_woodbury_steps_replace_dspace_cg():
  """Past their early iterations, targets with more than max_rows violators take Woodbury steps up
  to `solver.LARGE_ROWS_MAX` where CG would run in d-space, to the same optimum as CG steps; sets
  whose CG runs in candidate space (`esvm.gram_cg`) keep CG."""
  rng = np.random.default_rng(1)
  cand = (rng.normal(size=(3000, 64)) + 0.5).astype(np.float32)
  targets = (rng.normal(size=(64, 64)) + 0.5).astype(np.float32)
  solvers = [attribute.Solver(SolverOptions(max_rows=64)) for _ in range(2)]
  solvers[1].large_rows = solvers[1].large_rows[:0]  # CG above max_rows, as before
  cset = solvers[0].prepare(cand)
  assert not esvm.gram_cg(cset)
  (w, it, step), (w_cg, _, step_cg) = (s(targets, cset) for s in solvers)
  assert max(solvers[0]._steps) > 64 and solver_lib.PCG not in solvers[0]._steps
  assert solver_lib.PCG in solvers[1]._steps
  assert (step <= SolverOptions().tol).all() and (step_cg <= SolverOptions().tol).all()
  x = np.asarray(cset.x)
  np.testing.assert_allclose(np.asarray(w) @ x.T, np.asarray(w_cg) @ x.T, atol=1e-5, rtol=0)

  small = attribute.Solver(SolverOptions(max_rows=64))
  small_set = small.prepare((rng.normal(size=(600, 512)) * 0.1 + 0.05).astype(np.float32))
  assert esvm.gram_cg(small_set)
  _, _, step = small((rng.normal(size=(16, 512)) * 0.1 + 0.05).astype(np.float32), small_set)
  assert (step <= SolverOptions().tol).all()
  assert solver_lib.PCG in small._steps
  assert max(r for r in small._steps if r != solver_lib.PCG) <= 64

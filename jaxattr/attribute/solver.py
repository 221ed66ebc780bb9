"""`Solver`: the host-driven scheduler of batched ESVM Newton steps, the fast path for many targets.

`esvm.solve` runs one fixed-shape program: every target takes as many iterations as the slowest
in its batch, each with an active set big enough for the target with the most violators. Here
each Newton iteration is one compiled step, and between steps the host drops converged targets and
groups the rest by their number of margin violators: each group steps with the smallest
active-set size r in `ROW_BUCKETS` that holds its violators, in batches padded to powers of two;
batches of a few targets move into the padding of batches with larger active sets (`_batches`).
Cost then follows the mean iteration count and the typical active set rather than the maxima.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxattr.attribute import esvm
from jaxattr.attribute.options import AttributionError, SolverOptions

# With `SolverOptions.fallback64`: float32 iterations before a target continues in float64. A
# target that float32 has not converged by then is one of the few that stall at its rounding
# floor (a tolerance of 1e-5 with thousands of violators) or converge slowly (feature norms of
# ~1,000); float64, warm-started, finishes them in 1-8 iterations (from farther off, such as 20
# accurate float32 steps at norm ~1,000, `tests/test_esvm_exact_steps.py`: 2-21).
FLOAT32_ITERS = 20
# ... or earlier, once its steps stall: a step below STALL_NEAR x tol that is not at most
# STALL_RATIO times the one before. Near the optimum exact Newton steps shrink fast; steps that
# hover just above tol (measured: 1.1e-5, 1.3e-5, 1.0e-5, ... for 15 iterations, 1,224 of 1,300
# candidates violating, the active-set certificate defeated by candidates on the margin that
# rounding flips) are float32's rounding floor, which more float32 iterations do not pass.
STALL_NEAR = 100.0
STALL_RATIO = 0.5

# The first iterations of a target with more than max_rows violators take Woodbury steps on its
# first EARLY_ROWS violators (a descent direction, not the Newton step): from the starting
# point most candidates violate on every family (initial weights are a ridge fit), and CG needs
# ~26 iterations there on well-separated features (random-init Flax ResNet-18: 7x slower than
# these steps), while the active set is anyway far from the optimum's. Measured on 1,000 targets
# per family (with the earlier d-space preconditioner, a shared K alone): 3 such iterations
# instead of 4 take 0.7-1.0 fewer Newton iterations on average on the many-violator families
# (5-15% faster) and the same on Flax features; 2 cost Flax features 20% (CG needs ~42 iterations
# there then, 13-14 now; with the current one, 2 still cost them ~6%).
EARLY_ITERS = 3
EARLY_ROWS = 64
# ... and only while they pay: after a target's first step, an early step follows only if the last
# one cut its violators to at most EARLY_DROP of what they were. On random-init Flax features the
# first early step takes the median count from ~1,300 to ~160 and the stragglers keep falling; on
# the many-violator family (hard_torch) it goes 5,000 -> ~2,300 -> ~3,000 (the first EARLY_ROWS
# violators say little about a 3,000-violator optimum), so the second early step is its last
# and CG steps (4 CG iterations each there) follow: 5.2 Newton iterations instead of 5.9.
EARLY_DROP = 1.0

# Candidate sets with 2 c_neg sum_i ||x_i||^2 (a bound on the Hessian's condition number) above
# this skip float32: from feature norms of ~1,000 (ImageNet-shaped classes: ~1e8) float32 steps
# lose most of their digits and take ~20 iterations before the float64 continuation finishes
# them (24 in all, on average); float64 from the start takes 9.7. Features of norms up to ~30
# (<= ~2e5) stay below.
FLOAT64_CONDITION = 1e6

# The `_step` key of CG steps (`esvm.pcg_step`), for targets with more than max_rows violators.
PCG = 0

# A target whose last step moved some decision value by more than this, with an active set that
# holds all its violators and a shared Gram, takes a coarse step (`esvm.newton_step`'s `coarse`:
# two products with the candidates instead of four, accurate to ~1e-4). Such targets are far from
# their optimum, where that error does not matter: the exact line search follows whatever
# direction it is given, and the accurate steps after it reach the same optimum. Measured on
# random-init Flax features (5,000 x 513 per class): thresholds of 0.2-0.5 solve 1,000 targets of
# class 0 7-9% faster at the same mean iteration count (5.72 -> 5.74), class 3 3% faster, all ten
# classes 2% once compiled (both forms share one program per shape); 0.05 takes 6.04 iterations.
COARSE_ABOVE = 0.25

# Active-set sizes: a step costs an [r, r] Gram gather and Cholesky per target (cubic in r), so
# each target uses the smallest size that holds its violators.
ROW_BUCKETS = (64, 128, 160, 192, 224, 256, 320, 384, 512)

# Targets with more than max_rows violators take CG steps (`esvm.pcg_step`) past their early
# iterations, except in d-space sets (`esvm.gram_cg` false) while they have at most this many:
# there each CG iteration costs two products with the candidates, and the few such targets of
# random-init Flax features (~50 of 1,000, 225-2,837 violators, median ~240) take ~15 of them per
# step (~4.7 ms a target-step against ~0.9 at r = 256). Measured on 1,000 targets, paired runs in
# one process: Flax features class 0 1.10x (every round 1.04-1.26x), class 3 1.03x, the
# many-violator families unchanged (their CG targets have thousands of violators). Candidate-space
# CG (ImageNet-shaped classes, ~1,300 candidates) is cheap, and Woodbury at these sizes made that
# family 2.3x slower, so those sets keep CG.
LARGE_ROWS_MAX = 384

# Batch caps on CPU devices, per device (`SolverOptions.max_batch` None): a step's [B, r, r]
# systems and [B, n] arrays are reread by several passes, fastest while they stay in the
# last-level cache: B r <= CPU_BATCH_ROWS and B n <= CPU_BATCH_VALUES. Accelerators take whole
# groups.
CPU_BATCH_ROWS = 1 << 14
CPU_BATCH_VALUES = 1 << 20
# CG steps (`esvm.pcg_step`) are [B, D] x [D, n] products with the whole candidate set, which
# larger batches reuse better: measured on 1,000 targets, batches of 256 (per device) instead of 16
# ran 1.6x (5,000 x 513, most violating) to 2.6x (1,300 x 2,049) faster; 64-1,024 within ~10%.
CPU_PCG_BATCH = 256


class Solver:
  """Solves many targets' Exemplar-SVMs against one candidate set, scheduling steps on the host.

  Where a target's violators fit in `max_rows` its steps are `esvm.solve`'s exact Newton steps,
  or while it is still far from its optimum their cheaper coarse form (`COARSE_ABOVE`); targets
  with more take exact steps by preconditioned CG (`esvm.pcg_step`), grouped apart. Whatever the
  path, a target converges only on an exact step, to the same optimum. The per-target state
  (weights, decision values) stays on the device(s); only batch indices and a few [targets]
  counters cross between host and device per step. The grouping is deterministic.
  """

  def __init__(self, options: SolverOptions = SolverOptions(),
               mesh: jax.sharding.Mesh | None = None):
    """Compiles nothing yet: a step is compiled per (active-set size, batch size) on first use.

    Args:
      options: the solver's options.
      mesh: optional 1-axis mesh; batches are sharded over its axis (padded to a multiple of its
        size) and the targets' state is replicated. None: the default device.
    """
    self.options = o = options
    self.rows = tuple(r for r in ROW_BUCKETS if r < o.max_rows) + (o.max_rows,)
    self.large_rows = np.asarray([r for r in ROW_BUCKETS if o.max_rows < r <= LARGE_ROWS_MAX],
                                 np.int64)
    self.mesh = mesh
    self.num_devices = 1 if mesh is None else mesh.size
    self.min_batch = -(-o.min_batch // self.num_devices) * self.num_devices
    devices = jax.devices() if mesh is None else list(mesh.devices.flat)
    self.on_cpu = devices[0].platform == "cpu"
    self._steps: dict[int, Any] = {}
    self.coarse_steps = 0  # target-steps taken in the coarse form (`COARSE_ABOVE`), all calls
    self._replicated = (None if mesh is None else jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec()))
    # Several XLA:CPU devices running LAPACK kernels at once can deadlock
    # (`linalg.cholesky`): such meshes solve without LAPACK, and prepare the candidate set
    # (a Cholesky) on one device, then copy it to all. Accelerators keep LAPACK/cuSOLVER.
    self.pure_solve = self.num_devices > 1 and self.on_cpu
    self._prepare = jax.jit(functools.partial(esvm.prepare, options=o, pcg=False))
    self._init = self._sharded(self._initial, (True, False), (False,) * 5)

  def _sharded(self, fn, in_specs, out_specs, donate_argnums=()):
    # fn sees the whole batch (mesh None) or its device's share of it (shard_map); state arrays
    # are replicated (PartitionSpec()), batch arrays split over the mesh axis (True).
    if self.mesh is None:
      return jax.jit(fn, donate_argnums=donate_argnums)

    def specs(splits):
      return tuple(jax.sharding.PartitionSpec(*self.mesh.axis_names[:int(s)]) for s in splits)

    return jax.jit(
        jax.shard_map(fn, mesh=self.mesh, in_specs=specs(in_specs), out_specs=specs(out_specs),
                      check_vma=False), donate_argnums=donate_argnums)

  def _all(self, a: jax.Array) -> jax.Array:
    # Inside `_sharded`: every device's rows of a batch array, in order.
    if self.mesh is None:
      return a
    return jax.lax.all_gather(a, self.mesh.axis_names[0], tiled=True)

  def _initial(self, targets, cset):
    # The per-target state, replicated: augmented targets t, t x^T (fixed; only the Gram path
    # reads it), starting weights w, their decision values v = w x^T, and their violators.
    t = esvm._augment(targets.astype(cset.x.dtype))
    w = esvm.initial_weights(targets, cset)
    v = w @ cset.x.T
    tx = t @ cset.x.T if cset.gram is not None else jnp.zeros((t.shape[0], 0), t.dtype)
    count = jnp.sum((v > -1.0) & cset.valid, -1)
    return tuple(self._all(a) for a in (t, tx, w, v, count))

  def _step(self, rows: int):
    if rows not in self._steps:

      def fn(t_all, tx_all, w_all, v_all, read, write, coarse, cset):
        # One Newton step of the targets `read`; their new weights and decision values are
        # written back to rows `write` of the state (out-of-range rows: padding, dropped).
        # rows == PCG: CG in d-space (`esvm.pcg_step`), for targets with more than max_rows
        # violators; coarse (a scalar): `esvm.newton_step`'s coarse form (`COARSE_ABOVE`), in
        # the same program as the accurate one.
        if rows == PCG:
          new = esvm.pcg_step(t_all[read], w_all[read], cset, self.options.line_steps,
                              v=v_all[read], tx=tx_all[read] if cset.gram is not None else None,
                              pure_solve=self.pure_solve)
        else:
          new = esvm.newton_step(t_all[read], w_all[read], cset, min(rows, cset.x.shape[0]),
                                 self.options.line_steps, self.pure_solve, v=v_all[read],
                                 tx=tx_all[read] if cset.gram is not None else None, coarse=coarse)
        write = self._all(write)
        w_all = w_all.at[write].set(self._all(new.w), mode="drop")
        v_all = v_all.at[write].set(self._all(new.v), mode="drop")
        return w_all, v_all, new.step, new.next_count

      self._steps[rows] = self._sharded(fn, (False,) * 4 + (True, True, False, False),
                                        (False, False, True, True), donate_argnums=(2, 3))
    return self._steps[rows]

  def prepare(self, candidates: jax.Array, valid: jax.Array | None = None) -> esvm.CandidateSet:
    """The device-side candidate set [n, d], shared by every call (replicated over the mesh).

    Raises:
      AttributionError: candidates that are not float [n >= 1, d >= 1] (`esvm.check_problem`;
        their values are not read: `ranking.check_inputs` checks those).
    """
    shape = np.shape(candidates)
    if len(shape) != 2 or not shape[0] or not shape[1] or not jnp.issubdtype(
        jnp.result_type(candidates), jnp.floating):
      raise AttributionError(f"Solver.prepare: candidates must be a 2-D float array [N >= 1, "
                             f"d >= 1], got shape {shape} {jnp.result_type(candidates)}")
    if self.mesh is None:
      return self._prepare(candidates, valid=valid)
    first = self.mesh.devices.flat[0]
    valid = None if valid is None else jax.device_put(valid, first)
    cset = self._prepare(jax.device_put(candidates, first), valid=valid)
    return jax.device_put(cset, self._replicated)

  def _in_float64(self, cset: esvm.CandidateSet) -> bool:
    # Whether this set's targets are solved in float64 from the start (`FLOAT64_CONDITION`).
    return self.options.fallback64 and float(_condition(cset.x, cset.c_neg)) > FLOAT64_CONDITION

  def _on_first(self, fn, cset: esvm.CandidateSet, *args) -> esvm.CandidateSet:
    # fn(cset, *args) computed on one device (a Cholesky: see `pure_solve`), then replicated.
    if self.mesh is None:
      return fn(cset, *args)
    out = fn(jax.device_put(cset, self.mesh.devices.flat[0]), *args)
    return jax.device_put(out, self._replicated)

  def _prepare64(self, cset: esvm.CandidateSet) -> esvm.CandidateSet:
    # `cset` prepared again in float64 (call under jax.enable_x64): an ill-conditioned set's
    # float32 Gram and starting-point factor are not accurate enough even for a start (with
    # rank-deficient features and a large C, not even finite). Only weights leave the float64
    # solve, so its own candidate order (float64 norms) does not matter.
    return self._on_first(lambda c: self._prepare(c.x[:, :-1].astype(jnp.float64), valid=c.valid),
                          cset)

  def _batch_size(self, count: int) -> int:
    # The padded size of a batch of `count` targets: a power of two (few compiled shapes), at
    # least min_batch, a multiple of the devices.
    b = max(self.min_batch, 1 << int(np.ceil(np.log2(count))))
    return -(-b // self.num_devices) * self.num_devices

  def _padded(self, sel: np.ndarray) -> np.ndarray:
    # A batch padded to `_batch_size`; padding repeats a real target, whose duplicate result is
    # dropped.
    return np.concatenate([sel, np.full((self._batch_size(len(sel)) - len(sel),), sel[0])])

  def __call__(self, targets: np.ndarray,
               cset: esvm.CandidateSet) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Solves every target against `cset`.

    Args:
      targets: [targets, d] host array.
      cset: from `prepare`.

    Returns:
      Host arrays: weights [targets, d + 1], iterations [targets], last Newton step [targets]
      (`esvm.NewtonStep.step`). With `options.fallback64`, targets that float32 has not brought
      to `options.tol` within FLOAT32_ITERS iterations, or whose steps stall before (`STALL_NEAR`;
      they are at float32's rounding floor
      or converge slowly: feature norms of ~1,000) continue in float64 from their float32
      weights, for up to max_iter iterations more; their iterations count both phases.
      Nothing here raises for targets that still did not converge (step > options.tol) or came
      out non-finite: `ranking.topk` and `esvm.check_solution` do.

    Raises:
      AttributionError: targets that are not float [T, d] with the candidate set's d.
    """
    targets = np.asarray(targets)
    d = cset.x.shape[1] - 1
    if targets.ndim != 2 or targets.shape[1] != d or not np.issubdtype(targets.dtype, np.floating):
      raise AttributionError(f"Solver: targets must be a 2-D float array [T, d={d}] (the candidate "
                             f"set's d), got shape {targets.shape} {targets.dtype}")
    o = self.options
    if self._in_float64(cset):  # ill-conditioned for float32 (`FLOAT64_CONDITION`)
      with jax.enable_x64(True):
        return self._iterate(targets.astype(np.float64), self._prepare64(cset))
    float32_iters = min(o.max_iter, FLOAT32_ITERS) if o.fallback64 else None
    w, it, step = self._iterate(targets.astype(np.float32), cset, max_iter=float32_iters,
                                stall=o.fallback64)
    bad = np.flatnonzero(~(step <= self.options.tol))
    if len(bad) and self.options.fallback64:
      logging.info(
          "ESVM: %d of %d targets not converged in float32 (stalled, or %d iterations); "
          "continuing them in float64 from their float32 weights", len(bad), len(targets),
          float32_iters)
      with jax.enable_x64(True):
        cset64 = _float64(cset, o.C)
        shared = [
            a for a in (cset64.gram, cset64.ridge_chol, cset64.pcg_vectors, cset64.pcg_pairs,
                        cset64.gram_basis) if a is not None
        ]
        # float32 broke down (NaN weights, or an overflow in the shared matrices): the problem is
        # too ill-conditioned for float32's shared matrices too, so float64 prepares its own.
        if not np.isfinite(w[bad]).all() or not all(bool(jnp.isfinite(a).all()) for a in shared):
          cset64 = self._prepare64(cset)
        w64, it64, step64 = self._iterate(targets[bad].astype(np.float64), cset64,
                                          w0=w[bad].astype(np.float64))
      w[bad], it[bad], step[bad] = w64, it[bad] + it64, step64
      logging.info("ESVM: float64 converged %d of %d", int(np.sum(step64 <= self.options.tol)),
                   len(bad))
    return w, it, step

  def _iterate(self, targets: np.ndarray, cset: esvm.CandidateSet, w0: np.ndarray | None = None,
               max_iter: int | None = None,
               stall: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # The host loop of `__call__` in the dtype of `targets` and `cset`, from `w0` [T, D] when
    # given, else from `esvm.initial_weights`. stall: a target whose steps stall (`STALL_NEAR`)
    # stops iterating, unconverged.
    o = self.options
    max_iter = o.max_iter if max_iter is None else max_iter
    n = len(targets)
    pad = self._padded(np.arange(n))
    t_all, tx_all, w_all, v_all, count = self._init(targets[pad], cset)
    if w0 is not None:  # a warm start (the float64 fallback starts from float32's weights)
      w_all, v_all, count = _restart(jnp.asarray(w0[pad], w_all.dtype), w_all, cset.x, cset.valid)
    count = np.array(count[:n])
    it = np.zeros((n,), np.int32)
    step = np.full((n,), np.inf, targets.dtype)
    stalled = np.zeros((n,), bool)
    coarse = np.zeros((n,), bool)  # the last step was coarse: not a convergence test
    last_count = count.copy()  # violators before the last step (`EARLY_DROP`)
    while True:
      active = np.flatnonzero(((step > o.tol) | coarse) & (it < max_iter) & ~stalled)
      if not len(active):
        break
      # The counts are exact: they come from the decision values the next step starts from.
      rows = np.asarray(self.rows)
      sizes = rows[np.minimum(np.searchsorted(rows, count[active]), len(rows) - 1)]
      # More violators than max_rows: exact steps by CG (`esvm.pcg_step`, cost independent of r),
      # except in a target's first EARLY_ITERS iterations, where its active set is still far
      # from the optimum's and a cheap step on its first EARLY_ROWS violators moves it as far.
      big = count[active] > self.rows[-1]
      early = (it[active] < EARLY_ITERS) & ((it[active] == 0) |
                                            (count[active] <= EARLY_DROP * last_count[active]))
      sizes[big & early] = min(EARLY_ROWS, self.rows[-1])
      sizes[big & ~early] = PCG
      # ... or, past its early iterations and in d-space sets (`LARGE_ROWS_MAX`), Woodbury at
      # the smallest larger size that holds its violators.
      if len(self.large_rows) and not esvm.gram_cg(cset):
        fits = big & ~early & (count[active] <= self.large_rows[-1])
        sizes[fits] = self.large_rows[np.searchsorted(self.large_rows, count[active][fits])]
      # Groups smaller than a minimal batch join the next larger size (a bigger active set is
      # still exact): fewer small calls and fewer compiled shapes.
      present = np.unique(sizes[sizes != PCG])
      for small, larger in zip(present[:-1], present[1:]):
        if np.sum(sizes == small) < self.min_batch:
          sizes[sizes == small] = larger
      if PCG in sizes and not cset.has_pcg:
        cset = self._on_first(_with_pcg, cset)  # formed once per call, when first needed
      # Far from the optimum, with every violator in the active set: a coarse step.
      coarse[active] = ((sizes != PCG) & ~(big & early) & (step[active] > COARSE_ABOVE) &
                        (cset.gram is not None))
      # Every batch of this round is dispatched before any result is read, so that the host's
      # bookkeeping overlaps the device's work.
      pending = []
      for r, kind, sel in self._batches(active, sizes, coarse[active], cset.x.shape[0]):
        coarse[sel] = kind  # a coarse target packed into an accurate batch steps accurately
        read = self._padded(sel).astype(np.int32)
        write = np.where(np.arange(len(read)) < len(sel), read, len(pad)).astype(np.int32)
        w_all, v_all, out_step, out_count = self._step(r)(t_all, tx_all, w_all, v_all, read, write,
                                                          np.bool_(kind), cset)
        self.coarse_steps += len(sel) if kind else 0
        pending.append((sel, out_step, out_count))
      before = step[active]
      last_count[active] = count[active]
      for sel, out_step, out_count in pending:
        step[sel], count[sel] = np.asarray(out_step)[:len(sel)], np.asarray(out_count)[:len(sel)]
      it[active] += 1
      if stall:
        stalled[active] = ((step[active] > o.tol) & (step[active] < STALL_NEAR * o.tol) &
                           (step[active] > STALL_RATIO * before) & ~coarse[active])
    # A target whose last step was coarse (max_iter reached) has no convergence test yet.
    return np.array(w_all)[:n], it, np.where(coarse, np.inf, step).astype(step.dtype)

  def _batches(self, active: np.ndarray, sizes: np.ndarray, coarse: np.ndarray,
               num_candidates: int) -> list[tuple[int, bool, np.ndarray]]:
    """One round's calls: (active-set size or PCG, coarse, targets), in a deterministic order.

    Each (size, form) group is split into capped batches (`_split`). A batch of fewer than
    min_batch targets (a group's remainder, or a small group late in the solve) then moves into
    the padding of another Woodbury batch whose active set is at least as large (still exact)
    and whose form it may take: coarse targets go anywhere, accurate ones into accurate batches,
    or into another such small batch, which then steps accurately. Padding slots are computed
    anyway, so every move saves a call (~5-10 ms on CPU) and costs nothing.
    """
    batches = []
    for r, kind in sorted(set(zip(sizes.tolist(), coarse.tolist()))):
      cap = self._batch_cap(r, num_candidates)
      for sel in self._split(active[(sizes == r) & (coarse == kind)], cap):
        batches.append([r, kind, sel])

    def small(b):
      return len(b[2]) < self.min_batch

    for b in [b for b in batches if small(b) and b[0] != PCG]:
      if not small(b):  # it took in others before
        continue
      hosts = [
          h for h in batches if h is not b and h[0] != PCG and h[0] >= b[0] and
          (h[1] <= b[1] or small(h)) and self._batch_size(len(h[2])) - len(h[2]) >= len(b[2])
      ]
      if hosts:
        h = min(hosts, key=lambda h: (h[0], h[1] != b[1]))
        h[1], h[2] = h[1] and b[1], np.concatenate([h[2], b[2]])
        batches = [a for a in batches if a is not b]
    return [(r, kind, sel) for r, kind, sel in batches]

  def _batch_cap(self, rows: int, num_candidates: int) -> int | None:
    """The most targets of one step with r = rows (`SolverOptions.max_batch`); None: no cap."""
    if self.options.max_batch is not None:
      per_device = max(1, self.options.max_batch // self.num_devices)
    elif self.on_cpu and rows == PCG:
      per_device = CPU_PCG_BATCH
    elif self.on_cpu:
      per_device = min(CPU_BATCH_ROWS // rows, CPU_BATCH_VALUES // num_candidates)
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
      b = self._batch_size(len(sel))
      if len(sel) < 0.75 * b and len(sel) > self.min_batch:
        b //= 2
        parts.append(sel[:b])
        sel = sel[b:]
      else:
        parts.append(sel)
        break
    return parts


@jax.jit
def _condition(x: jax.Array, c_neg: jax.Array) -> jax.Array:
  # 2 c_neg sum_i ||x_i||^2 >= the largest eigenvalue of the Hessian's candidate term.
  return 2.0 * c_neg * jnp.sum(jnp.square(x.astype(jnp.float32)))


_with_pcg = jax.jit(esvm.with_pcg)


@jax.jit
def _restart(w: jax.Array, w_init: jax.Array, x: jax.Array, valid: jax.Array):
  # The state of given weights: (w, decision values w x^T, violator counts); rows of w with a
  # NaN/inf (float32 broke down) start from `esvm.initial_weights` (w_init) instead.
  w = jnp.where(jnp.all(jnp.isfinite(w), -1, keepdims=True), w, w_init)
  v = w @ x.T
  return w, v, jnp.sum((v > -1.0) & valid, -1)


def _float64(cset: esvm.CandidateSet, C: float) -> esvm.CandidateSet:
  """`cset` in float64 without preparing it again (for D = 2049 a float64 `prepare` costs ~1 s):
  the candidates (float32 values) and class weights are exact; the Gram, the starting point's
  factor and the preconditioner keep float32's accuracy. The preconditioner needs no more, and
  a Gram off by ~1e-7 relative makes a Woodbury step inexact by as much, far inside the active-set
  certificate's slack (`esvm.CERT_SLACK`)."""
  out = jax.tree_util.tree_map(
      lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, cset)
  count = jnp.sum(cset.valid).astype(jnp.float64)
  return out._replace(c_pos=C * (count + 1.0) / 2.0, c_neg=C * (count + 1.0) / (2.0 * count))

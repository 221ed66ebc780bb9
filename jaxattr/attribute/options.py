"""`SolverOptions`: the ESVM solver's options, with the one default of each."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class SolverOptions:
  """The ESVM solver's options: the one place that gives their defaults.

  Frozen and hashable, so it is a static argument of jitted functions and a cache key.

  Attributes:
    C: sklearn's C.
    tol: a target has converged once its Newton step would move no decision value by more.
    max_iter: Newton iterations per target.
    max_rows: r, the most margin violators an exact Newton step handles (an [r, r] Cholesky per
      target); with more, steps are approximate (still convergent, more slowly).
    line_steps: most safeguarded Newton steps of the exact line search.
    shared_gram_max: candidate sets of at most this many rows form their [n, n] Gram once, shared
      by all targets; larger ones gather the active rows at every step.
    init_rows: the starting point counts this many smallest-norm candidates as violators.
    approx_rows: `Solver` only: the active-set size of the approximate steps of targets with more
      than max_rows violators in their first `approx_iters` iterations (their active set is then
      far from the optimum's: more rows barely help but cost cubically more).
    approx_iters: see approx_rows.
    min_batch: `Solver` only: the smallest padded batch of a step.
    max_batch: `Solver` only: the largest batch of a step (rounded down to a power of two times
      the devices). None: on CPU devices capped so that a step's arrays stay in cache
      (`solver.CPU_BATCH_ROWS`), on accelerators whole groups.
  """

  C: float = 0.1
  tol: float = 1e-5
  max_iter: int = 50
  max_rows: int = 224
  line_steps: int = 12
  shared_gram_max: int = 8192
  init_rows: int = 256
  approx_rows: int = 64
  approx_iters: int = 4
  min_batch: int = 16
  max_batch: int | None = None

  def __post_init__(self):
    for name in ("C", "tol", "max_iter", "max_rows", "line_steps", "init_rows", "approx_rows",
                 "min_batch"):
      if not getattr(self, name) > 0:  # also rejects NaN
        raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
    for name in ("shared_gram_max", "approx_iters"):
      if not getattr(self, name) >= 0:
        raise ValueError(f"{name} must be non-negative, got {getattr(self, name)!r}")
    if self.max_batch is not None and not self.max_batch > 0:
      raise ValueError(f"max_batch must be positive, got {self.max_batch!r}")

  @classmethod
  def from_config(cls, config: Any) -> SolverOptions:
    """From `config.attribution` (C, tol, max_iter, max_rows); the rest keep their defaults."""
    return cls(C=float(config.C), tol=float(config.tol), max_iter=int(config.max_iter),
               max_rows=int(config.max_rows))

"""`SolverOptions`: the ESVM solver's options, with the one default of each; and the errors of
`jaxattr.attribute` (here, below every module that raises them: `ranking` re-exports them)."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any


class AttributionError(ValueError):
  """Bad attribution input or result: the message names the argument, setting or targets at
  fault, what was got, what was expected and what to change."""


class NotConvergedError(AttributionError):
  """Some targets' Exemplar-SVMs did not converge within the solver's settings."""


# The fields that `SolverOptions.from_config` reads from `config.attribution`: errors name them
# as that config field, the others as the dataclass field.
CONFIG_FIELDS = ("C", "tol", "max_iter", "max_rows")
_INT_FIELDS = ("max_iter", "max_rows", "line_steps", "shared_gram_max", "init_rows", "min_batch")


def option_name(field: str) -> str:
  """How an error names a solver option: ``attribution.C`` (a config field) or
  ``SolverOptions.line_steps``."""
  return f"attribution.{field}" if field in CONFIG_FIELDS else f"SolverOptions.{field}"


@dataclasses.dataclass(frozen=True)
class SolverOptions:
  """The ESVM solver's options: the one place that gives their defaults.

  Frozen and hashable, so it is a static argument of jitted functions and a cache key. Every
  value is checked on construction (AttributionError naming ``attribution.<field>`` for the
  fields of `config.attribution`, else ``SolverOptions.<field>``).

  Attributes:
    C: sklearn's C (finite, > 0).
    tol: a target has converged once its Newton step would move no decision value by more (> 0).
    max_iter: Newton iterations per target.
    max_rows: r, the most margin violators a Woodbury Newton step handles (an [r, r] Cholesky per
      target); with more, the step is solved as exactly by preconditioned CG (`esvm.pcg_step`),
      except that `Solver` takes Woodbury steps up to `solver.LARGE_ROWS_MAX` for targets past
      their early iterations where CG runs in d-space (measured cheaper there).
    line_steps: most safeguarded Newton steps of the exact line search.
    shared_gram_max: candidate sets of at most this many rows form their [n, n] Gram once, shared
      by all targets; larger ones gather the active rows at every step.
    init_rows: the starting point counts this many smallest-norm candidates as violators.
    min_batch: `Solver` only: the smallest padded batch of a step.
    max_batch: `Solver` only: the largest batch of a step (rounded down to a power of two times
      the devices). None: on CPU devices capped so that a step's arrays stay in cache
      (`solver.CPU_BATCH_ROWS`), on accelerators whole groups.
    fallback64: `Solver` only: targets that float32 does not converge are solved again in float64
      (feature norms of ~1,000 make the Newton systems too ill-conditioned for float32).
  """

  C: float = 0.1
  tol: float = 1e-5
  max_iter: int = 50
  max_rows: int = 224
  line_steps: int = 12
  shared_gram_max: int = 8192
  init_rows: int = 256
  min_batch: int = 16
  max_batch: int | None = None
  fallback64: bool = True

  def __post_init__(self):
    for name in ("C", "tol"):
      value = getattr(self, name)
      if (isinstance(value, bool) or not isinstance(value, numbers.Real) or
          not math.isfinite(value) or not value > 0):
        raise AttributionError(f"{option_name(name)} must be positive and finite, got {value!r}" +
                               (" (the default, sklearn's, is 0.1)" if name == "C" else ""))
    for name in _INT_FIELDS + ("max_batch",):
      value = getattr(self, name)
      if name == "max_batch" and value is None:
        continue
      low = 0 if name == "shared_gram_max" else 1
      if isinstance(value, numbers.Real) and not value >= low:  # also NaN
        raise AttributionError(f"{option_name(name)} must be " +
                               ("non-negative" if low == 0 else "positive") + f", got {value!r}")
      if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise AttributionError(
            f"{option_name(name)} must be an integer, got {value!r} ({type(value).__name__})")

  @classmethod
  def from_config(cls, config: Any) -> SolverOptions:
    """From `config.attribution` (C, tol, max_iter, max_rows); the rest keep their defaults.

    Raises:
      AttributionError: a value that is not a number of the field's kind, or out of range.
    """
    values = {name: getattr(config, name) for name in CONFIG_FIELDS}
    for name, value in values.items():
      if isinstance(value, numbers.Real) and not isinstance(value, bool):
        if name in ("C", "tol"):
          values[name] = float(value)
        elif float(value).is_integer():
          values[name] = int(value)  # 50.0 (e.g. from a command line) is 50
    return cls(**values)

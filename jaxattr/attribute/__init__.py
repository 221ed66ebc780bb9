"""Attribution by retrieval in feature space: batched Exemplar-SVMs, l2 and cosine top-k.

Modules:
  options      `SolverOptions`, the ESVM solver's options (one default each).
  esvm         the math: `esvm_scores`, `solve`, `prepare`, `newton_step`, `finish`.
  linalg       the batched SPD solves of the Newton steps (LAPACK and LAPACK-free).
  solver       `Solver`, the host-driven scheduler of Newton steps for many targets.
  ranking      `topk`: chunked, sharded, resumable top-k of any method, and its input checks.
  selection    `host_topk`: top_k's selection on the host (CPU devices).
  trak         TRAK: per-example gradients, projection, estimator (`trak.Trak`).
  attribution  the stage: `attribution.run(config, workdir)` -> WORKDIR/attribution/<method>/.
"""

from jaxattr.attribute import attribution
from jaxattr.attribute.esvm import (
    CandidateSet,
    NewtonStep,
    SolverStats,
    class_weights,
    esvm_scores,
    solve,
)
from jaxattr.attribute.options import SolverOptions
from jaxattr.attribute.ranking import (
    METHODS as FEATURE_METHODS,
    AttributionError,
    NotConvergedError,
    TopK,
    check_inputs,
    padded_sizes,
    plan_chunks,
    topk,
)
from jaxattr.attribute.selection import host_topk
from jaxattr.attribute.solver import Solver

# Every attribution method: the feature-space ones of `ranking.topk` and TRAK (`trak`), which
# trains its own models on the images.
METHODS = FEATURE_METHODS + ("trak",)

__all__ = [
    "METHODS", "AttributionError", "CandidateSet", "NewtonStep", "NotConvergedError", "Solver",
    "SolverOptions", "SolverStats", "TopK", "attribution", "check_inputs", "class_weights",
    "esvm_scores", "host_topk", "padded_sizes", "plan_chunks", "solve", "topk"
]

"""Attribution by retrieval in feature space: batched Exemplar-SVMs, l2 and cosine top-k.

Public API:
  esvm_scores(targets, candidates, C=0.1) -> decision values [targets, candidates]
  solve(...)                                -> weights, decision values, SolverStats
  topk(train_features, train_labels, test_features, test_labels, method=..., k=...) -> TopK
  run(config, workdir)                      -> writes WORKDIR/attribution/<method>/
  default_config()                          -> the config.attribution section
"""

from jaxattr.attribute.esvm import SolverStats, class_weights, esvm_scores, solve
from jaxattr.attribute.pipeline import (METHODS, AttributionError, TopK, default_config,
                                        load_features, plan_chunks, run, select_targets, topk,
                                        validate)

__all__ = ["METHODS", "AttributionError", "SolverStats", "TopK", "class_weights",
           "default_config", "esvm_scores", "load_features", "plan_chunks", "run",
           "select_targets", "solve", "topk", "validate"]

"""The reference the ESVM benchmarks time jaxattr against: scikit-learn's LinearSVC, fitted per
target as the paper's code does (C=0.1, class_weight='balanced', tol=1e-6, max_iter=10,000)."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning

SKLEARN_MAX_ITER = 10000  # the reference's setting


def sklearn_fit(target: np.ndarray, candidates: np.ndarray, dual) -> tuple[np.ndarray, bool]:
  """(decision values of the candidates, whether liblinear stopped before max_iter)."""
  from sklearn.svm import LinearSVC  # pylint: disable=g-import-not-at-top

  x = np.vstack([target[None], candidates])
  y = np.r_[1, np.zeros(len(candidates))]
  clf = LinearSVC(C=0.1, class_weight="balanced", tol=1e-6, max_iter=SKLEARN_MAX_ITER, dual=dual)
  with warnings.catch_warnings():
    # Counted instead (`n_iter_`): the dual solver, randomly ordered (the reference sets no
    # random_state), sometimes runs out of iterations and stops ~1e-3 short.
    warnings.simplefilter("ignore", ConvergenceWarning)
    clf.fit(x, y)
  return clf.decision_function(candidates), bool(clf.n_iter_ < SKLEARN_MAX_ITER)

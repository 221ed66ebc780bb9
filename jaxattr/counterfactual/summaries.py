"""Support results on disk: per (metric, method) results.jsonl, summary.json and curves.

`write_outputs` writes ``WORKDIR/support/<metric>/<method>/{results.jsonl, summary.json,
curve.png}`` of one finished search; `plot_curves` draws every method of a metric on
``WORKDIR/support/<metric>/curves.png``; `load_results` and `support_stats` read them back (the
report uses these).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from jaxattr import utils
from jaxattr.counterfactual.bisection import SearchResult

# Thresholds at which the summary reports the fraction of flipped targets (images).
THRESHOLDS = (10, 20, 40, 80, 160, 320, 640, 1280)


def support_stats(support: np.ndarray, k: int) -> dict[str, Any]:
  """Support statistics over targets.

  -1 ("not flipped within k") counts as infinitely large: it sorts above every k in the median and
  never counts as flipped. `median_support` is None when the median falls on such a target.

  Args:
    support: int [T], support per target, -1 = not flipped.
    k: the largest prefix size searched.

  Returns:
    {'targets', 'median_support', 'median_support_flipped_only', 'not_flipped' (count of -1),
     'fraction_flipped' ({threshold: fraction of ALL targets with 0 <= support <= threshold} for
     the thresholds 10, 20, ..., 1280 up to k, plus k), 'median_unflipped_as'}.
  """
  support = np.asarray(support, np.int64)
  as_float = np.where(support < 0, np.inf, support.astype(np.float64))
  median = float(np.median(as_float)) if len(support) else float("nan")
  flipped = support[support >= 0]
  thresholds = sorted({t for t in THRESHOLDS if t <= k} | {int(k)})
  n = max(len(support), 1)
  return {
      "targets": len(support),
      "median_support": median if np.isfinite(median) else None,
      "median_unflipped_as": "infinity",
      "median_support_flipped_only": float(np.median(flipped)) if len(flipped) else None,
      "not_flipped": int((support < 0).sum()),
      "fraction_flipped": {
          str(t): float(((support >= 0) & (support <= t)).sum() / n) for t in thresholds
      },
  }


def cumulative_curve(support: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """x = 1..k (images) and y = fraction of targets flipped with <= x images (-1 never).

  Args:
    support: int [T], support per target, -1 = not flipped.
    k: the largest prefix size searched.

  Returns:
    (xs int [k], ys float [k]).
  """
  support = np.asarray(support, np.int64)
  xs = np.arange(1, int(k) + 1)
  ok = np.sort(support[support >= 0])
  ys = np.searchsorted(ok, xs, side="right") / max(len(support), 1)
  return xs, ys


def plot_curves(workdir: str, metric: str, out: str | None = None) -> str | None:
  """One figure with the cumulative support curve of every method under WORKDIR/support/<metric>.

  Returns:
    The PNG path (default WORKDIR/support/<metric>/curves.png), or None when no method has
    results yet.
  """
  root = os.path.join(workdir, "support", metric)
  curves = {}
  for method in sorted(os.listdir(root)) if os.path.isdir(root) else []:
    loaded = load_results(os.path.join(root, method))
    if loaded is not None:
      curves[method] = loaded
  if not curves:
    return None
  out = out or os.path.join(root, "curves.png")
  _plot(curves, f"{metric} support", out)
  return out


def load_results(method_dir: str) -> tuple[np.ndarray, int] | None:
  """(support int64 [T], k) of a finished search in `method_dir`, or None if there is none."""
  path = os.path.join(method_dir, "results.jsonl")
  summary = os.path.join(method_dir, "summary.json")
  if not (os.path.exists(path) and os.path.exists(summary)):
    return None
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  with open(summary) as f:
    k = int(json.load(f)["k"])
  return np.array([r["support"] for r in rows], np.int64), k


def write_outputs(out_dir: str, metric: str, method: str, result: SearchResult,
                  target_ids: np.ndarray, true_labels: np.ndarray, flip: np.ndarray | None,
                  config: ml_collections.ConfigDict, fingerprint: str = "",
                  wall_seconds: float | None = None) -> dict[str, Any]:
  """Writes results.jsonl, summary.json and curve.png of one (metric, method).

  Args:
    out_dir: WORKDIR/support/<metric>/<method>.
    metric: 'removal' or 'mislabel'.
    method: the method's name.
    result: its search's outcome for T targets.
    target_ids: int64 [T], test `index` values.
    true_labels: int [T].
    flip: int [T] flip classes (mislabel), or None.
    config: the `support` section.
    fingerprint: the search's input fingerprint (a rerun with the same one is skipped).
    wall_seconds: wall time of the search call (of all searches of a joint call).

  Returns:
    The summary written to summary.json.
  """
  k = int(config.k)
  lines = []
  for i, target in enumerate(target_ids):
    lines.append(
        json.dumps({
            "target":
                int(target),
            "true_label":
                int(true_labels[i]),
            "flip_class":
                None if flip is None else int(flip[i]),
            "support":
                int(result.support[i]),
            "evaluated": [{
                "k": e["k"],
                "correct": e["correct"],
                "num_tests": len(e["preds"]),
                "flipped": e["flipped"],
                "round": e["round"]
            } for e in result.evals[i]],
        }))
  with utils.atomic_path(os.path.join(out_dir, "results.jsonl")) as tmp, open(tmp, "w") as f:
    f.write("\n".join(lines) + ("\n" if lines else ""))
  per_target = [len(e) * int(config.num_tests) for e in result.evals]
  summary = {
      "metric": metric,
      "method": method,
      "k": k,
      "num_tests": int(config.num_tests),
      "search_budget": int(config.search_budget),
      "exhaustive": bool(config.exhaustive),
      # With joint searches, rounds[*].seconds and wall_seconds cover every search of the call.
      "joint": bool(config.joint),
      **support_stats(result.support, k),
      "trainings": result.trainings,
      "trainings_per_target_max": max(per_target, default=0),
      "rounds": result.rounds,
      "wall_seconds": wall_seconds,
      "fingerprint": fingerprint,
      "provenance": utils.provenance(),
  }
  utils.save_json(os.path.join(out_dir, "summary.json"), summary)
  _plot({method: (result.support, k)}, f"{metric} support: {method}",
        os.path.join(out_dir, "curve.png"))
  return summary


def _plot(curves: dict[str, tuple[np.ndarray, int]], title: str, out: str) -> None:
  # Lazily: only plotting needs matplotlib, which is slow to import.
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(5.5, 4), dpi=100)
  for method, (support, k) in curves.items():
    xs, ys = cumulative_curve(support, k)
    med = support_stats(support, k)["median_support"]
    label = f"{method} (median {'>' + str(k) if med is None else f'{med:g}'}, n={len(support)})"
    ax.step(xs, ys, where="post", label=label)
  ax.set_xscale("log")
  ax.set_xlabel("k (top-attributed training images removed / relabelled)")
  ax.set_ylabel("fraction of targets flipped with <= k")
  ax.set_ylim(0, 1.02)
  ax.set_title(title)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(loc="upper left", fontsize=8)
  fig.tight_layout()
  with utils.atomic_path(out) as tmp:
    fig.savefig(tmp, format="png")
  plt.close(fig)


__all__: Sequence[str] = (
    "THRESHOLDS",
    "cumulative_curve",
    "load_results",
    "plot_curves",
    "support_stats",
    "write_outputs",
)

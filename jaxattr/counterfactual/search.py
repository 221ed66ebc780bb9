"""Counterfactual support search: how many top-attributed images must go before a target flips.

REFERENCE.md section 2. For one target and a ranking of training images (best first):

* removal support: the smallest prefix size m such that models trained WITHOUT the top-m images
  misclassify the target;
* mislabel support: the smallest m such that relabelling the top-m images to the target's flip
  class (they stay in the training set) makes the models misclassify the target.

"Misclassified" means at most ``num_tests // 2`` of ``num_tests`` independently seeded models
predict the true label. The search is the reference's: train with all ``k`` images removed (or
relabelled) first; if that does not flip the target, its support is -1. Otherwise bisect with
``low = 0, high = k``, ``mid = (low + high) // 2`` for exactly ``search_budget`` steps, setting
``high = best = mid`` when ``mid`` flips and ``low = mid`` otherwise, and report ``best``. With
k = 1280 and budget 7 every answer is a multiple of 10.

Unlike the reference, all targets advance together: one round trains every (target, seed) model
of that round in ONE call to the trainer, which runs them in waves. Models of one round are
independent of each other, so the number of rounds is 1 + budget whatever the number of targets.
After every round the whole search state is written atomically, so a killed run resumes at the
next unfinished round and ends exactly as an uninterrupted one (seeds depend only on the config
seed, the round, the target and the test number).

The trainer is injected as a `Predictor` so the search can be tested without training:
``predict(seeds [M], keep [M, N], labels [M, N], eval_positions [M]) -> predicted class [M]``,
model ``m`` trained on the kept training images with ``labels[m]`` and evaluated on the test
image at position ``eval_positions[m]``. `trainer_predictor` adapts
``jaxattr.counterfactual.ensemble.train_and_predict``.

Outputs of `run` in ``WORKDIR/support/<metric>/<method>/``: ``state.json`` (the resumable state),
``results.jsonl`` (one line per target), ``summary.json`` and ``curve.png``; plus
``WORKDIR/support/<metric>/curves.png`` with every method on one figure, and
``WORKDIR/support/flip_classes.npz`` (the flip classes, computed once on the full data).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Callable, Sequence

import ml_collections
import numpy as np
from absl import logging

from jaxattr import utils

METRICS = ("removal", "mislabel")
# Thresholds at which the summary reports the fraction of flipped targets (images).
THRESHOLDS = (10, 20, 40, 80, 160, 320, 640, 1280)

# predict(seeds [M] int64, keep [M, N] bool, labels [M, N] int32, eval_positions [M] int64)
#   -> predicted class [M] int.
Predictor = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


class SearchError(ValueError):
  """Bad input to the support search; the message names the file, key or shape."""


def default_config() -> ml_collections.ConfigDict:
  """The `config.support` section."""
  c = ml_collections.ConfigDict()
  # Which supports to measure: 'removal' and/or 'mislabel'.
  c.metrics = METRICS
  # Attribution methods read from WORKDIR/attribution/<name>/{topk,targets}.npy. An entry
  # 'name=PATH' instead reads a reference-layout top-k matrix: int64 [n_test, >= k] of train
  # `index` values, one row per test `index` (rows of unrequested targets are arbitrary, so the
  # targets must then come from `targets`).
  c.methods = ("esvm", "l2")
  # Targets as test `index` values: '' (those of each method's targets.npy), a path to a .npy or
  # text file of integers, or a comma-separated list ('3,17,42').
  c.targets = ""
  # Use only the first n targets (0 = all); for small runs.
  c.num_targets = 0
  # Models per evaluated prefix size; flipped when at most num_tests // 2 predict the true label.
  c.num_tests = 5
  # Bisection steps after the all-k check.
  c.search_budget = 7
  # Largest prefix size (images); the all-k check removes/relabels this many.
  c.k = 1280
  # Evaluate every `grid` prefix size (plus k) for every target in a single round instead of
  # bisecting; support = the smallest flipping grid size, -1 when k itself does not flip.
  c.exhaustive = False
  c.grid = THRESHOLDS
  # Root of all training seeds of the search (per round, target and test).
  c.seed = 0
  # Flip classes: an ensemble of this many full-data models (REFERENCE: 10), seeded by flip_seed.
  c.flip_models = 10
  c.flip_seed = 0
  # Run every (metric, method) search in the same rounds, one trainer call per round for all of
  # them (fuller waves, 1 + budget calls in total); the results do not depend on it.
  c.joint = True
  return c


# ------------------------------------------------------------------------------------------------
# The search itself (no I/O except the optional state file).


@dataclasses.dataclass
class SearchResult:
  """Outcome of `support_search` for T targets.

  Attributes:
    support: int64 [T], the support per target, -1 when the k-check did not flip.
    evals: per target, the evaluations in order: dicts {'round', 'k', 'seeds', 'preds',
      'correct', 'flipped'} (seeds and predicted classes of its num_tests models).
    rounds: per round, {'round', 'models', 'seconds'} (seconds of the predictor call).
  """

  support: np.ndarray
  evals: list[list[dict[str, Any]]]
  rounds: list[dict[str, Any]]

  @property
  def trainings(self) -> int:
    return int(sum(r["models"] for r in self.rounds))


def model_seeds(seed: int, round_: int, target: int, num_tests: int) -> np.ndarray:
  """Training seeds of one target's models in one round: int64 [num_tests], in [0, 2**31).

  They depend only on (seed, round, target index value, test number), never on which other targets
  take part, so runs with different target sets agree on shared targets and a resumed run draws
  the same seeds as an uninterrupted one. Metrics and methods share them: their comparisons on a
  target are paired (same seeds, different counterfactual data).
  """
  ss = np.random.SeedSequence([int(seed), int(round_), int(target)])
  return (ss.generate_state(num_tests, np.uint32) & 0x7FFFFFFF).astype(np.int64)


def grid_sizes(config: ml_collections.ConfigDict) -> np.ndarray:
  """Prefix sizes of exhaustive mode: int64, the grid entries in (0, k] plus k, ascending."""
  k = int(config.k)
  grid = [int(g) for g in config.grid if 0 < int(g) <= k]
  return np.array(sorted(set(grid + [k])), np.int64)


def counterfactual_inputs(
    metric: str, prefixes: np.ndarray, sizes: np.ndarray, train_labels: np.ndarray,
    flip: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
  """Keep masks and labels of models whose top-`sizes` prefixes are removed or relabelled.

  Args:
    metric: 'removal' (drop the prefix) or 'mislabel' (relabel it to the flip class).
    prefixes: int64 [M, >= max(sizes)], training positions, best first, one row per model.
    sizes: int64 [M], prefix size per model.
    train_labels: int32 [N], the original training labels.
    flip: int [M], flip class per model (mislabel only).

  Returns:
    keep: bool [M, N]; labels: int32 [M, N].
  """
  m, n = len(sizes), len(train_labels)
  keep = np.ones((m, n), bool)
  labels = np.broadcast_to(train_labels.astype(np.int32), (m, n)).copy()
  for i, size in enumerate(sizes):
    chosen = prefixes[i, :int(size)]
    if metric == "removal":
      keep[i, chosen] = False
    elif metric == "mislabel":
      labels[i, chosen] = flip[i]
    else:
      raise SearchError(f"unknown metric {metric!r}; expected one of {METRICS}")
  return keep, labels


@dataclasses.dataclass
class Problem:
  """One support search: a metric and a ranking per target.

  Attributes:
    metric: 'removal' or 'mislabel'.
    prefixes: int64 [T, >= k], training POSITIONS (rows of the training arrays), best first.
    target_positions: int64 [T], test positions handed to the predictor as eval positions.
    target_ids: int64 [T], the targets' test `index` values (seed derivation, output).
    true_labels: int [T], the targets' true labels.
    flip: int [T], flip class per target; required for 'mislabel'.
    state_path: where the state is written after every round (JSON) and resumed from; None keeps
      it in memory only.
    fingerprint: identifies the inputs; a state file with another fingerprint is ignored (the
      search restarts) with a warning.
  """

  metric: str
  prefixes: np.ndarray
  target_positions: np.ndarray
  target_ids: np.ndarray
  true_labels: np.ndarray
  flip: np.ndarray | None = None
  state_path: str | None = None
  fingerprint: str = ""


def support_search(
    predict: Predictor,
    metric: str,
    prefixes: np.ndarray,
    target_positions: np.ndarray,
    target_ids: np.ndarray,
    true_labels: np.ndarray,
    train_labels: np.ndarray,
    config: ml_collections.ConfigDict,
    flip: np.ndarray | None = None,
    state_path: str | None = None,
    fingerprint: str = "",
) -> SearchResult:
  """Removal or mislabel support of T targets, all targets advancing together round by round.

  Args:
    predict: trains one model per row and returns its predicted class on its own target (see the
      module docstring).
    metric, prefixes, target_positions, target_ids, true_labels, flip, state_path, fingerprint:
      as the fields of `Problem`.
    train_labels: int32 [N], the training labels.
    config: the `support` section (num_tests, search_budget, k, exhaustive, grid, seed).

  Returns:
    A `SearchResult`.
  """
  problem = Problem(metric, prefixes, target_positions, target_ids, true_labels, flip,
                    state_path, fingerprint)
  return support_search_many(predict, [problem], train_labels, config)[0]


def support_search_many(predict: Predictor, problems: Sequence[Problem],
                        train_labels: np.ndarray, config: ml_collections.ConfigDict
                        ) -> list[SearchResult]:
  """Several support searches (metrics x methods) advancing together: ONE predictor call a round.

  Every model depends only on its own seed, keep mask and labels, so the results equal those of
  separate `support_search` calls; batching them only fills the trainer's waves better. Problems
  resumed at different rounds catch up first (a call holds the problems due in that round).

  Returns:
    One `SearchResult` per problem, in order.
  """
  k, tests, budget = int(config.k), int(config.num_tests), int(config.search_budget)
  if tests < 1 or budget < 0 or k < 1:
    raise SearchError(f"need num_tests >= 1, search_budget >= 0, k >= 1; got {tests}, {budget}, "
                      f"{k}")
  for p in problems:
    _check(p, k, len(train_labels))
  states = [_load_state(p.state_path, p.fingerprint) or _new_state(p, k) for p in problems]
  num_rounds = 1 if config.exhaustive else 1 + budget
  for p, st in zip(problems, states):
    if st["next_round"]:
      logging.info("%s support: resuming at round %d of %d", p.metric, st["next_round"],
                   num_rounds)

  for r in range(min([st["next_round"] for st in states], default=num_rounds), num_rounds):
    due = [i for i, st in enumerate(states) if st["next_round"] == r]
    # Per due problem, the (target, size, seed-offset) pairs evaluated; each is `tests` models.
    jobs = {i: _jobs(states[i], r, config) for i in due}
    pieces = []
    for i in due:
      p, js = problems[i], jobs[i]
      if not js:
        continue
      which = np.repeat([j[0] for j in js], tests)
      seeds = np.concatenate([model_seeds(config.seed, r + g, p.target_ids[t], tests)
                              for t, _, g in js])
      keep, labels = counterfactual_inputs(
          p.metric, np.asarray(p.prefixes, np.int64)[which], np.repeat([j[1] for j in js], tests),
          train_labels, None if p.flip is None else np.asarray(p.flip)[which])
      pieces.append((i, seeds, keep, labels, np.asarray(p.target_positions)[which]))
    total = sum(len(x[1]) for x in pieces)
    preds, seconds = np.zeros(0, np.int64), 0.0
    if total:
      t0 = time.perf_counter()
      preds = np.asarray(predict(*[np.concatenate([x[j] for x in pieces]) for j in range(1, 5)]))
      seconds = time.perf_counter() - t0
      if preds.shape != (total,):
        raise SearchError(f"predictor returned shape {preds.shape}, expected ({total},)")
      logging.info("support round %d/%d: %d models (%d searches) in %.1fs, %.2fs per model",
                   r + 1, num_rounds, total, len(pieces), seconds, seconds / total)
    start = 0
    by_problem = {}
    for i, seeds, *_ in pieces:
      by_problem[i] = (seeds, preds[start:start + len(seeds)])
      start += len(seeds)
    for i in due:
      st, p = states[i], problems[i]
      seeds, pr = by_problem.get(i, (np.zeros(0, np.int64), np.zeros(0, np.int64)))
      _update(st, p, r, jobs[i], seeds, pr, config)
      if jobs[i]:
        st["rounds"].append({"round": r, "models": len(seeds), "seconds": seconds,
                             "call_models": total})
      st["next_round"] = r + 1
      if p.state_path:
        utils.save_json(p.state_path, st)

  return [SearchResult(support=np.array(st["best"], np.int64), evals=st["evals"],
                       rounds=st["rounds"]) for st in states]


def _check(p: Problem, k: int, num_train: int) -> None:
  t = len(p.target_positions)
  prefixes = np.asarray(p.prefixes)
  if p.metric not in METRICS:
    raise SearchError(f"unknown metric {p.metric!r}; expected one of {METRICS}")
  if prefixes.ndim != 2 or prefixes.shape[0] != t or prefixes.shape[1] < k:
    raise SearchError(f"prefixes must be [{t} targets, >= k={k}], got {prefixes.shape}")
  if len(p.target_ids) != t or len(p.true_labels) != t:
    raise SearchError(f"{t} target positions but {len(p.target_ids)} ids, "
                      f"{len(p.true_labels)} labels")
  if p.metric == "mislabel" and (p.flip is None or len(p.flip) != t):
    raise SearchError("mislabel support needs one flip class per target")
  if t and (prefixes[:, :k].min() < 0 or prefixes[:, :k].max() >= num_train):
    raise SearchError(f"prefix positions must lie in [0, {num_train})")


def _new_state(p: Problem, k: int) -> dict[str, Any]:
  t = len(p.target_positions)
  return {"fingerprint": p.fingerprint, "next_round": 0, "low": [0] * t, "high": [k] * t,
          "best": [k] * t, "active": [True] * t, "evals": [[] for _ in range(t)], "rounds": []}


def _jobs(st: dict[str, Any], r: int, config: ml_collections.ConfigDict
          ) -> list[tuple[int, int, int]]:
  """(target row, prefix size, seed-round offset) evaluated in round r."""
  t = len(st["best"])
  if config.exhaustive:
    # Every grid size is a sub-round of its own for seeding purposes.
    return [(i, int(s), g) for i in range(t) for g, s in enumerate(grid_sizes(config))]
  if r == 0:
    return [(i, int(config.k), 0) for i in range(t)]
  return [(i, (st["low"][i] + st["high"][i]) // 2, 0) for i in range(t) if st["active"][i]]


def _update(st: dict[str, Any], p: Problem, r: int, jobs: list[tuple[int, int, int]],
            seeds: np.ndarray, preds: np.ndarray, config: ml_collections.ConfigDict) -> None:
  """Records round r's predictions and moves each target's bisection."""
  tests, k = int(config.num_tests), int(config.k)
  for j, (i, size, _) in enumerate(jobs):
    pr = preds[j * tests:(j + 1) * tests].astype(np.int64)
    correct = int((pr == int(p.true_labels[i])).sum())
    flipped = correct <= tests // 2
    st["evals"][i].append({
        "round": r, "k": size, "seeds": seeds[j * tests:(j + 1) * tests].tolist(),
        "preds": pr.tolist(), "correct": correct, "flipped": flipped})
    if config.exhaustive:
      continue
    if r == 0:
      if not flipped:
        st["active"][i], st["best"][i] = False, -1
    elif flipped:
      st["high"][i] = st["best"][i] = size
    else:
      st["low"][i] = size
  if config.exhaustive:
    for i in range(len(st["best"])):
      done = {e["k"]: e["flipped"] for e in st["evals"][i]}
      st["best"][i] = min(s for s, f in done.items() if f) if done.get(k) else -1


def _load_state(path: str | None, fingerprint: str) -> dict[str, Any] | None:
  if not path or not os.path.exists(path):
    return None
  with open(path) as f:
    state = json.load(f)
  if state.get("fingerprint") != fingerprint:
    logging.warning("%s was written for other inputs (fingerprint %s, now %s); starting over",
                    path, state.get("fingerprint"), fingerprint)
    return None
  return state


# ------------------------------------------------------------------------------------------------
# Summaries and curves.


def summarize(support: np.ndarray, k: int) -> dict[str, Any]:
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
      "targets": int(len(support)),
      "median_support": median if np.isfinite(median) else None,
      "median_unflipped_as": "infinity",
      "median_support_flipped_only": float(np.median(flipped)) if len(flipped) else None,
      "not_flipped": int((support < 0).sum()),
      "fraction_flipped": {str(t): float(((support >= 0) & (support <= t)).sum() / n)
                           for t in thresholds},
  }


def cumulative_curve(support: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """x = 1..k (images) and y = fraction of targets flipped with <= x images (-1 never)."""
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


def _plot(curves: dict[str, tuple[np.ndarray, int]], title: str, out: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(5.5, 4), dpi=100)
  for method, (support, k) in curves.items():
    xs, ys = cumulative_curve(support, k)
    med = summarize(support, k)["median_support"]
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
  """Writes results.jsonl, summary.json and curve.png of one (metric, method); returns the summary.
  """
  k = int(config.k)
  lines = []
  for i, target in enumerate(target_ids):
    lines.append(json.dumps({
        "target": int(target), "true_label": int(true_labels[i]),
        "flip_class": None if flip is None else int(flip[i]),
        "support": int(result.support[i]),
        "evaluated": [{"k": e["k"], "correct": e["correct"], "num_tests": len(e["preds"]),
                       "flipped": e["flipped"], "round": e["round"]} for e in result.evals[i]],
    }))
  with utils.atomic_path(os.path.join(out_dir, "results.jsonl")) as tmp:
    with open(tmp, "w") as f:
      f.write("\n".join(lines) + ("\n" if lines else ""))
  per_target = [len(e) * int(config.num_tests) for e in result.evals]
  summary = {
      "metric": metric, "method": method, "k": k, "num_tests": int(config.num_tests),
      "search_budget": int(config.search_budget), "exhaustive": bool(config.exhaustive),
      # With joint searches, rounds[*].seconds and wall_seconds cover every search of the call.
      "joint": bool(config.get("joint", True)),
      **summarize(result.support, k),
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


# ------------------------------------------------------------------------------------------------
# Inputs: top-k files, targets, flip classes, the trainer adapter.


def positions_of(index: np.ndarray, values: np.ndarray, what: str) -> np.ndarray:
  """Positions in a record whose `index` equals each of `values`: int64, same shape as values.

  Raises:
    SearchError: naming `what` when a value is not in the record (e.g. limit_per_class dropped it).
  """
  index = np.asarray(index, np.int64)
  order = np.argsort(index, kind="stable")
  flat = np.asarray(values, np.int64).ravel()
  pos = np.searchsorted(index[order], flat)
  pos = np.minimum(pos, len(index) - 1)
  found = index[order][pos] == flat if len(index) else np.zeros(flat.shape, bool)
  if not found.all():
    missing = flat[~found][:5].tolist()
    raise SearchError(f"{what}: index values {missing} (of {int((~found).sum())}) are not in the "
                      f"loaded split of {len(index)} examples")
  return order[pos].reshape(np.shape(values))


def parse_targets(spec: str) -> np.ndarray | None:
  """Test `index` values from '' (None), a .npy or text file (integers separated by commas or
  whitespace), or an inline list '3,17,42'."""
  spec = (spec or "").strip()
  if not spec:
    return None
  if os.path.exists(spec):
    if spec.endswith(".npy"):
      return np.load(spec).astype(np.int64).ravel()
    with open(spec) as f:
      spec = f.read()
  try:
    return np.array([int(s) for s in spec.replace(",", " ").split()], np.int64)
  except ValueError:
    raise SearchError(
        f"support.targets={spec!r} is neither a file nor a list of integers") from None


def load_topk(workdir: str, method: str, k: int, targets: np.ndarray | None = None
              ) -> tuple[str, np.ndarray, np.ndarray]:
  """A method's top-k rows for its targets.

  Args:
    workdir: the run's WORKDIR.
    method: 'name' for WORKDIR/attribution/name/{topk,targets}.npy, or 'name=PATH' for a
      reference-layout matrix int64 [n_test, >= k] indexed by test `index` (needs `targets`).
    k: columns used.
    targets: test `index` values to use (all of targets.npy when None, in its order).

  Returns:
    (name, targets int64 [T], topk int64 [T, k] of train `index` values, best first).
  """
  name, sep, path = method.partition("=")
  if sep:
    if not os.path.exists(path):
      raise SearchError(f"method {name!r}: top-k file {path} does not exist")
    matrix = np.load(path, mmap_mode="r")
    if matrix.ndim != 2 or matrix.shape[1] < k:
      raise SearchError(f"{path}: expected a reference-layout matrix [n_test, >= {k}], got "
                        f"{matrix.shape}")
    if targets is None:
      raise SearchError(f"{path}: a reference-layout matrix needs explicit targets "
                        "(--config.support.targets); its rows do not say which were computed")
    if targets.min() < 0 or targets.max() >= matrix.shape[0]:
      raise SearchError(f"{path}: targets must lie in [0, {matrix.shape[0]})")
    return name, targets, np.asarray(matrix[targets, :k], np.int64)
  base = os.path.join(workdir, "attribution", name)
  # jaxattr.attribute writes targets.npy as test positions and target_index.npy as test
  # `index` values; the search speaks index values.
  ids = "target_index.npy" if os.path.exists(os.path.join(base, "target_index.npy")) else (
      "targets.npy")
  files = [os.path.join(base, f) for f in ("topk.npy", ids)]
  for f in files:
    if not os.path.exists(f):
      raise SearchError(f"method {name!r}: {f} does not exist (run the attribution stage first)")
  topk, have = np.load(files[0]), np.load(files[1]).astype(np.int64)
  if topk.ndim != 2 or topk.shape[0] != len(have) or topk.shape[1] < k:
    raise SearchError(f"{files[0]}: expected [{len(have)} targets, >= {k}], got {topk.shape}")
  if targets is None:
    return name, have, topk[:, :k].astype(np.int64)
  rows = positions_of(have, targets, f"{files[1]} (requested targets)")
  return name, targets, topk[rows, :k].astype(np.int64)


def trainer_predictor(train_config: ml_collections.ConfigDict, train: Any,
                      test_images: np.ndarray) -> Predictor:
  """A `Predictor` that trains with `ensemble.train_and_predict` (imported lazily).

  All models of one call are trained in one ensemble call; they are evaluated on the distinct
  test images of the call at once and each model keeps the prediction on its own target.
  """

  def predict(seeds, keep, labels, eval_positions):
    from jaxattr.counterfactual import ensemble  # pylint: disable=g-import-not-at-top
    unique, inverse = np.unique(np.asarray(eval_positions), return_inverse=True)
    logits = ensemble.train_and_predict(
        train_config, train, test_images[unique], np.asarray(seeds, np.int64),
        np.asarray(keep, bool), np.asarray(labels, np.int32))
    logits = np.asarray(logits)
    return logits[np.arange(len(seeds)), inverse].argmax(-1)

  return predict


FlipFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def flip_classes_cached(workdir: str, target_ids: np.ndarray, target_images: np.ndarray,
                        target_labels: np.ndarray, compute: FlipFn, key: str = "") -> np.ndarray:
  """Flip class per target, from WORKDIR/support/flip_classes.npz or computed once and stored.

  Args:
    workdir: WORKDIR.
    target_ids: int64 [T] test `index` values.
    target_images: uint8 [T, H, W, 3].
    target_labels: int [T].
    compute: (images [E, H, W, 3], labels [E]) -> flip class [E]; called only for targets
      missing from the cache, or all of them when `key` (a hash of what determines the ensemble)
      changed.
    key: stored with the classes; a different key invalidates the cache.

  Returns:
    int64 [T] flip classes.
  """
  path = os.path.join(workdir, "support", "flip_classes.npz")
  known: dict[int, int] = {}
  if os.path.exists(path):
    with np.load(path) as z:
      if str(z["key"]) == key:
        known = dict(zip(z["index"].tolist(), z["flip_class"].tolist()))
  missing = [i for i, t in enumerate(target_ids) if int(t) not in known]
  if missing:
    logging.info("flip classes for %d targets (ensemble on the full data)", len(missing))
    new = np.asarray(compute(target_images[missing], np.asarray(target_labels)[missing]))
    known.update(zip([int(target_ids[i]) for i in missing], new.astype(np.int64).tolist()))
    ids = np.array(sorted(known), np.int64)
    utils.save_npz(path, index=ids, flip_class=np.array([known[i] for i in ids], np.int64),
                   key=np.array(key))
  return np.array([known[int(t)] for t in target_ids], np.int64)


# ------------------------------------------------------------------------------------------------
# The stage.


def _load_split(config: ml_collections.ConfigDict, split: str) -> Any:
  from jaxattr import data  # pylint: disable=g-import-not-at-top
  options = {}
  for name in ("size", "limit_per_class"):
    value = config.data.get(name, None)
    if value:
      options[name] = value
  return data.load(config.data.source, split, **options)


def _array_digest(*arrays: np.ndarray) -> str:
  h = hashlib.sha256()
  for a in arrays:
    a = np.ascontiguousarray(a)
    h.update(str(a.dtype).encode() + str(a.shape).encode())
    h.update(a.tobytes())
  return h.hexdigest()[:16]


def run(config: ml_collections.ConfigDict, workdir: str, *, train: Any = None, test: Any = None,
        predictor: Predictor | None = None, flip_fn: FlipFn | None = None) -> dict[str, Any]:
  """Removal / mislabel support of every configured method; writes WORKDIR/support/.

  Args:
    config: with `support` (this module's `default_config()`), `data` (`source`, optionally
      `size`, `limit_per_class`) unless `train` and `test` are given, and `ensemble` (the
      trainer's section; `ensemble.default_config()` when absent).
    workdir: WORKDIR.
    train: the training `jaxattr.data.Dataset` (loaded from config.data when None).
    test: the test `Dataset` (loaded from config.data when None).
    predictor: replaces the trainer (tests); default `trainer_predictor`.
    flip_fn: (images [E, H, W, 3], labels [E]) -> flip class [E]; default
      `ensemble.flip_classes` with support.flip_models models and support.flip_seed.

  Returns:
    {metric: {method: summary dict}}. A (metric, method) whose summary.json already matches the
    inputs is skipped (its summary is returned); an interrupted one resumes from its state.json.
  """
  sc = config.support
  for metric in sc.metrics:
    if metric not in METRICS:
      raise SearchError(f"support.metrics: unknown metric {metric!r}; expected {METRICS}")
  if not sc.methods:
    raise SearchError("support.methods is empty")
  requested = parse_targets(sc.targets)
  k = int(sc.k)
  methods = []
  for spec in sc.methods:
    name, ids, topk = load_topk(workdir, spec, k, requested)
    if sc.num_targets:
      ids, topk = ids[:int(sc.num_targets)], topk[:int(sc.num_targets)]
    methods.append((name, ids, topk))

  train = train if train is not None else _load_split(config, "train")
  test = test if test is not None else _load_split(config, "test")
  train_cfg = config.get("ensemble", None)
  if train_cfg is None and (predictor is None or flip_fn is None):
    from jaxattr.counterfactual import ensemble  # pylint: disable=g-import-not-at-top
    train_cfg = ensemble.default_config()
  predictor = predictor or trainer_predictor(train_cfg, train, test.images)
  if flip_fn is None:
    def flip_fn(images, labels):
      from jaxattr.counterfactual import ensemble  # pylint: disable=g-import-not-at-top
      _, flip = ensemble.flip_classes(train_cfg, train, images, labels, int(sc.flip_models),
                                      int(sc.flip_seed))
      return flip

  train_key = utils.config_hash({
      "ensemble": train_cfg.to_dict() if train_cfg is not None else None,
      "train": _array_digest(train.index, train.labels)})
  search_key = {f: sc[f] for f in ("num_tests", "search_budget", "k", "exhaustive", "grid",
                                   "seed")}
  flips: dict[int, int] = {}
  if "mislabel" in sc.metrics:
    # One full-data ensemble for the targets of all methods together.
    union = np.unique(np.concatenate([ids for _, ids, _ in methods]))
    u_pos = positions_of(test.index, union, "targets (test split)")
    flips = dict(zip(union.tolist(), flip_classes_cached(
        workdir, union, test.images[u_pos], test.labels[u_pos], flip_fn,
        key=utils.config_hash({"train": train_key, "models": sc.flip_models,
                               "seed": sc.flip_seed})).tolist()))
  summaries: dict[str, Any] = {metric: {} for metric in sc.metrics}
  todo: list[tuple[str, Problem, str]] = []  # (method, problem, out_dir)
  for metric in sc.metrics:
    for name, ids, topk in methods:
      t_pos = positions_of(test.index, ids, f"method {name!r} targets (test split)")
      prefixes = positions_of(train.index, topk, f"method {name!r} top-k (train split)")
      true = test.labels[t_pos].astype(np.int64)
      flip = (np.array([flips[int(i)] for i in ids], np.int64) if metric == "mislabel"
              else None)
      fingerprint = utils.config_hash({
          "search": search_key, "metric": metric, "train": train_key,
          "inputs": _array_digest(ids, prefixes, true, flip if flip is not None else ids[:0])})
      out_dir = os.path.join(workdir, "support", metric, name)
      done = _finished_summary(out_dir, fingerprint)
      if done is not None:
        logging.info("%s support of %s: done already (%s)", metric, name, out_dir)
        summaries[metric][name] = done
        continue
      logging.info("%s support of %s: %d targets, k=%d, budget %d, %d tests", metric, name,
                   len(ids), k, sc.search_budget, sc.num_tests)
      todo.append((name, Problem(metric, prefixes, t_pos, ids, true, flip,
                                 os.path.join(out_dir, "state.json"), fingerprint), out_dir))

  # Joint: every unfinished (metric, method) shares each round's trainer call; otherwise one
  # search after the other. The results are the same either way.
  groups = [todo] if sc.get("joint", True) else [[x] for x in todo]
  for group in groups:
    if not group:
      continue
    t0 = time.perf_counter()
    results = support_search_many(predictor, [p for _, p, _ in group], train.labels, sc)
    wall = time.perf_counter() - t0
    for (name, p, out_dir), result in zip(group, results):
      summary = write_outputs(out_dir, p.metric, name, result, p.target_ids, p.true_labels,
                              p.flip, sc, p.fingerprint, wall_seconds=wall)
      summaries[p.metric][name] = summary
      logging.info("%s support of %s: median %s, %d of %d not flipped", p.metric, name,
                   summary["median_support"], summary["not_flipped"], summary["targets"])
  for metric in sc.metrics:
    plot_curves(workdir, metric)
  return summaries


def _finished_summary(out_dir: str, fingerprint: str) -> dict[str, Any] | None:
  path = os.path.join(out_dir, "summary.json")
  if not os.path.exists(path) or not os.path.exists(os.path.join(out_dir, "results.jsonl")):
    return None
  with open(path) as f:
    summary = json.load(f)
  return summary if summary.get("fingerprint") == fingerprint else None


def oracle_support(flips: Callable[[int], bool], k: int, budget: int) -> int:
  """The reference's sequential search for ONE target, given a flip predicate of the prefix size.

  A plain transcription of REFERENCE.md section 2, kept for tests and for documentation.
  """
  if not flips(k):
    return -1
  low, high, best = 0, k, k
  for _ in range(budget):
    mid = (low + high) // 2
    if flips(mid):
      high = best = mid
    else:
      low = mid
  return best


__all__: Sequence[str] = (
    "default_config", "support_search", "support_search_many", "Problem", "run", "summarize",
    "cumulative_curve", "plot_curves",
    "load_results", "load_topk", "trainer_predictor", "flip_classes_cached", "model_seeds",
    "counterfactual_inputs", "grid_sizes", "positions_of", "parse_targets", "oracle_support",
    "write_outputs", "SearchResult", "SearchError", "METRICS", "THRESHOLDS")

"""The support search engine: the reference's bisection, all targets advancing round by round.

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
of that round in ONE predictor call. Models of one round are independent of each other, so the
number of rounds is 1 + budget whatever the number of targets. After every round the whole search
state is written atomically, so a killed run resumes at the next unfinished round and ends exactly
as an uninterrupted one (seeds depend only on the config seed, the round, the target and the test
number).

The trainer is injected as a `Predictor`, so the search runs without training in tests:
``predict(seeds [M], prefixes [M, k], sizes [M], flip [M] | None, eval_positions [M])`` returns
the predicted class [M] of model m, trained with its target's ranking ``prefixes[m]`` (training
positions, best first) changed in its first ``sizes[m]`` entries, and evaluated on the test image
at ``eval_positions[m]``. ``flip=None`` removes the prefix for every model; otherwise
``flip[m] >= 0`` relabels model m's prefix to class ``flip[m]`` and ``flip[m] == -1`` removes it
(a joint round mixes removal and mislabel searches in one call). The subsets travel as indices:
a [M, N] mask per model would be ~500 MB on the host for the paper's round 0.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from jaxattr import distributed, utils

METRICS = ("removal", "mislabel")
# flip[m] of a removal model in a call that also holds mislabel models.
REMOVE = -1

# predict(seeds int64 [M], prefixes int64 [M, k], sizes int64 [M], flip int64 [M] or None,
#         eval_positions int64 [M]) -> predicted class [M].
Predictor = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, np.ndarray],
                     np.ndarray]


class SearchError(ValueError):
  """Bad input to the support search; the message names the file, key or shape."""


@dataclasses.dataclass
class SearchProblem:
  """One support search: a metric and a ranking per target.

  Attributes:
    metric: 'removal' or 'mislabel'.
    prefixes: int64 [T, >= k], training POSITIONS (rows of the training arrays), best first.
    target_positions: int64 [T], test positions handed to the predictor as eval positions.
    target_ids: int64 [T], the targets' test `index` values (seed derivation, output).
    true_labels: int [T], the targets' true labels.
    flip: int [T], flip class per target (>= 0); required for 'mislabel'.
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


@dataclasses.dataclass
class SearchResult:
  """Outcome of one `SearchProblem` of T targets.

  Attributes:
    support: int64 [T], the support per target, -1 when the k-check did not flip.
    evals: per target, the evaluations in order: dicts {'round', 'k', 'seeds', 'preds',
      'correct', 'flipped'} (seeds and predicted classes of its num_tests models).
    rounds: per round, {'round', 'models', 'seconds', 'call_models'} (seconds of the predictor
      call, which held call_models models of all searches of that round).
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


def support_search(predict: Predictor, problem: SearchProblem, num_train: int,
                   config: ml_collections.ConfigDict) -> SearchResult:
  """Removal or mislabel support of T targets, all targets advancing together round by round.

  Args:
    predict: trains one model per row and returns its predicted class on its own target (see the
      module docstring).
    problem: the metric, rankings and targets.
    num_train: N, the number of training images (prefix positions lie in [0, N)).
    config: the `support` section (num_tests, search_budget, k, exhaustive, grid, seed).

  Returns:
    The problem's `SearchResult`.
  """
  return support_search_many(predict, [problem], num_train, config)[0]


def support_search_many(predict: Predictor, problems: Sequence[SearchProblem], num_train: int,
                        config: ml_collections.ConfigDict) -> list[SearchResult]:
  """Several support searches (metrics x methods) advancing together: ONE predictor call a round.

  Every model depends only on its own seed, prefix, size and flip class, so the results equal
  those of separate `support_search` calls; batching them only fills the trainer's waves better.
  Problems resumed at different rounds catch up first (a call holds the problems due in that
  round).

  Args:
    predict: as for `support_search`.
    problems: the searches.
    num_train: N, the number of training images.
    config: the `support` section.

  Returns:
    One `SearchResult` per problem, in order.
  """
  k, tests, budget = int(config.k), int(config.num_tests), int(config.search_budget)
  if tests < 1 or budget < 0 or k < 1:
    raise SearchError(f"need num_tests >= 1, search_budget >= 0, k >= 1; got {tests}, {budget}, "
                      f"{k}")
  for p in problems:
    _check(p, k, num_train)
  states = [_load_state(p.state_path, p.fingerprint) or _new_state(p, k) for p in problems]
  num_rounds = 1 if config.exhaustive else 1 + budget
  for p, st in zip(problems, states):
    if st["next_round"]:
      logging.info("%s support: resuming at round %d of %d", p.metric, st["next_round"], num_rounds)

  for r in range(min([st["next_round"] for st in states], default=num_rounds), num_rounds):
    due = [i for i, st in enumerate(states) if st["next_round"] == r]
    jobs = {i: _jobs(states[i], r, config) for i in due}
    pieces = {i: _models(problems[i], jobs[i], r, config) for i in due if jobs[i]}
    total = sum(len(x["seeds"]) for x in pieces.values())
    preds, seconds = np.zeros(0, np.int64), 0.0
    if total:
      t0 = time.perf_counter()
      preds = np.asarray(predict(*_call_inputs(list(pieces.values()))))
      seconds = time.perf_counter() - t0
      if preds.shape != (total,):
        raise SearchError(f"predictor returned shape {preds.shape}, expected ({total},)")
      logging.info("support round %d/%d: %d models (%d searches) in %.1fs, %.2fs per model", r + 1,
                   num_rounds, total, len(pieces), seconds, seconds / total)
    start = 0
    for i in due:
      st, p = states[i], problems[i]
      seeds = pieces[i]["seeds"] if i in pieces else np.zeros(0, np.int64)
      _update(st, p, r, jobs[i], seeds, preds[start:start + len(seeds)], config)
      start += len(seeds)
      if jobs[i]:
        st["rounds"].append({
            "round": r,
            "models": len(seeds),
            "seconds": seconds,
            "call_models": total
        })
      st["next_round"] = r + 1
      if p.state_path and distributed.is_main():  # every process holds the same state
        utils.save_json(p.state_path, st)

  return [
      SearchResult(support=np.array(st["best"], np.int64), evals=st["evals"], rounds=st["rounds"])
      for st in states
  ]


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


# ------------------------------------------------------------------------------------------------
# Rounds: the jobs of a round, their models, and the state update.


def _check(p: SearchProblem, k: int, num_train: int) -> None:
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
  # A negative class would read as REMOVE in a joint call: a removal, silently.
  if p.metric == "mislabel" and t and np.asarray(p.flip).min() < 0:
    raise SearchError("flip classes must be >= 0")
  if t and (prefixes[:, :k].min() < 0 or prefixes[:, :k].max() >= num_train):
    raise SearchError(f"prefix positions must lie in [0, {num_train})")


def _new_state(p: SearchProblem, k: int) -> dict[str, Any]:
  t = len(p.target_positions)
  return {
      "fingerprint": p.fingerprint,
      "next_round": 0,
      "low": [0] * t,
      "high": [k] * t,
      "best": [k] * t,
      "active": [True] * t,
      "evals": [[] for _ in range(t)],
      "rounds": []
  }


def _jobs(st: dict[str, Any], r: int,
          config: ml_collections.ConfigDict) -> list[tuple[int, int, int]]:
  """(target row, prefix size, seed-round offset) evaluated in round r; each is num_tests models."""
  t = len(st["best"])
  if config.exhaustive:
    # Every grid size is a sub-round of its own for seeding purposes.
    return [(i, int(s), g) for i in range(t) for g, s in enumerate(grid_sizes(config))]
  if r == 0:
    return [(i, int(config.k), 0) for i in range(t)]
  return [(i, (st["low"][i] + st["high"][i]) // 2, 0) for i in range(t) if st["active"][i]]


def _models(p: SearchProblem, jobs: list[tuple[int, int, int]], r: int,
            config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """The predictor inputs of one problem's jobs in round r: num_tests rows per job."""
  tests, k = int(config.num_tests), int(config.k)
  rows = np.repeat([j[0] for j in jobs], tests)
  return {
      "seeds":
          np.concatenate([
              model_seeds(config.seed, r + g, p.target_ids[t], tests) for t, _, g in jobs
          ]),
      # k columns for every problem, so the problems of a joint round stack into one array.
      "prefixes":
          np.asarray(p.prefixes, np.int64)[rows, :k],
      "sizes":
          np.repeat(np.array([j[1] for j in jobs], np.int64), tests),
      "flip": (np.asarray(p.flip, np.int64)[rows] if p.metric == "mislabel" else np.full(
          len(rows), REMOVE, np.int64)),
      "eval_positions":
          np.asarray(p.target_positions, np.int64)[rows],
  }


def _call_inputs(pieces: list[dict[str, np.ndarray]]) -> tuple[np.ndarray, ...]:
  """(seeds, prefixes, sizes, flip or None, eval_positions) of one predictor call."""
  cat = {name: np.concatenate([x[name] for x in pieces]) for name in pieces[0]}
  # All-removal calls pass None, so a trainer never builds relabelled labels it does not need.
  flip = None if (cat["flip"] == REMOVE).all() else cat["flip"]
  return cat["seeds"], cat["prefixes"], cat["sizes"], flip, cat["eval_positions"]


def _update(st: dict[str, Any], p: SearchProblem, r: int, jobs: list[tuple[int, int, int]],
            seeds: np.ndarray, preds: np.ndarray, config: ml_collections.ConfigDict) -> None:
  """Records round r's predictions and moves each target's bisection."""
  tests, k = int(config.num_tests), int(config.k)
  for j, (i, size, _) in enumerate(jobs):
    pr = preds[j * tests:(j + 1) * tests].astype(np.int64)
    correct = int((pr == int(p.true_labels[i])).sum())
    flipped = correct <= tests // 2
    st["evals"][i].append({
        "round": r,
        "k": size,
        "seeds": seeds[j * tests:(j + 1) * tests].tolist(),
        "preds": pr.tolist(),
        "correct": correct,
        "flipped": flipped
    })
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
    logging.warning("%s was written for other inputs (fingerprint %s, now %s); starting over", path,
                    state.get("fingerprint"), fingerprint)
    return None
  return state


__all__: Sequence[str] = (
    "METRICS",
    "REMOVE",
    "Predictor",
    "SearchError",
    "SearchProblem",
    "SearchResult",
    "grid_sizes",
    "model_seeds",
    "oracle_support",
    "support_search",
    "support_search_many",
)

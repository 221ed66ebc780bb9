"""The support stage: removal and mislabel support of every attribution method (REFERENCE.md 2).

`run(config, workdir)` reads each method's top-k ranking (``WORKDIR/attribution/<method>/`` or a
reference-layout matrix ``name=PATH``), computes the targets' flip classes once with a full-data
ensemble, and runs every (metric, method) search of `jaxattr.counterfactual.bisection` with the
counterfactual trainer of `jaxattr.counterfactual.ensemble`.

Outputs, in ``WORKDIR/support/``: ``<metric>/<method>/{state.json, results.jsonl, summary.json,
curve.png}`` (state.json is the resumable search state, the others come from
`jaxattr.counterfactual.summaries`), ``<metric>/curves.png`` with every method on one figure, and
``flip_classes.npz`` (the flip classes, computed once on the full data).

A job array's shard (`config.shard.index` of `shard.count`) searches a contiguous block of the
targets into ``<metric>/<method>/shard-<i>-of-<n>/``; `merge` assembles the shards into the
layout above, equal to one run's.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from jaxattr import (
    config as config_lib,
    data,
    distributed,
    fingerprint as fingerprint_lib,
    ownership,
    resident,
    stream,
    utils,
    validate,
)
from jaxattr.counterfactual import bisection, summaries
from jaxattr.counterfactual.bisection import METRICS, Predictor, SearchError, SearchProblem

# (images uint8 [E, H, W, 3], labels int [E]) -> flip class int [E].
FlipFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def run(config: ml_collections.ConfigDict, workdir: str, *, train: data.Dataset | None = None,
        test: data.Dataset | None = None, predictor: Predictor | None = None,
        flip_fn: FlipFn | None = None) -> dict[str, Any]:
  """Removal / mislabel support of every configured method; writes WORKDIR/support/.

  Args:
    config: with `support` (`jaxattr.config.support_section()`), `ensemble` (the trainer's
      section) and, unless `train` and `test` are given, `data` (`source` and `options`).
    workdir: WORKDIR.
    train: the training `Dataset` (loaded from config.data when None).
    test: the test `Dataset` (loaded from config.data when None).
    predictor: replaces the trainer (tests); default `trainer_predictor`.
    flip_fn: replaces the flip-class ensemble (tests); default `jaxattr.counterfactual.flip`'s
      `flip_classes` with support.flip_models models and support.flip_seed.

  Returns:
    {metric: {method: summary dict}}. A (metric, method) whose summary.json already matches the
    inputs is skipped (its summary is returned); an interrupted one resumes from its state.json.
  """
  sc = config.support
  metrics = config_lib.names(sc.metrics)
  for metric in metrics:
    if metric not in METRICS:
      raise SearchError(f"support.metrics: unknown metric {metric!r}; expected {METRICS}")
  specs = config_lib.names(sc.methods)
  if not specs:
    raise SearchError("support.methods is empty")
  k = int(sc.k)
  methods = _methods(config, workdir)
  index, count = shard_of(config)
  if train is None or test is None:
    # In memory, or streamed file lists whose resident copy the trainer reads (below).
    loaded = stream.splits(config.data)
    train = train if train is not None else loaded[0]
    test = test if test is not None else loaded[1]
    # Where the stage loads the data, it checks its fields (the main job checks all at once).
    validate.check(config, train, test, stages=("support",))
  if not isinstance(train.images, np.ndarray):  # streamed: the trainer reads the resident copy
    train, test = resident.datasets(config, workdir, train, test)

  if predictor is None or flip_fn is None:
    # Imported here so that a run with injected stand-ins (tests) never loads JAX models.
    from jaxattr.counterfactual import ensemble  # pylint: disable=g-import-not-at-top
    # One trainer (it holds the training set on the devices) for the flip ensemble and every
    # round.
    trainer = ensemble.Trainer(config.ensemble, train)
    predictor = predictor or trainer_predictor(trainer, test.images)
  if flip_fn is None:

    def flip_fn(images, labels):
      from jaxattr.counterfactual import flip as flip_lib  # pylint: disable=g-import-not-at-top
      return flip_lib.flip_classes(trainer, images, labels, int(sc.flip_models),
                                   int(sc.flip_seed))[1]

  train_key = _train_key(config, train)
  flips: dict[int, int] = {}
  if "mislabel" in metrics:
    # One full-data ensemble for the targets of all methods together (all shards' targets, so
    # that the shards of a job array share one cache).
    flips = _flips(config, workdir, methods, train_key, test, flip_fn)
  out: dict[str, Any] = {metric: {} for metric in metrics}
  todo: list[tuple[str, SearchProblem, str]] = []  # (method, problem, out_dir)
  for metric in metrics:
    for name, ids, topk in methods:
      part = shard_part(len(ids), index, count)
      out_dir = support_dir(workdir, metric, name, index, count)
      problem = _problem(config, metric, name, ids[part], topk[part], train, test, flips, train_key,
                         os.path.join(out_dir, "state.json"))
      fingerprint = problem.fingerprint
      done = _finished_summary(out_dir, fingerprint)
      if done is not None:
        logging.info("%s support of %s: done already (%s)", metric, name, out_dir)
        out[metric][name] = done
        continue
      logging.info("%s support of %s: %d targets%s, k=%d, budget %d, %d tests", metric, name,
                   len(problem.target_ids),
                   f" (shard {index} of {count}: {out_dir})" if count > 1 else "", k,
                   sc.search_budget, sc.num_tests)
      todo.append((name, problem, out_dir))

  # Joint: every unfinished (metric, method) shares each round's trainer call; otherwise one
  # search after the other. The results are the same either way.
  groups = [todo] if sc.joint else [[x] for x in todo]
  for group in groups:
    if not group:
      continue
    t0 = time.perf_counter()
    results = bisection.support_search_many(predictor, [p for _, p, _ in group], len(train), sc)
    wall = time.perf_counter() - t0
    for (name, p, out_dir), result in zip(group, results):
      # Several processes: process 0 writes, the others read what it wrote.
      if distributed.is_main():
        summary = summaries.write_outputs(out_dir, p.metric, name, result, p.target_ids,
                                          p.true_labels, p.flip, sc, p.fingerprint,
                                          wall_seconds=wall)
      distributed.barrier(f"support-{p.metric}-{name}-written")
      if not distributed.is_main():
        summary = _finished_summary(out_dir, p.fingerprint)
      out[p.metric][name] = summary
      logging.info("%s support of %s: median %s, %d of %d not flipped", p.metric, name,
                   summary["median_support"], summary["not_flipped"], summary["targets"])
  if distributed.is_main() and count == 1:  # a job array's merge draws them
    for metric in metrics:
      summaries.plot_curves(workdir, metric)
  distributed.barrier("support-done")
  return out


def _methods(config: ml_collections.ConfigDict,
             workdir: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
  """(name, target ids [T], top-k [T, k]) of every configured method, all targets."""
  sc = config.support
  requested = parse_targets(sc.targets)
  methods = []
  for spec in config_lib.names(sc.methods):
    if "=" not in spec:
      require_attribution(config, workdir, spec)
    name, ids, topk = load_topk(workdir, spec, int(sc.k), requested)
    if sc.num_targets:
      ids, topk = ids[:int(sc.num_targets)], topk[:int(sc.num_targets)]
    methods.append((name, ids, topk))
  return methods


def _train_key(config: ml_collections.ConfigDict, train: data.Dataset) -> str:
  return utils.config_hash({
      "ensemble": config.ensemble.to_dict(),
      # The pixels too: the same file names with other images train other models.
      "train": fingerprint_lib.arrays_fingerprint(train.index, train.labels, train.images)
  })


def _flips(config, workdir, methods, train_key, test, flip_fn: FlipFn | None) -> dict[int, int]:
  """{target id: flip class} for the targets of all methods (flip_fn None: from the cache only).

  Raises:
    SearchError: flip_fn is None and the cache lacks some of them.
  """
  sc = config.support
  union = np.unique(np.concatenate([ids for _, ids, _ in methods]))
  u_pos = positions_of(test.index, union, "targets (test split)")

  def missing(images, labels):
    raise SearchError(f"{os.path.join(workdir, 'support', 'flip_classes.npz')} lacks the flip "
                      f"classes of {len(labels)} targets: the shards have not run")

  return dict(
      zip(
          union.tolist(),
          flip_classes_cached(
              workdir, union, test.images[u_pos], test.labels[u_pos], flip_fn or missing,
              key=utils.config_hash({
                  "train": train_key,
                  "test": fingerprint_lib.arrays_fingerprint(test.index, test.labels, test.images),
                  "models": sc.flip_models,
                  "seed": sc.flip_seed
              })).tolist()))


def _problem(config, metric, name, ids, topk, train, test, flips, train_key,
             state_path) -> SearchProblem:
  """The search of one (metric, method) over targets `ids`, with the fingerprint of its inputs."""
  sc = config.support
  search_key = {f: sc[f] for f in ("num_tests", "search_budget", "k", "exhaustive", "grid", "seed")}
  t_pos = positions_of(test.index, ids, f"method {name!r} targets (test split)")
  prefixes = positions_of(train.index, topk, f"method {name!r} top-k (train split)")
  true = test.labels[t_pos].astype(np.int64)
  flip = (np.array([flips[int(i)] for i in ids], np.int64) if metric == "mislabel" else None)
  fingerprint = utils.config_hash({
      "search":
          search_key,
      "metric":
          metric,
      "train":
          train_key,
      "inputs":
          fingerprint_lib.arrays_fingerprint(
              ids, prefixes, true, flip if flip is not None else ids[:0], test.images[t_pos])
  })
  return SearchProblem(metric, prefixes, t_pos, ids, true, flip, state_path, fingerprint)


# ------------------------------------------------------------------------------------------------
# Job arrays: shards of the targets, then one merge.


def shard_of(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(shard.index, shard.count) of a job array's shard; (0, 1) for a plain run."""
  shard = config.get("shard")
  if shard is None:
    return 0, 1
  return int(shard.index), int(shard.count)


def shard_part(num_targets: int, index: int, count: int) -> slice:
  """The targets of shard `index` of `count`: a contiguous block (sizes differ by at most 1)."""
  bounds = np.linspace(0, num_targets, count + 1).round().astype(int)
  return slice(int(bounds[index]), int(bounds[index + 1]))


def support_dir(workdir: str, metric: str, method: str, index: int = 0, count: int = 1) -> str:
  """WORKDIR/support/<metric>/<method>, or its shard-<i>-of-<n> subdirectory in a job array."""
  base = os.path.join(workdir, "support", metric, method)
  return base if count == 1 else os.path.join(base, f"shard-{index}-of-{count}")


def merge(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Assembles the shards of a support job array (`config.shard.count` single-process jobs of
  launch/support.py, each with its `shard.index`: each searched its block of the targets) into
  WORKDIR/support/<metric>/<method>/, as one run would have written it; a plain run afterwards
  finds it up to date. Every model's seeds depend on the target, not on its neighbours, so the
  merged results are those of one run.

  Raises:
    SearchError: shard.count is 1; a shard that has not run or not finished (naming it); a shard
      computed with another config, ranking or data than this one; before anything is written.
  """
  sc = config.support
  index, count = shard_of(config)
  del index
  if count < 2:
    raise SearchError("merging support shards needs config.shard.count, the number of shards that "
                      "ran (it is 1)")
  metrics = config_lib.names(sc.metrics)
  methods = _methods(config, workdir)
  train, test = stream.splits(config.data)
  if not isinstance(train.images, np.ndarray):
    train, test = resident.datasets(config, workdir, train, test)
  train_key = _train_key(config, train)
  flips = _flips(config, workdir, methods, train_key, test, None) if "mislabel" in metrics else {}
  plans = []
  for metric in metrics:  # everything checked before anything is written
    for name, ids, topk in methods:
      states = []
      for i in range(count):
        part = shard_part(len(ids), i, count)
        d = support_dir(workdir, metric, name, i, count)
        p = _problem(config, metric, name, ids[part], topk[part], train, test, flips, train_key,
                     os.path.join(d, "state.json"))
        if _finished_summary(d, p.fingerprint) is None:
          if os.path.exists(os.path.join(d, "summary.json")):
            raise SearchError(
                f"merge {metric} support of {name}: shard {i} of {count} ({d}) was computed with "
                "another config, ranking or data; rerun it with this config")
          what = "has not finished" if os.path.exists(p.state_path) else "has not run"
          raise SearchError(
              f"merge {metric} support of {name}: shard {i} of {count} {what} (no summary in "
              f"{d}); run launch/support.py with --config.shard.index={i} "
              f"--config.shard.count={count} (it resumes where it stopped)")
        with open(p.state_path) as f:
          states.append(json.load(f))
      full = _problem(config, metric, name, ids, topk, train, test, flips, train_key, None)
      plans.append((metric, name, full, states))
  out: dict[str, Any] = {metric: {} for metric in metrics}
  for metric, name, full, states in plans:
    rounds: dict[int, dict[str, Any]] = {}
    for st in states:
      for r in st["rounds"]:
        agg = rounds.setdefault(r["round"], {
            "round": r["round"],
            "models": 0,
            "seconds": 0.0,
            "call_models": 0
        })
        for key in ("models", "seconds", "call_models"):
          agg[key] += r[key]
    result = bisection.SearchResult(
        support=np.concatenate([np.asarray(st["best"], np.int64) for st in states]),
        evals=[e for st in states for e in st["evals"]], rounds=[rounds[r] for r in sorted(rounds)])
    base = support_dir(workdir, metric, name)
    out[metric][name] = summaries.write_outputs(base, metric, name, result, full.target_ids,
                                                full.true_labels, full.flip, sc, full.fingerprint)
    for i in range(count):
      shutil.rmtree(support_dir(workdir, metric, name, i, count), ignore_errors=True)
    logging.info("%s support of %s: merged %d shards, median %s", metric, name, count,
                 out[metric][name]["median_support"])
  for metric in metrics:
    summaries.plot_curves(workdir, metric)
  return out


# ------------------------------------------------------------------------------------------------
# Inputs: methods, top-k files, targets.


def require_attribution(config: ml_collections.ConfigDict, workdir: str, method: str) -> None:
  """WORKDIR/attribution/<method> must be this config's (`jaxattr.ownership.require`).

  Raises:
    ownership.StageMismatchError: its record is missing or differs (naming the fields).
  """
  ownership.require(workdir, "attribution",
                    lambda: ownership.attribution_fields(config, workdir, method), method=method)


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
      what = f"support.targets={spec!r}"
      return utils.integer_values(utils.load_user_npy(spec, what, SearchError), what,
                                  SearchError).ravel()
    with open(spec) as f:
      spec = f.read()
  try:
    return np.array([int(s) for s in spec.replace(",", " ").split()], np.int64)
  except ValueError:
    raise SearchError(
        f"support.targets={spec!r} is neither a file nor a list of integers") from None


def load_topk(workdir: str, method: str, k: int,
              targets: np.ndarray | None = None) -> tuple[str, np.ndarray, np.ndarray]:
  """A method's top-k rows for its targets.

  Args:
    workdir: the run's WORKDIR.
    method: 'name' for WORKDIR/attribution/name/{topk,targets}.npy, or 'name=PATH' for a
      reference-layout matrix int64 [n_test, >= k] indexed by test `index` (needs `targets`).
    k: columns used.
    targets: test `index` values to use (all of the method's targets when None, in its order).

  Returns:
    (name, targets int64 [T], topk int64 [T, k] of train `index` values, best first).
  """
  name, sep, path = method.partition("=")
  if sep:
    if not os.path.exists(path):
      raise SearchError(f"method {name!r}: top-k file {path} does not exist")
    what = f"support.methods entry {method!r}"
    matrix = utils.load_user_npy(path, what, SearchError, mmap=True)
    if matrix.ndim != 2 or matrix.shape[1] < k:
      raise SearchError(f"{path}: expected a reference-layout matrix [n_test, >= {k}], got "
                        f"{matrix.shape}")
    if targets is None:
      raise SearchError(f"{path}: a reference-layout matrix needs explicit targets "
                        "(--config.support.targets); its rows do not say which were computed")
    if targets.min() < 0 or targets.max() >= matrix.shape[0]:
      raise SearchError(f"{path}: targets must lie in [0, {matrix.shape[0]})")
    return name, targets, utils.integer_values(matrix[targets, :k], f"{what} (the rows of "
                                               "support.targets)", SearchError)
  base = os.path.join(workdir, "attribution", name)
  # jaxattr.attribute writes targets.npy as test positions and target_index.npy as test
  # `index` values; the search speaks index values.
  ids = "target_index.npy" if os.path.exists(os.path.join(base,
                                                          "target_index.npy")) else ("targets.npy")
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


# ------------------------------------------------------------------------------------------------
# The trainer adapter and the flip-class cache.


def trainer_predictor(trainer: Any, test_images: np.ndarray) -> Predictor:
  """A `bisection.Predictor` that trains with an `ensemble.Trainer`.

  Args:
    trainer: the `jaxattr.counterfactual.ensemble.Trainer` of the training set.
    test_images: uint8 [N_test, H, W, 3], indexed by the predictor's eval positions.

  Returns:
    predict(seeds, prefixes, sizes, flip, eval_positions) -> predicted class int [M]. All models
    of a call train in one trainer call and are evaluated on the call's distinct target images at
    once; each keeps the prediction on its own target.
  """

  def predict(seeds, prefixes, sizes, flip, eval_positions):
    unique, inverse = np.unique(np.asarray(eval_positions), return_inverse=True)
    logits, _ = trainer.train_and_predict(test_images[unique], np.asarray(
        seeds, np.int64), prefixes=np.asarray(prefixes, np.int64), sizes=np.asarray(
            sizes, np.int64), flip=None if flip is None else np.asarray(flip, np.int64))
    return np.asarray(logits)[np.arange(len(seeds)), inverse].argmax(-1)

  return predict


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
    if distributed.is_main():
      utils.save_npz(path, index=ids, flip_class=np.array([known[i] for i in ids], np.int64),
                     key=np.array(key))
  return np.array([known[int(t)] for t in target_ids], np.int64)


def _finished_summary(out_dir: str, fingerprint: str) -> dict[str, Any] | None:
  path = os.path.join(out_dir, "summary.json")
  if not os.path.exists(path) or not os.path.exists(os.path.join(out_dir, "results.jsonl")):
    return None
  with open(path) as f:
    summary = json.load(f)
  return summary if summary.get("fingerprint") == fingerprint else None


__all__: Sequence[str] = (
    "FlipFn",
    "flip_classes_cached",
    "load_topk",
    "parse_targets",
    "positions_of",
    "run",
    "trainer_predictor",
)

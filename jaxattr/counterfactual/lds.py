"""The linear datamodeling score (LDS; Park et al. 2023), on the parallel ensemble trainer.

S random subsets of the training set, each holding round(alpha N) images drawn from the config
seed; R models trained on each (`ensemble.Trainer`, the `ensemble` recipe with its schedule set
by the subset's size, `subset_recipe`; seeds lds.seed * 10**6 + model); the correct-class margin
(`trak.margin`) of every evaluated target under every model, averaged over a subset's R models.
A method with scores tau [T, N] predicts the margin of target t under subset s as
sum_{i in s} tau[t, i]; its LDS is the mean over targets of the Spearman rank correlation, over
subsets, between predicted and measured margins. The 95% interval is a percentile bootstrap over
targets.

The margins are kept in WORKDIR/lds/margins.npz after every wave (one trainer call per wave of
models), so a killed run resumes at its first untrained wave; a file of another config, data,
subsets or targets is never reused.

Methods (`lds.methods`): 'trak' (all training images, `jaxattr.attribute.trak`); 'esvm', 'l2' and
'cosine' from the features, which rank the target's own class only. Their LDS scores: an image of
another class scores 0; an image of the target's class its ranking score (ESVM decision value,
cosine similarity, minus the l2 distance) minus the lowest such score in the class, so the
least similar image of the class scores 0 and every other more (a raw ESVM decision value is
negative for nearly every candidate, and summing those would predict LOWER margins from MORE
images of the target's class, whatever the ranking); and 'name=PATH.npy', a float score matrix
[LDS targets or test images, train images] (as TRAK and dattri write them), or PATH.npz with
`scores` and the `train_index` (and `target_index`) they belong to, checked against the split.
'class' scores 1 for every image of the target's class and 0 elsewhere: no attribution at all,
the floor that a same-class method's LDS should be read against (more images of its class raise
a target's margin whichever they are).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import ml_collections
import numpy as np
from absl import logging
from scipy import stats as scipy_stats

from jaxattr import config as config_lib, distributed, fingerprint as fingerprint_lib, utils

FEATURE_METHODS = ("esvm", "l2", "cosine")
OWN_METHODS = FEATURE_METHODS + ("trak", "class")


class LdsError(ValueError):
  """Bad LDS settings or inputs (names the field, file or shape)."""


def check_settings(lc: ml_collections.ConfigDict) -> None:
  """Raises LdsError naming the first bad `lds.<field>` (validate.py checks all of them at once
  for the launchers; this guards direct calls)."""
  alpha = lc.alpha
  if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0 < alpha < 1:
    raise LdsError(f"lds.alpha={alpha!r} must lie in (0, 1): the fraction of the training set in "
                   "each subset")
  for name, lo in (("num_subsets", 2), ("models_per_subset", 1), ("num_targets", 0), ("seed", 0),
                   ("bootstrap", 0)):
    v = lc[name]
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo:
      raise LdsError(f"lds.{name}={v!r} must be an int >= {lo}")


def draw_subsets(labels: np.ndarray, num_subsets: int, alpha: float, seed: int) -> np.ndarray:
  """bool [S, N]: S subsets of round(alpha N) training positions each, from `seed`.

  Raises:
    LdsError: alpha outside (0, 1), or a subset that lacks a class of the training set (the
      subsets are too small for the classes: raise lds.alpha).
  """
  if not 0 < alpha < 1:
    raise LdsError(f"lds.alpha={alpha!r} must lie in (0, 1)")
  n = len(labels)
  size = int(round(alpha * n))
  rng = np.random.default_rng([int(seed), 0x1D5])
  masks = np.zeros((num_subsets, n), bool)
  classes = np.unique(labels)
  for s in range(num_subsets):
    masks[s, rng.choice(n, size=size, replace=False)] = True
    missing = np.setdiff1d(classes, labels[masks[s]])
    if len(missing):
      raise LdsError(f"LDS subset {s} of {size} images (lds.alpha={alpha} of {n}) holds no image "
                     f"of class(es) {missing[:5].tolist()}: the subsets are smaller than the "
                     "classes need; raise lds.alpha")
  return masks


def select_targets(n_test: int, num_targets: int, seed: int) -> np.ndarray:
  """int64 test positions of the LDS targets: all (num_targets 0 or >= n_test) or a seeded sorted
  sample."""
  if not num_targets or num_targets >= n_test:
    return np.arange(n_test, dtype=np.int64)
  rng = np.random.default_rng([int(seed), 0x7A6])
  return np.sort(rng.choice(n_test, size=num_targets, replace=False)).astype(np.int64)


def model_seeds(num_subsets: int, per_subset: int, seed: int) -> np.ndarray:
  """int64 [S * R] training seeds, model j trains on subset j // R."""
  return int(seed) * 10**6 + np.arange(num_subsets * per_subset, dtype=np.int64)


def spearman_rows(pred: np.ndarray, actual: np.ndarray) -> np.ndarray:
  """Spearman correlation of every column: pred, actual [S, T] -> [T] (ties averaged; NaN where a
  column is constant)."""
  rp = scipy_stats.rankdata(pred, axis=0)
  ra = scipy_stats.rankdata(actual, axis=0)
  rp -= rp.mean(0)
  ra -= ra.mean(0)
  den = np.sqrt((rp * rp).sum(0) * (ra * ra).sum(0))
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(den > 0, (rp * ra).sum(0) / np.where(den > 0, den, 1), np.nan)


def predicted_margins(scores: np.ndarray, masks: np.ndarray) -> np.ndarray:
  """[S, T]: the summed scores [T, N] of each subset's images (masks bool [S, N])."""
  return masks.astype(np.float64) @ np.asarray(scores, np.float64).T


def lds_per_target(scores: np.ndarray, masks: np.ndarray, margins: np.ndarray) -> np.ndarray:
  """[T] Spearman correlations between predicted and measured margins [S, T]."""
  return spearman_rows(predicted_margins(scores, masks), margins)


def bootstrap_interval(values: np.ndarray, resamples: int, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
  """Percentile bootstrap interval of the mean of `values` (NaNs dropped) over resamples."""
  v = np.asarray(values, np.float64)
  v = v[np.isfinite(v)]
  if not len(v) or resamples < 1:
    return float("nan"), float("nan")
  rng = np.random.default_rng([int(seed), 0xB007])
  means = v[rng.integers(0, len(v), size=(resamples, len(v)))].mean(1)
  lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
  return float(lo), float(hi)


def check_scores(name: str, scores: np.ndarray, num_targets: int, num_train: int,
                 what: str = "") -> None:
  """Raises LdsError for a score matrix that is not float [targets, train] or holds NaN/inf;
  `what` names it in the message (default: LDS method `name`)."""
  what = what or f"LDS method {name!r}"
  scores = np.asarray(scores)
  if scores.ndim != 2 or scores.shape != (num_targets, num_train):
    raise LdsError(f"{what}: scores of shape {scores.shape}, expected [{num_targets} targets, "
                   f"{num_train} training images]")
  if not np.issubdtype(scores.dtype, np.floating):
    raise LdsError(f"{what}: scores of dtype {scores.dtype}, expected floats")
  bad = np.argwhere(~np.isfinite(scores))
  if len(bad):
    raise LdsError(f"{what}: {len(bad)} scores are NaN or infinite (first at target row "
                   f"{bad[0][0]}, training position {bad[0][1]})")


def external_scores(name: str, path: str, targets: np.ndarray, train_index: np.ndarray,
                    test_index: np.ndarray) -> np.ndarray:
  """The [LDS targets, N] rows of a 'name=PATH' score matrix.

  PATH.npy: float [LDS targets or test images, N], rows in the order of the LDS targets or of
  the test split, columns in the order of the training split. PATH.npz: `scores` as above, with
  `train_index` [N] (and optionally `target_index`, one per row) giving the `index` values the
  columns (rows) belong to; they must be the split's, else the error names the first mismatch.
  """
  if not os.path.exists(path):
    raise LdsError(f"lds.methods entry {name + '=' + path!r}: file not found")
  n_test, num_train = len(test_index), len(train_index)
  what = f"lds.methods entry {name + '=' + path!r}"
  if path.endswith(".npz"):
    z = utils.load_user_npz(path, what, LdsError)
    if "scores" not in z:
      raise LdsError(f"{what}: no 'scores' array (has {sorted(z)})")
    scores = z["scores"]
    if "train_index" in z:
      got, want = np.asarray(z["train_index"]), np.asarray(train_index)
      if got.shape != want.shape or not np.array_equal(got, want):
        bad = (np.flatnonzero(
            got[:len(want)] != want[:len(got)])[:1].tolist() if got.ndim == 1 else [])
        where = f"; first difference at column {bad[0]}" if bad else ""
        raise LdsError(f"{what}: its train_index (shape {got.shape}) is not the training "
                       f"split's ({len(want)} index values){where}: the scores belong to another "
                       "split or order")
    if "target_index" in z:
      got = np.asarray(z["target_index"])
      if got.ndim == 1 and len(got) == n_test and n_test != len(targets):
        want = np.asarray(test_index)
      else:
        want = np.asarray(test_index)[targets]
      if got.shape != want.shape or not np.array_equal(got, want):
        raise LdsError(f"{what}: its target_index does not match the LDS targets' (or the test "
                       "split's) index values")
  else:
    scores = utils.load_user_npy(path, what, LdsError, mmap=True)
  if n_test != len(targets) and scores.shape != (len(targets), num_train):
    if scores.shape != (n_test, num_train):
      raise LdsError(f"{what}: scores of shape {scores.shape}, expected [{len(targets)} LDS "
                     f"targets or {n_test} test images, {num_train} training images]")
    scores = scores[targets]  # a row per test image: keep the LDS targets' rows
  check_scores(name, scores, len(targets), num_train, what)
  return np.asarray(scores, np.float32)


def feature_scores(method: str, train_features: np.ndarray, train_labels: np.ndarray,
                   target_features: np.ndarray, target_labels: np.ndarray,
                   options: Any = None) -> np.ndarray:
  """[T, N] scores of a feature method for LDS: the ranking score shifted to 0 at the class's
  least similar image, 0 outside the class (module docstring)."""
  from jaxattr.attribute import esvm  # pylint: disable=g-import-not-at-top
  from jaxattr.attribute.options import SolverOptions  # pylint: disable=g-import-not-at-top
  if method not in FEATURE_METHODS:
    raise LdsError(f"unknown feature method {method!r}; expected one of {FEATURE_METHODS}")
  out = np.zeros((len(target_features), len(train_features)), np.float32)
  for c in np.unique(target_labels):
    rows = np.flatnonzero(target_labels == c)
    cols = np.flatnonzero(train_labels == c)
    t = np.asarray(target_features[rows], np.float32)
    x = np.asarray(train_features[cols], np.float32)
    if method == "esvm":
      s = np.asarray(esvm.esvm_scores(t, x, options or SolverOptions(), allow_nonconverged=True))
    elif method == "cosine":
      tn = t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12)
      xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
      s = tn @ xn.T
    else:
      s = -np.sqrt(np.maximum((t * t).sum(1)[:, None] - 2 * t @ x.T + (x * x).sum(1)[None], 0))
    out[np.ix_(rows, cols)] = s - s.min(1, keepdims=True)
  return out


class MarginTable:
  """WORKDIR/lds/margins.npz: measured margins [models, targets] and which models are done,
  for one key (config, data, subsets, targets); rewritten atomically after every wave."""

  def __init__(self, path: str, key: str, num_models: int, num_targets: int):
    self.path, self.key = path, key
    self.margins = np.zeros((num_models, num_targets), np.float32)
    self.done = np.zeros(num_models, bool)
    if os.path.exists(path):
      with np.load(path) as z:
        if str(z["key"]) == key and z["margins"].shape == self.margins.shape:
          self.margins, self.done = z["margins"].copy(), z["done"].copy()
        else:
          logging.info("%s: margins of another config, data, subsets or targets; starting over",
                       path)

  def save(self) -> None:
    utils.save_npz(self.path, key=np.asarray(self.key), margins=self.margins, done=self.done)


def subset_recipe(ensemble_config: ml_collections.ConfigDict,
                  masks: np.ndarray) -> ml_collections.ConfigDict:
  """The recipe of the subset models: the `ensemble` section with the schedule's iterations per
  epoch taken from the subset size, so each model trains the whole recipe on its subset (as
  models trained on a smaller dataset would; support's models instead keep the full set's
  schedule, the reference's semantics for removal)."""
  cfg = ensemble_config.copy_and_resolve_references()
  cfg.schedule_examples = int(masks[0].sum())
  return cfg


def train_margins(trainer: Any, masks: np.ndarray, per_subset: int, seed: int,
                  target_images: np.ndarray, target_labels: np.ndarray, path: str,
                  key: str) -> tuple[np.ndarray, dict[str, Any]]:
  """Margins [S, T] (mean over each subset's R models), training the models not yet in `path`.

  Each wave of models is one `trainer.train_and_predict` call: model j trains on subset j // R
  (its complement removed) with seed `model_seeds(...)[j]`.
  """
  from jaxattr.attribute import trak  # pylint: disable=g-import-not-at-top
  from jaxattr.counterfactual import ensemble  # pylint: disable=g-import-not-at-top
  s_count, n = masks.shape
  seeds = model_seeds(s_count, per_subset, seed)
  m_count = len(seeds)
  subset_of = np.arange(m_count) // per_subset
  removed = np.stack([np.flatnonzero(~masks[s]) for s in range(s_count)])  # equal sizes
  table = MarginTable(path, key, m_count, len(target_labels))
  wave = ensemble.wave_size(trainer.config, m_count, trainer.num_groups)
  t0 = time.perf_counter()
  trained, calls = 0, 0
  meter = utils.Throughput("lds models", total=m_count, unit="models",
                           every_s=float(trainer.config.log_every_s))
  meter.update(int(table.done.sum()))
  for start in range(0, m_count, wave):
    members = np.arange(start, min(start + wave, m_count))
    if table.done[members].all():
      continue
    logits, _ = trainer.train_and_predict(target_images, seeds[members],
                                          prefixes=removed[subset_of[members]])
    calls += 1
    table.margins[members] = trak.margins(logits, target_labels)
    table.done[members] = True
    trained += len(members)
    if distributed.is_main():
      table.save()
    meter.update(len(members), force=True)
    logging.info("lds: %s (wave of %d models, models %d/%d done)", meter.message(), len(members),
                 int(table.done.sum()), m_count)
  margins = table.margins.reshape(s_count, per_subset, -1).mean(1)
  info = {
      "models": m_count,
      "trained_now": trained,
      "trainer_calls": calls,
      "wave": wave,
      "seconds": time.perf_counter() - t0
  }
  return margins, info


def run(config: ml_collections.ConfigDict, workdir: str, *, train: Any = None,
        test: Any = None) -> dict[str, Any]:
  """The LDS stage: margins of the subset models, then every method of lds.methods; writes
  WORKDIR/lds/{subsets.npy, targets.npy, margins.npz, <method>.scores.npy, summary.json,
  scatter.png}. Returns summary.json's content."""
  from jaxattr import stream, validate  # pylint: disable=g-import-not-at-top
  lc = config.lds
  if train is None or test is None:  # the launcher: every problem of the config at once
    train, test = stream.splits(config.data)
    validate.check(config, train, test, stages=("lds",))
  check_settings(lc)
  specs = config_lib.names(lc.methods)
  if not specs:
    raise LdsError("lds.methods is empty: name the methods to score (e.g. 'esvm,l2,trak')")
  if not isinstance(train.images, np.ndarray):
    raise LdsError("LDS trains its models on images in memory: streamed data (data.stream=True) is "
                   "not supported")
  out_dir = os.path.join(workdir, "lds")
  os.makedirs(out_dir, exist_ok=True)
  targets = select_targets(len(test), int(lc.num_targets), int(lc.seed))
  masks = draw_subsets(train.labels, int(lc.num_subsets), float(lc.alpha), int(lc.seed))
  n = len(train)
  # Every method's scores first: bad score files fail before any model trains.
  scores: dict[str, np.ndarray] = {}
  for spec in specs:
    name, _, path = spec.partition("=")
    if path:
      scores[name] = external_scores(name, path, targets, train.index, test.index)
  if distributed.is_main():
    utils.save_npy(os.path.join(out_dir, "subsets.npy"), masks)
    utils.save_npy(os.path.join(out_dir, "targets.npy"), targets)
  key = utils.config_hash({
      "ensemble":
          subset_recipe(config.ensemble, masks).to_dict(),
      "lds": {
          k: lc[k] for k in ("num_subsets", "alpha", "models_per_subset", "seed")
      },
      "train":
          fingerprint_lib.arrays_fingerprint(train.index, train.labels, train.images),
      "targets":
          fingerprint_lib.arrays_fingerprint(targets, test.labels[targets], test.images[targets]),
  })
  inputs = utils.config_hash({
      "margins": key,
      "methods": list(specs),
      "trak": config.trak.to_dict() if "trak" in specs else None,
      "attribution": config.attribution.to_dict(),
      "features": _features_record(workdir) if set(specs) & set(FEATURE_METHODS) else None,
      "external": {
          n: fingerprint_lib.arrays_fingerprint(v) for n, v in scores.items()
      },
      "bootstrap": int(lc.bootstrap),
  })
  done = read_summary(workdir)
  if done is not None and done.get("inputs") == inputs:
    logging.info("lds: up to date (%s), skipped", os.path.join(out_dir, "summary.json"))
    return done
  from jaxattr.counterfactual import ensemble  # pylint: disable=g-import-not-at-top
  trainer = ensemble.Trainer(subset_recipe(config.ensemble, masks), train)
  margins, info = train_margins(trainer, masks, int(lc.models_per_subset), int(lc.seed),
                                test.images[targets], test.labels[targets],
                                os.path.join(out_dir, "margins.npz"), key)
  t = None
  if "trak" in specs:  # its models: trained (or read back) by every process together
    from jaxattr.attribute import trak  # pylint: disable=g-import-not-at-top
    t = trak.Trak(config, workdir, train, trainer=trainer)
    t.variables()
  if not distributed.is_main():  # process 0 scores the methods and writes; the others read
    distributed.barrier("lds-written")
    return read_summary(workdir)
  for spec in specs:
    name, _, path = spec.partition("=")
    if path:
      continue
    if name == "trak":
      s = t.scores(test.images[targets], test.labels[targets])
    elif name == "class":
      s = (train.labels[None, :] == test.labels[targets][:, None]).astype(np.float32)
    else:
      from jaxattr.attribute import attribution  # pylint: disable=g-import-not-at-top
      from jaxattr.attribute.options import SolverOptions  # pylint: disable=g-import-not-at-top
      feats = {sp: attribution.load_features(workdir, sp) for sp in ("train", "test")}
      for sp, ds in (("train", train), ("test", test)):
        if not np.array_equal(feats[sp]["index"], ds.index):
          raise LdsError(f"WORKDIR/features/{sp}.npz does not match the {sp} split of config.data: "
                         "rerun the features stage with this config")
      s = feature_scores(name, feats["train"]["features"], feats["train"]["labels"],
                         feats["test"]["features"][targets], feats["test"]["labels"][targets],
                         SolverOptions.from_config(config.attribution))
    check_scores(name, s, len(targets), n)
    scores[name] = s
  summary: dict[str, Any] = {
      "inputs": inputs,
      "targets": len(targets),
      "subsets": int(lc.num_subsets),
      "alpha": float(lc.alpha),
      "models_per_subset": int(lc.models_per_subset),
      "training": info,
      "methods": {},
      "provenance": utils.provenance(),
  }
  per_target = {}
  for name, s in scores.items():
    rho = lds_per_target(s, masks, margins)
    lo, hi = bootstrap_interval(rho, int(lc.bootstrap), int(lc.seed))
    per_target[name] = rho
    summary["methods"][name] = {
        "lds": float(np.nanmean(rho)) if np.isfinite(rho).any() else None,
        "ci95": [lo, hi],
        "targets_scored": int(np.isfinite(rho).sum()),
    }
    logging.info("LDS %s: %.4f (95%% CI %.4f to %.4f) over %d targets", name,
                 summary["methods"][name]["lds"] or float("nan"), lo, hi, len(rho))
  if distributed.is_main():
    for name, s in scores.items():
      utils.save_npy(os.path.join(out_dir, f"{name}.scores.npy"), s)
    utils.save_npz(os.path.join(out_dir, "per_target.npz"), targets=targets, **{
        f"lds_{k}": v for k, v in per_target.items()
    })
    utils.save_npy(os.path.join(out_dir, "margins_mean.npy"), margins)
    plot_scatter(os.path.join(out_dir, "scatter.png"), scores, masks, margins, targets)
    utils.save_json(os.path.join(out_dir, "summary.json"), summary)
  distributed.barrier("lds-written")
  return summary


def plot_scatter(path: str, scores: dict[str, np.ndarray], masks: np.ndarray, margins: np.ndarray,
                 targets: np.ndarray, num: int = 3) -> None:
  """Predicted (summed scores) vs measured margins over the subsets for the first `num` targets,
  one row per method."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  num = min(num, margins.shape[1])
  names = list(scores)
  fig, axes = plt.subplots(len(names), num, figsize=(3.2 * num, 2.8 * len(names)), squeeze=False)
  for i, name in enumerate(names):
    pred = predicted_margins(scores[name][:num], masks)
    rho = spearman_rows(pred, margins[:, :num])
    for j in range(num):
      ax = axes[i, j]
      ax.scatter(pred[:, j], margins[:, j], s=8, alpha=0.7)
      ax.set_title(f"{name}, test {targets[j]}: rho {rho[j]:.2f}", fontsize=8)
      ax.tick_params(labelsize=7)
      if j == 0:
        ax.set_ylabel("measured margin", fontsize=8)
      if i == len(names) - 1:
        ax.set_xlabel("predicted (sum of scores)", fontsize=8)
  fig.tight_layout()
  with utils.atomic_path(path) as tmp:
    fig.savefig(tmp, format="png", dpi=90)
  plt.close(fig)


def _features_record(workdir: str) -> str | None:
  """The features stage's record (its fingerprint), or None when it has none."""
  path = os.path.join(workdir, "features", "fingerprint.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return utils.config_hash(json.load(f))


def read_summary(workdir: str) -> dict[str, Any] | None:
  path = os.path.join(workdir, "lds", "summary.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)

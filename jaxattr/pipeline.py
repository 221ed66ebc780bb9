"""The main job: pretrain (or load) an encoder -> features -> attribution (top-k per target).

Each stage records the hash of the config fields it depends on in WORKDIR/stages.json and is
skipped when its outputs exist for the same hash, so re-running after a crash, or with a new
method, costs only the new work. Stage wall times go to WORKDIR/timings.json.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

import ml_collections
import numpy as np
from absl import logging

from jaxattr import attribute, data as data_lib, features, ssl, utils, viz


def _stage_keys(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config fields each stage's output depends on (a stage also depends on earlier ones)."""
  data = config.data.to_dict()
  pre = {"seed": config.seed, "data": data, "encoder": config.encoder.to_dict(),
         "pretrain": config.pretrain.to_dict()}
  feat = {"pre": pre if not config.encoder.checkpoint else config.encoder.to_dict(),
          "features": config.features.to_dict(), "data": data}
  attr = {"feat": feat, "attribution": config.attribution.to_dict(), "seed": config.seed,
          "viz": config.viz.to_dict()}
  return {"pretrain": pre, "features": feat, "attribution": attr}


class Stages:
  """Skip-if-done bookkeeping in WORKDIR/stages.json and timings in WORKDIR/timings.json."""

  def __init__(self, workdir: str, keys: dict[str, Any]):
    self.workdir = workdir
    self.keys = {k: utils.config_hash(v) for k, v in keys.items()}
    self.path = os.path.join(workdir, "stages.json")
    self.done = self._read(self.path)
    self.timings = self._read(os.path.join(workdir, "timings.json"))

  @staticmethod
  def _read(path: str) -> dict[str, Any]:
    if os.path.exists(path):
      with open(path) as f:
        return json.load(f)
    return {}

  def run(self, name: str, fn: Callable[[], Any], outputs: list[str]) -> bool:
    """Runs `fn` unless stage `name` finished before with the same hash and its outputs exist."""
    key = self.keys[name]
    have = all(os.path.exists(os.path.join(self.workdir, o)) for o in outputs)
    if self.done.get(name) == key and have:
      logging.info("stage %s: up to date (config hash %s), skipped", name, key)
      return False
    logging.info("stage %s: running (config hash %s)", name, key)
    t0 = time.perf_counter()
    fn()
    self.timings[name] = time.perf_counter() - t0
    self.done[name] = key
    utils.save_json(self.path, self.done)
    utils.save_json(os.path.join(self.workdir, "timings.json"), self.timings)
    logging.info("stage %s: done in %.1fs", name, self.timings[name])
    return True


def attribution(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Top-k attribution for every method (jaxattr.attribute), plus a PNG grid per method.

  Writes WORKDIR/attribution/<method>/{topk,scores,targets,...}.npy (see jaxattr.attribute.run)
  and grid.png: the first `viz.num_targets` targets (left) and their top `viz.top` images.
  """
  results = attribute.run(config, workdir)
  train = data_lib.load(config.data.source, "train", **dict(config.data.options))
  test = data_lib.load(config.data.source, "test", **dict(config.data.options))
  pos_tr = {int(i): p for p, i in enumerate(train.index)}
  summary = {}
  for method, res in results.items():
    n, top = min(config.viz.num_targets, len(res.targets)), config.viz.top
    viz.save_grid(os.path.join(workdir, "attribution", method, "grid.png"),
                  [test.images[t] for t in res.targets[:n]],
                  [[train.images[pos_tr[int(i)]] for i in row[:top]] for row in res.indices[:n]],
                  title=f"{method}: targets (left) and their top-{top} training images")
    summary[method] = [{"target": int(test.index[t]), "label": int(test.labels[t]),
                        "top": [int(i) for i in row[:top]],
                        "scores": [float(v) for v in sc[:top]]}
                       for t, row, sc in zip(res.targets[:n], res.indices[:n], res.scores[:n])]
  return summary


def run(self, name: str, fn: Callable[[], Any], outputs: list[str]) -> bool:
    """Runs `fn` unless stage `name` finished before with the same hash and its outputs exist."""
    key = self.keys[name]
    have = all(os.path.exists(os.path.join(self.workdir, o)) for o in outputs)
    if self.done.get(name) == key and have:
      logging.info("stage %s: up to date (config hash %s), skipped", name, key)
      return False
    logging.info("stage %s: running (config hash %s)", name, key)
    t0 = time.perf_counter()
    fn()
    self.timings[name] = time.perf_counter() - t0
    self.done[name] = key
    utils.save_json(self.path, self.done)
    utils.save_json(os.path.join(self.workdir, "timings.json"), self.timings)
    logging.info("stage %s: done in %.1fs", name, self.timings[name])
    return True


def nearest(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Top-k same-class training images by cosine similarity for seeded random test targets.

  Writes WORKDIR/nearest/{nearest.json, grid.png}.
  """
  tr = features.load_features(workdir, "train")
  te = features.load_features(workdir, "test")
  rng = np.random.default_rng(config.seed)
  n_t = min(config.nearest.num_targets, len(te["labels"]))
  targets = np.sort(rng.choice(len(te["labels"]), n_t, replace=False))
  a = tr["features"] / np.linalg.norm(tr["features"], axis=1, keepdims=True).clip(1e-12)
  b = te["features"] / np.linalg.norm(te["features"], axis=1, keepdims=True).clip(1e-12)
  k = config.nearest.k
  rows = []
  for t in targets:
    same = np.flatnonzero(tr["labels"] == te["labels"][t])
    sims = a[same] @ b[t]
    order = np.argsort(-sims, kind="stable")[:k]
    rows.append({"target": int(te["index"][t]), "label": int(te["labels"][t]),
                 "neighbours": [int(tr["index"][same[o]]) for o in order],
                 "scores": [float(sims[o]) for o in order]})
  out_dir = os.path.join(workdir, "nearest")
  train = data_lib.load(config.data.source, "train", **dict(config.data.options))
  test = data_lib.load(config.data.source, "test", **dict(config.data.options))
  pos_tr = {int(i): p for p, i in enumerate(train.index)}
  pos_te = {int(i): p for p, i in enumerate(test.index)}
  viz.save_grid(os.path.join(out_dir, "grid.png"),
                [test.images[pos_te[r["target"]]] for r in rows],
                [[train.images[pos_tr[i]] for i in r["neighbours"]] for r in rows],
                title=f"test targets (left) and their {k} nearest same-class training images")
  summary = {"method": "cosine", "same_class": True, "k": k, "targets": rows}
  utils.save_json(os.path.join(out_dir, "nearest.json"), summary)
  return summary


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs every stage that is not up to date; returns WORKDIR/summary.json's content."""
  os.makedirs(workdir, exist_ok=True)
  utils.save_json(os.path.join(workdir, "config.json"), config.to_dict())
  stages = Stages(workdir, _stage_keys(config))
  if not config.encoder.checkpoint:
    stages.run("pretrain", lambda: ssl.run(config, workdir),
               ["pretrain/encoder/meta.json", "pretrain/summary.json"])
  stages.run("features", lambda: features.run(config, workdir),
             ["features/train.npz", "features/test.npz"])
  methods = list(config.attribution.methods)
  stages.run("attribution", lambda: attribution(config, workdir),
             [f"attribution/{m}/{f}" for m in methods for f in ("topk.npy", "grid.png")])

  summary: dict[str, Any] = {"workdir": os.path.abspath(workdir), "timings": stages.timings,
                             "provenance": utils.provenance()}
  pre = os.path.join(workdir, "pretrain", "summary.json")
  if os.path.exists(pre):
    with open(pre) as f:
      p = json.load(f)
    summary["pretrain"] = {k: p[k] for k in ("steps", "epochs", "final_loss", "knn_accuracy",
                                             "images_per_s", "seconds")}
  with open(os.path.join(workdir, "features", "summary.json")) as f:
    summary["features"] = json.load(f)
  summary["attribution"] = {}
  for m in methods:
    with open(os.path.join(workdir, "attribution", m, "attribution.json")) as f:
      a = json.load(f)
    summary["attribution"][m] = {k: a.get(k) for k in ("k", "num_targets", "targets_per_second",
                                                       "solver")}
  utils.save_json(os.path.join(workdir, "summary.json"), summary)
  logging.info("pipeline: done; summary in %s", os.path.join(workdir, "summary.json"))
  return summary

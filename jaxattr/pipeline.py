"""The main job: encoder -> features -> attribution -> removal/mislabel support -> report.

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

from jaxattr import config as config_lib, data as data_lib, features, pretrain, report, utils
from jaxattr.attribute import METHODS, attribution
from jaxattr.counterfactual import support


def _stage_keys(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config fields each stage's output depends on (a stage also depends on earlier ones)."""
  data = config.data.to_dict()
  pre = {
      "seed": config.seed,
      "data": data,
      "encoder": config.encoder.to_dict(),
      "pretrain": config.pretrain.to_dict()
  }
  feat = {
      "pre": pre if not config.encoder.checkpoint else config.encoder.to_dict(),
      "features": config.features.to_dict(),
      "data": data
  }
  attr = {
      "feat": feat,
      "attribution": config.attribution.to_dict(),
      "seed": config.seed,
      "viz": config.viz.to_dict()
  }
  sup = {"attr": attr, "ensemble": config.ensemble.to_dict(), "support": config.support.to_dict()}
  return {"pretrain": pre, "features": feat, "attribution": attr, "support": sup}


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


def check_config(config: ml_collections.ConfigDict, train: data_lib.Dataset) -> None:
  """Checks settings that later stages need against the data, before any long work starts."""
  n = len(train)
  a = config.attribution
  unknown = [m for m in config_lib.names(a.methods) if m not in METHODS]
  if unknown:
    raise ValueError(f"attribution.methods: unknown {unknown}; known: {list(METHODS)}")
  smallest = int(np.bincount(train.labels).min()) if a.same_class else n
  if a.k > smallest:
    raise ValueError(f"attribution.k={a.k} exceeds the {smallest} training images of the "
                     f"smallest class of {config.data.source}; lower attribution.k")
  if not config.encoder.checkpoint:
    p = config.pretrain
    if p.batch_size % config.encoder.num_splits or p.batch_size > n:
      raise ValueError(f"pretrain.batch_size={p.batch_size} must divide by encoder.num_splits="
                       f"{config.encoder.num_splits} and not exceed the {n} training images")
  if config_lib.names(config.support.metrics):
    if config.support.k > a.k:
      raise ValueError(f"support.k={config.support.k} exceeds attribution.k={a.k}")
    computed = config_lib.names(a.methods)
    own = [
        m for m in config_lib.names(config.support.methods) if "=" not in m and m not in computed
    ]
    if own:
      raise ValueError(f"support.methods {own} are not computed by attribution.methods "
                       f"{list(config_lib.names(a.methods))}")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs every stage that is not up to date; returns WORKDIR/summary.json's content."""
  train, test = data_lib.load_splits(config.data)
  check_config(config, train)
  os.makedirs(workdir, exist_ok=True)
  utils.save_json(os.path.join(workdir, "config.json"), config.to_dict())
  stages = Stages(workdir, _stage_keys(config))
  if not config.encoder.checkpoint:
    stages.run("pretrain", lambda: pretrain.run(config, workdir, train=train, test=test),
               ["pretrain/encoder/meta.json", "pretrain/summary.json"])
  stages.run("features", lambda: features.run(config, workdir, train=train, test=test),
             ["features/train.npz", "features/test.npz"])
  methods = list(config_lib.names(config.attribution.methods))
  stages.run("attribution", lambda: attribution.run(config, workdir, train=train, test=test),
             [f"attribution/{m}/{f}" for m in methods for f in ("topk.npy", "grid.png")])

  if config_lib.names(config.support.metrics):
    stages.run("support", lambda: support.run(config, workdir, train=train, test=test), [
        f"support/{m}/{n}/summary.json" for m in config_lib.names(config.support.metrics)
        for n in config_lib.names(config.support.methods)
    ])
  # The report is cheap and reads everything above: always rendered anew.
  t0 = time.perf_counter()
  report_path = report.write_report(workdir, config=config, train=train, test=test)
  stages.timings["report"] = time.perf_counter() - t0
  utils.save_json(os.path.join(workdir, "timings.json"), stages.timings)
  logging.info("pipeline: report in %s", report_path)

  summary: dict[str, Any] = {
      "workdir": os.path.abspath(workdir),
      "timings": stages.timings,
      "provenance": utils.provenance()
  }
  pre = os.path.join(workdir, "pretrain", "summary.json")
  if os.path.exists(pre):
    with open(pre) as f:
      p = json.load(f)
    keys = ("steps", "epochs", "final_loss", "knn_accuracy", "images_per_s", "seconds")
    summary["pretrain"] = {k: p[k] for k in keys}
  with open(os.path.join(workdir, "features", "summary.json")) as f:
    summary["features"] = json.load(f)
  summary["attribution"] = {}
  for m in methods:
    with open(os.path.join(workdir, "attribution", m, "attribution.json")) as f:
      a = json.load(f)
    summary["attribution"][m] = {
        k: a.get(k) for k in ("k", "num_targets", "targets_per_second", "solver")
    }
  summary["support"] = {}
  for metric in config_lib.names(config.support.metrics):
    for m in config_lib.names(config.support.methods):
      path = os.path.join(workdir, "support", metric, m, "summary.json")
      if os.path.exists(path):
        with open(path) as f:
          s = json.load(f)
        summary["support"].setdefault(metric, {})[m] = {
            k: s.get(k)
            for k in ("median_support", "median_support_flipped_only", "targets", "not_flipped",
                      "fraction_flipped", "trainings", "trainings_per_target_max")
        }
  summary["report"] = os.path.abspath(report_path)
  utils.save_json(os.path.join(workdir, "summary.json"), summary)
  logging.info("pipeline: done; summary in %s", os.path.join(workdir, "summary.json"))
  return summary

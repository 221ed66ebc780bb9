"""The main job: encoder -> features -> attribution -> removal/mislabel support -> LDS -> report.

Each stage records the fingerprint of everything its outputs depend on (config fields, the data,
the earlier stages: `jaxattr.ownership`) and skips itself when its record matches, so re-running
after a crash, or with a new method, costs only the new work, and a changed config or data reruns
exactly the stages it affects. Stage wall times go to WORKDIR/timings.json.
"""

from __future__ import annotations

import glob
import json
import os
import time
from typing import Any, Callable

import ml_collections
from absl import logging

from jaxattr import (
    config as config_lib,
    distributed,
    features,
    pretrain,
    report,
    resident,
    stream,
    utils,
    validate,
)
from jaxattr.attribute import attribution
from jaxattr.counterfactual import lds, support


class Stages:
  """Runs the stages in order and keeps their wall times in WORKDIR/timings.json.

  Whether a stage is up to date is its own business (`jaxattr.ownership`): each stage's run skips
  itself when its records match. A call counts as a run (timed, logged) when it rewrote one of
  the stage's records, and as a skip otherwise (the last run's timing stays).
  """

  def __init__(self, workdir: str):
    self.workdir = workdir
    path = os.path.join(workdir, "timings.json")
    self.timings: dict[str, Any] = {}
    if os.path.exists(path):
      with open(path) as f:
        self.timings = json.load(f)

  def run(self, name: str, fn: Callable[[], Any], records: list[str]) -> bool:
    """Calls `fn` (the stage); `records`: its record files, relative to WORKDIR."""
    paths = [os.path.join(self.workdir, r) for r in records]
    before = [_mtime(p) for p in paths]
    t0 = time.perf_counter()
    fn()
    # Several processes: process 0 writes the stage's records; all see them before comparing.
    distributed.barrier(f"pipeline-stage-{name}")
    seconds = time.perf_counter() - t0
    if [_mtime(p) for p in paths] == before:
      logging.info("stage %s: up to date, skipped", name)
      return False
    self.timings[name] = seconds
    if distributed.is_main():
      utils.save_json(os.path.join(self.workdir, "timings.json"), self.timings)
    logging.info("stage %s: done in %.1fs", name, seconds)
    return True


def _mtime(path: str) -> int | None:
  return os.stat(path).st_mtime_ns if os.path.exists(path) else None


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs every stage that is not up to date; returns WORKDIR/summary.json's content."""
  train, test = stream.splits(config.data)  # streamed (`data.stream`): file lists, no pixels
  validate.check(config, train, test)  # every stage's fields, before any work
  os.makedirs(workdir, exist_ok=True)
  if distributed.is_main():
    utils.save_json(os.path.join(workdir, "config.json"), config.to_dict())
  stages = Stages(workdir)
  if not config.encoder.checkpoint:
    stages.run("pretrain", lambda: pretrain.run(config, workdir, train=train, test=test),
               ["pretrain/summary.json"])
  stages.run("features", lambda: features.run(config, workdir, train=train, test=test),
             ["features/fingerprint.json"])
  methods = list(config_lib.names(config.attribution.methods))
  stages.run("attribution", lambda: attribution.run(config, workdir, train=train, test=test),
             [f"attribution/{m}/fingerprint.json" for m in methods])
  if config_lib.names(config.support.metrics):
    if config.data.get("stream", False):
      # Streamed data: the counterfactual models train on the small resident copy, decoded once
      # (by process 0; the others wait at the stage's barrier).
      stages.run("prepare", lambda: resident.run(config, workdir)
                 if distributed.is_main() else None, ["resident/fingerprint.json"])
    stages.run("support", lambda: support.run(config, workdir, train=train, test=test), [
        f"support/{metric}/{spec.partition('=')[0]}/summary.json"
        for metric in config_lib.names(config.support.metrics)
        for spec in config_lib.names(config.support.methods)
    ])
  if config_lib.names(config.lds.methods):
    stages.run("lds", lambda: lds.run(config, workdir, train=train, test=test),
               ["lds/summary.json"])
  # The report is cheap and reads everything above: always rendered anew, by process 0 alone;
  # the others wait for its summary.
  summary_path = os.path.join(workdir, "summary.json")
  job = distributed.job_overhead()  # collective: every process's start-up, barrier, gather time
  if not distributed.is_main():
    distributed.barrier("pipeline-summary")
    with open(summary_path) as f:
      return json.load(f)
  t0 = time.perf_counter()
  report_path = report.write_report(workdir, config=config, train=train, test=test)
  stages.timings["report"] = time.perf_counter() - t0
  utils.save_json(os.path.join(workdir, "timings.json"), stages.timings)
  logging.info("pipeline: report in %s", report_path)

  summary: dict[str, Any] = {
      "workdir": os.path.abspath(workdir),
      "timings": stages.timings,
      "job": job,
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
    for m in (spec.partition("=")[0] for spec in config_lib.names(config.support.methods)):
      path = os.path.join(workdir, "support", metric, m, "summary.json")
      if os.path.exists(path):
        with open(path) as f:
          s = json.load(f)
        summary["support"].setdefault(metric, {})[m] = {
            k: s.get(k)
            for k in ("median_support", "median_support_flipped_only", "targets", "not_flipped",
                      "fraction_flipped", "trainings", "trainings_per_target_max")
        }
  lds_summary = lds.read_summary(workdir)
  if lds_summary is not None:
    summary["lds"] = {m: v for m, v in lds_summary["methods"].items()}
  logging.info(
      "pipeline: %d process(es), %d device(s); seconds per process in start-up %s, "
      "barriers %s, gathers %s, checkpoints %s", job["processes"], job["devices"],
      *(job["seconds"][k] for k in ("start-up", "barriers", "gathers", "checkpoints")))
  summary["report"] = os.path.abspath(report_path)
  utils.save_json(summary_path, summary)
  logging.info("pipeline: done; summary in %s", summary_path)
  distributed.barrier("pipeline-summary")
  return summary


def merge_shards(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Assembles a job array's shards (`config.shard.count`) of attribution and of support, those
  that exist (`attribution.merge`, `support.merge`).

  Raises:
    ValueError: shard.count below 2, or no shard of either stage in the workdir; the stages'
      own errors for shards that have not run, not finished or do not match.
  """
  count = int(config.shard.count)
  if count < 2:
    raise ValueError("launch/merge.py assembles a job array: set config.shard.count to the number "
                     "of shards that ran (it is 1)")
  pattern = f"shard-*-of-{count}"
  found = {
      "attribution": glob.glob(os.path.join(workdir, "attribution", "*", pattern)),
      "support": glob.glob(os.path.join(workdir, "support", "*", "*", pattern))
  }
  if not any(found.values()):
    raise ValueError(
        f"no shard of a {count}-job array in {workdir}/attribution or {workdir}/support: run "
        "launch/attribute.py or launch/support.py with --config.shard.index=i "
        f"--config.shard.count={count} for each i first")
  out: dict[str, Any] = {}
  if found["attribution"]:
    out["attribution"] = attribution.merge(config, workdir)
  if found["support"]:
    out["support"] = support.merge(config, workdir)
  return out

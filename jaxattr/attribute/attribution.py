"""The attribution stage: every method of `config.attribution` on WORKDIR/features.

`run(config, workdir)` writes WORKDIR/attribution/<method>/: topk.npy, scores.npy, targets.npy,
target_index.npy, topk_reference.npy, stats.npz (ESVM), attribution.json and grid.png. A killed
run restarts at its first unfinished chunk (`topk.topk`'s `chunk_dir`). Each method's
fingerprint.json (`jaxattr.ownership`) ties it to the features, `seed`, `attribution` and `viz`:
a method whose record matches is skipped, and features of another config or data are refused.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging

from jaxattr import (
    config as config_lib,
    data as data_lib,
    distributed,
    ownership,
    stream,
    utils,
    validate,
    viz,
)
from jaxattr.attribute.options import SolverOptions
from jaxattr.attribute.ranking import (
    AttributionError,
    TopK,
    check_inputs,
    chunk_hash,
    plan_chunks,
    topk,
)

# What a finished method leaves in WORKDIR/attribution/<method> (besides its ownership record).
OUTPUTS = ("topk.npy", "scores.npy", "targets.npy", "target_index.npy", "attribution.json",
           "grid.png")


def load_features(workdir: str, split: str) -> dict[str, np.ndarray]:
  """WORKDIR/features/<split>.npz as a dict (streamed features memory-mapped from
  <split>.features.npy); a clear error when missing or incomplete.

  Returns:
    'features' float [N, d], 'labels' [N], 'index' int64 [N] (positions when the file has none)
    and whatever else the file holds.
  """
  path = os.path.join(workdir, "features", f"{split}.npz")
  if not os.path.exists(path):
    raise AttributionError(f"feature file not found: {path} (run launch/features.py)")
  mapped = os.path.join(workdir, "features", f"{split}.features.npy")
  with np.load(path, allow_pickle=False) as z:
    out = {name: z[name] for name in z.files}
  if "features" not in out and os.path.exists(mapped):
    # Streamed features (`data.stream`): memory-mapped, so a class's rows are read when used.
    out["features"] = np.load(mapped, mmap_mode="r")
  missing = {"features", "labels"} - set(out)
  if missing:
    raise AttributionError(f"{path} lacks arrays {sorted(missing)}; has {sorted(out)}")
  out.setdefault("index", np.arange(len(out["features"]), dtype=np.int64))
  if len(out["index"]) != len(out["features"]):
    raise AttributionError(
        f"{path}: {len(out['features'])} feature rows but {len(out['index'])} index entries")
  if "ok" in out and (out["ok"].dtype != bool or out["ok"].shape != (len(out["features"]),)):
    raise AttributionError(f"{path}: 'ok' must be bool [{len(out['features'])}] (one per feature "
                           f"row), got {out['ok'].dtype} {out['ok'].shape}; rerun the features "
                           "stage")
  return out


def select_targets(spec: str, n_test: int, num_targets: int, target_list: Sequence[int], seed: int,
                   test_ok: np.ndarray | None = None) -> np.ndarray:
  """int64 [targets] test positions for targets='all' | 'random' (seeded, sorted) | 'list'.

  `test_ok` (bool [n_test], the features' `ok`): test images that the features stage skipped as
  unreadable (False) are left out of 'all' and 'random' (drawn among the readable ones), and a
  'list' naming one is refused. With every image readable the targets are as without it.
  """
  ok = None if test_ok is None or np.all(test_ok) else np.asarray(test_ok, bool)
  skipped = "" if ok is None else f" readable (of {n_test}; {int((~ok).sum())} were unreadable)"
  if spec == "all":
    return np.arange(n_test, dtype=np.int64) if ok is None else np.flatnonzero(ok)
  if spec == "random":
    pool = np.arange(n_test) if ok is None else np.flatnonzero(ok)
    if not 0 < num_targets <= len(pool):
      raise AttributionError(f"num_targets={num_targets} must lie in [1, {len(pool)}] (the test "
                             f"images{skipped}); set --config.attribution.num_targets")
    rng = np.random.default_rng(seed)
    return np.sort(pool[rng.choice(len(pool), size=num_targets, replace=False)]).astype(np.int64)
  if spec == "list":
    targets = np.asarray(list(target_list), dtype=np.int64)
    if ok is not None:
      inside = targets[(targets >= 0) & (targets < n_test)]
      bad = inside[~ok[inside]]
      if len(bad):
        raise AttributionError(
            f"attribution.target_list names test images that were unreadable when the features "
            f"were extracted (skip_unreadable stored them as black images): positions "
            f"{bad[:10].tolist()}; drop them from --config.attribution.target_list")
    return targets
  raise AttributionError(f"unknown targets spec {spec!r}; expected 'all', 'random' or 'list'")


def run(config: ml_collections.ConfigDict, workdir: str, *, train: data_lib.Dataset | None = None,
        test: data_lib.Dataset | None = None) -> dict[str, TopK]:
  """Top-k attribution of every method of `config.attribution`, with files and a grid each
  ('trak' from its own models and the images: `trak_topk`; the others from the features).

  Reads `config.attribution` (`jaxattr.config.attribution_section()`), `config.seed` (random
  targets) and `config.viz` (the grid), and writes WORKDIR/attribution/<method>/ (module
  docstring). Everything is checked before any solve.

  Args:
    config: the experiment config.
    workdir: the run directory holding features/{train,test}.npz.
    train, test: the `Dataset`s the features were extracted from, for the grids' images;
      None: `jaxattr.data.load_splits(config.data)`.

  Returns:
    {method: TopK}.

  Raises:
    AttributionError: bad settings (naming the `attribution.<field>`) or inputs, before any
      solve; or non-finite scores (`attribution.C` too large for the features' scale).
    jaxattr.validate.ConfigError: a bad config field, when this stage loads the data itself.
    jaxattr.ownership.StageMismatchError: WORKDIR/features belong to another config or data.
    RuntimeError: some ESVM did not converge (and not `allow_nonconverged`), after every file
      has been written.
  """
  cfg = config.attribution
  methods = config_lib.names(cfg.methods)
  options = SolverOptions.from_config(cfg)
  # WORKDIR/features must belong to this config and data (StageMismatchError otherwise).
  for split in ("train", "test"):
    if not os.path.exists(os.path.join(workdir, "features", f"{split}.npz")):
      raise AttributionError(f"feature file not found: {workdir}/features/{split}.npz (run "
                             "launch/features.py, or launch/pipeline.py, with this config)")
  feats_fp = ownership.require(workdir, "features",
                               lambda: ownership.features_fields(config, workdir))
  fields = {m: ownership.attribution_fields(config, workdir, m, feats_fp) for m in methods}
  results = {}
  for m in methods:
    if ownership.current(workdir, "attribution", fields[m], OUTPUTS, method=m):
      logging.info("attribution %s: up to date (fingerprint %s), skipped", m,
                   ownership.digest(fields[m]))
      results[m] = _read(os.path.join(workdir, "attribution", m))
  methods = [m for m in methods if m not in results]
  if not methods:
    _raise_nonconverged(results, cfg)
    return results
  feats = {split: load_features(workdir, split) for split in ("train", "test")}
  targets = select_targets(cfg.targets, len(feats["test"]["features"]), cfg.num_targets,
                           cfg.target_list, int(config.seed), feats["test"].get("ok"))
  train_ok = feats["train"].get("ok")
  for method in methods:
    check_inputs(feats["train"]["features"], feats["train"]["labels"], feats["test"]["features"],
                 feats["test"]["labels"], targets, "esvm" if method == "trak" else method, cfg.k,
                 cfg.same_class, feats["train"]["index"], train_ok)
  if train is None or test is None:
    train, test = stream.splits(config.data)  # streamed data: file lists, images read when shown
    # Where the stage loads the data, it checks its fields (the main job checks all at once).
    validate.check(config, train, test, stages=("attribution",))
  for split, ds in (("train", train), ("test", test)):
    _check_images(split, feats[split]["index"], ds)

  index, count = int(config.shard.index), int(config.shard.count)
  if count > 1:  # one shard of a job array: its chunks only, into its own directory
    if distributed.process_count() > 1:
      raise AttributionError("config.shard.count > 1 (a job array) needs single-process jobs; a "
                             "multi-process job spreads the chunks by itself: set shard.count=1")
    if "trak" in methods and index == 0:  # TRAK is not split: shard 0 computes it whole
      results["trak"] = _run_trak(config, workdir, train, test, targets, feats, fields["trak"])
    for method in [m for m in methods if m != "trak"]:
      topk(feats["train"]["features"], feats["train"]["labels"], feats["test"]["features"],
           feats["test"]["labels"], method=method, k=cfg.k, same_class=cfg.same_class,
           targets=targets, train_index=feats["train"]["index"],
           options=options, chunk_size=cfg.chunk_size, chunk_dir=shard_dir(
               workdir, method, index,
               count), allow_nonconverged=True, shard=(index, count), train_ok=train_ok)
    logging.info(
        "attribution: shard %d of %d done (%s); once every shard is done, launch/merge.py with "
        "the same config and workdir writes the result", index, count, ", ".join(methods))
    return {}
  processes = distributed.process_count()
  if "trak" in methods and count == 1:
    results["trak"] = _run_trak(config, workdir, train, test, targets, feats, fields["trak"])
    methods = [m for m in methods if m != "trak"]
  for method in methods:
    out_dir = os.path.join(workdir, "attribution", method)
    if distributed.is_main():
      ownership.clear(workdir, "attribution", method)
    distributed.barrier(f"attribution-{method}-cleared")

    def solve(shard=None, method=method, out_dir=out_dir):
      return topk(feats["train"]["features"], feats["train"]["labels"], feats["test"]["features"],
                  feats["test"]["labels"], method=method, k=cfg.k, same_class=cfg.same_class,
                  targets=targets, train_index=feats["train"]["index"],
                  options=options, chunk_size=cfg.chunk_size, chunk_dir=os.path.join(
                      out_dir, "chunks"), allow_nonconverged=True, shard=shard,
                  train_ok=train_ok)  # every file first; see below

    if processes > 1:  # each process its share of the chunks, then all assemble them
      solve((distributed.process_index(), processes))
      distributed.barrier(f"attribution-{method}-solved")
    res = solve()
    distributed.barrier(f"attribution-{method}-assembled")
    if distributed.is_main():
      _write(out_dir, res, feats["test"]["index"], method, config)
      _write_grid(os.path.join(out_dir, "grid.png"), res, method, train, test, config.viz)
      ownership.record(workdir, "attribution", fields[method], method=method)
    results[method] = res
  distributed.barrier("attribution-written")
  _raise_nonconverged(results, cfg)
  return results


def _run_trak(config, workdir, train, test, targets, feats, fields) -> TopK:
  """Method 'trak' whole: computed (`trak_topk`), written with its grid and record."""
  out_dir = os.path.join(workdir, "attribution", "trak")
  if distributed.is_main():
    ownership.clear(workdir, "attribution", "trak")
  res = trak_topk(config, workdir, train, test, targets)
  distributed.barrier("attribution-trak-solved")
  if res is None:
    res = read_trak_topk(workdir, train, targets)
  if distributed.is_main():
    _write(out_dir, res, feats["test"]["index"], "trak", config)
    _write_grid(os.path.join(out_dir, "grid.png"), res, "trak", train, test, config.viz)
    ownership.record(workdir, "attribution", fields, method="trak")
  return res


def trak_topk(config: ml_collections.ConfigDict, workdir: str, train: data_lib.Dataset,
              test: data_lib.Dataset, targets: np.ndarray) -> TopK | None:
  """Method 'trak': TRAK scores of the targets for every training image (`jaxattr.attribute.trak`,
  models and features kept in WORKDIR/trak/), their top attribution.k (same class or not), and
  the whole score matrix in WORKDIR/attribution/trak/scores_full.npy [targets, train]. Every
  process trains its part of the models; process 0 alone scores and writes (the others get
  None and read its files with `read_trak_topk` after the stage's barrier)."""
  from jaxattr.attribute import trak  # pylint: disable=g-import-not-at-top
  cfg = config.attribution
  if not isinstance(train.images, np.ndarray):
    raise AttributionError("attribution method 'trak' trains models on the images in memory: "
                           "streamed data (data.stream=True) is not supported; drop 'trak' from "
                           "attribution.methods")
  t0 = time.perf_counter()
  t = trak.Trak(config, workdir, train)
  t.variables()  # every process trains its part of the models
  if not distributed.is_main():  # process 0 featurises and scores (`read_trak_topk`)
    return None
  scores = t.scores(test.images[targets], test.labels[targets])
  pos, top = trak.topk_rows(scores, train.labels, test.labels[targets], int(cfg.k),
                            bool(cfg.same_class))
  out_dir = os.path.join(workdir, "attribution", "trak")
  os.makedirs(out_dir, exist_ok=True)
  utils.save_npy(os.path.join(out_dir, "scores_full.npy"), scores)
  utils.save_npy(os.path.join(out_dir, "topk_positions.npy"), pos)
  utils.save_npy(os.path.join(out_dir, "topk_scores.npy"), top)
  return TopK(indices=np.asarray(train.index)[pos].astype(np.int64), scores=top, targets=targets,
              stats={}, seconds=time.perf_counter() - t0, computed_targets=len(targets))


def read_trak_topk(workdir: str, train: data_lib.Dataset, targets: np.ndarray) -> TopK:
  """The TRAK top-k that process 0 wrote (`trak_topk`), for the other processes."""
  out_dir = os.path.join(workdir, "attribution", "trak")
  pos = np.load(os.path.join(out_dir, "topk_positions.npy"))
  return TopK(indices=np.asarray(train.index)[pos].astype(np.int64), scores=np.load(
      os.path.join(out_dir, "topk_scores.npy")), targets=targets, stats={})


def shard_dir(workdir: str, method: str, index: int, count: int) -> str:
  """Where shard `index` of a `count`-job array keeps its chunks of `method`."""
  return os.path.join(workdir, "attribution", method, f"shard-{index}-of-{count}")


def merge(config: ml_collections.ConfigDict, workdir: str) -> dict[str, TopK]:
  """Assembles the shards of a job array (`config.shard.count` jobs of launch/attribute.py, each
  with its `shard.index`) into WORKDIR/attribution/<method>/, as one run would have written it.

  Raises:
    AttributionError: shard.count is 1, a shard that has not run or not finished (naming it and
      the chunks it lacks), or shards computed with another config or data than each other or
      than this one; before anything is written.
  """
  cfg = config.attribution
  count = int(config.shard.count)
  if count < 2:
    raise AttributionError("launch/merge.py assembles a job array: set config.shard.count to the "
                           "number of shards that ran (it is 1)")
  methods = config_lib.names(cfg.methods)
  options = SolverOptions.from_config(cfg)
  feats_fp = ownership.require(workdir, "features",
                               lambda: ownership.features_fields(config, workdir))
  feats = {split: load_features(workdir, split) for split in ("train", "test")}
  targets = select_targets(cfg.targets, len(feats["test"]["features"]), cfg.num_targets,
                           cfg.target_list, int(config.seed), feats["test"].get("ok"))
  train_ok = feats["train"].get("ok")
  args = (feats["train"]["features"], feats["train"]["labels"], feats["test"]["features"],
          feats["test"]["labels"])
  if "trak" in methods:  # computed whole by shard 0 (`run`), not in chunks
    fields = ownership.attribution_fields(config, workdir, "trak", feats_fp)
    if not ownership.current(workdir, "attribution", fields, OUTPUTS, method="trak"):
      raise AttributionError(
          f"merge trak: shard 0 of {count} computes TRAK whole and has not finished it (no "
          f"current {workdir}/attribution/trak); run launch/attribute.py with "
          f"--config.shard.index=0 --config.shard.count={count}")
    methods = tuple(m for m in methods if m != "trak")
  plans = {}
  for method in methods:  # everything checked before anything is written
    dirs = [shard_dir(workdir, method, i, count) for i in range(count)]
    absent = [i for i, d in enumerate(dirs) if not os.path.exists(os.path.join(d, "resume.json"))]
    if absent:
      raise AttributionError(
          f"merge {method}: shards {absent} of {count} have not run (no {dirs[absent[0]]}); run "
          f"launch/attribute.py with --config.shard.index=i --config.shard.count={count} for each")
    keys = []
    for d in dirs:
      with open(os.path.join(d, "resume.json")) as f:
        keys.append(json.load(f))
    if len({k["hash"] for k in keys}) > 1:
      raise AttributionError(
          f"merge {method}: the shards were computed with different settings or data (hashes " +
          ", ".join(f"shard {i}: {k['hash']}" for i, k in enumerate(keys)) +
          "); rerun the odd ones with the same config")
    chunk_size = int(keys[0]["key"]["chunk_size"])
    expected = chunk_hash(*args, method=method, k=cfg.k, same_class=cfg.same_class, targets=targets,
                          train_index=feats["train"]["index"], options=options,
                          chunk_size=chunk_size, train_ok=train_ok)
    if keys[0]["hash"] != expected:
      raise AttributionError(
          f"merge {method}: the shards belong to another config or data than this one (their "
          f"hash {keys[0]['hash']}, this config's {expected}); merge with the config the shards "
          "ran with")
    plan = plan_chunks(feats["test"]["labels"], targets, cfg.same_class, chunk_size)
    lacking = [
        j for j in range(len(plan))
        if not os.path.exists(os.path.join(dirs[j % count], f"chunk_{j:06d}.npz"))
    ]
    if lacking:
      shards = sorted({j % count for j in lacking})
      raise AttributionError(
          f"merge {method}: shards {shards} of {count} are not finished ({len(lacking)} of "
          f"{len(plan)} chunks missing); rerun them (each resumes at its first missing chunk)")
    plans[method] = (dirs, chunk_size, len(plan))
  train, test = stream.splits(config.data)
  results = {}
  for method in methods:
    dirs, chunk_size, num_chunks = plans[method]
    out_dir = os.path.join(workdir, "attribution", method)
    ownership.clear(workdir, "attribution", method)
    assembled = os.path.join(out_dir, "chunks")
    shutil.rmtree(assembled, ignore_errors=True)
    os.makedirs(assembled)
    for j in range(num_chunks):
      name = f"chunk_{j:06d}.npz"
      shutil.copyfile(os.path.join(dirs[j % count], name), os.path.join(assembled, name))
    # One device: the shards' chunk size is kept as it is (no rounding to this job's devices).
    res = topk(*args, method=method, k=cfg.k, same_class=cfg.same_class, targets=targets,
               train_index=feats["train"]["index"], options=options, chunk_size=chunk_size,
               chunk_dir=assembled, allow_nonconverged=True, devices=jax.local_devices()[:1],
               train_ok=train_ok)
    _write(out_dir, res, feats["test"]["index"], method, config)
    _write_grid(os.path.join(out_dir, "grid.png"), res, method, train, test, config.viz)
    ownership.record(workdir, "attribution",
                     ownership.attribution_fields(config, workdir, method, feats_fp), method=method)
    for d in dirs:
      shutil.rmtree(d)
    results[method] = res
    logging.info("merge %s: %d shards, %d chunks assembled", method, count, num_chunks)
  _raise_nonconverged(results, cfg)
  return results


def _raise_nonconverged(results: dict[str, TopK], cfg: ml_collections.ConfigDict) -> None:
  bad = {m: r.nonconverged for m, r in results.items() if len(r.nonconverged)}
  if bad and not cfg.allow_nonconverged:
    raise RuntimeError(
        "ESVM did not converge for " + "; ".join(
            f"{m}: {len(v)} targets (test positions {v[:20].tolist()})" for m, v in bad.items()) +
        " (see attribution.json; raise attribution.max_iter or attribution.max_rows, or set "
        "attribution.allow_nonconverged=True)")


def _read(out_dir: str) -> TopK:
  """The TopK of a finished method's files (seconds and computed_targets 0: nothing solved)."""
  stats: dict[str, np.ndarray] = {}
  path = os.path.join(out_dir, "stats.npz")
  if os.path.exists(path):
    with np.load(path) as z:
      stats = {k: z[k] for k in z.files if k != "targets"}
  return TopK(indices=np.load(os.path.join(out_dir, "topk.npy")), scores=np.load(
      os.path.join(out_dir, "scores.npy")), targets=np.load(os.path.join(out_dir, "targets.npy")),
              stats=stats)


def _check_images(split: str, index: np.ndarray, ds: data_lib.Dataset) -> None:
  # The grids look images up by `index`: features of other data would show the wrong images.
  if len(index) != len(ds) or not np.array_equal(index, ds.index):
    raise AttributionError(
        f"WORKDIR/features/{split}.npz does not match the {len(ds)} {split} images of "
        f"config.data ({ds.source}): were the features extracted with another data config?")


def _write(out_dir: str, res: TopK, test_index: np.ndarray, method: str,
           config: ml_collections.ConfigDict) -> None:
  k = res.indices.shape[1]
  n_rows = int(max(len(test_index), int(test_index.max()) + 1))
  reference = np.zeros((n_rows, k), np.int64)
  reference[test_index[res.targets]] = res.indices
  utils.save_npy(os.path.join(out_dir, "topk.npy"), res.indices)
  utils.save_npy(os.path.join(out_dir, "scores.npy"), res.scores)
  utils.save_npy(os.path.join(out_dir, "targets.npy"), res.targets)
  utils.save_npy(os.path.join(out_dir, "target_index.npy"), test_index[res.targets])
  utils.save_npy(os.path.join(out_dir, "topk_reference.npy"), reference)
  summary: dict[str, Any] = {
      "method": method,
      "k": k,
      "num_targets": len(res.targets),
      "targets_computed": res.computed_targets,
      "solve_seconds": res.seconds,
      "targets_per_second": res.computed_targets / res.seconds if res.seconds else None,
      "config": config.attribution.to_dict(),
      "seed": int(config.seed),
      "provenance": utils.provenance(),
      "files": {
          "topk.npy": "int64 [targets, k] train index values, best first",
          "scores.npy": "float32 [targets, k]",
          "targets.npy": "int64 [targets] test positions",
          "target_index.npy": "int64 [targets] test index values",
          "topk_reference.npy": "int64 [n_test, k], reference layout, other rows zero",
          "grid.png": "the first viz.num_targets targets and their top viz.top images"
      },
  }
  if res.stats:
    utils.save_npz(os.path.join(out_dir, "stats.npz"), targets=res.targets, **res.stats)
    nc = res.nonconverged
    summary["solver"] = {
        "iterations_mean": float(res.stats["iterations"].mean()),
        "iterations_max": int(res.stats["iterations"].max()),
        "grad_norm_max": float(res.stats["grad_norm"].max()),
        "scaled_grad_norm_max": float(res.stats["scaled_grad_norm"].max()),
        "newton_step_max": float(res.stats["newton_step"].max()),
        "num_violators_max": int(res.stats["num_violators"].max()),
        "nonconverged_count": int(len(nc)),
        "nonconverged_targets": nc.tolist(),
    }
    if len(nc):
      logging.warning("%s: %d targets did not converge: %s", method, len(nc), nc[:20].tolist())
  utils.save_json(os.path.join(out_dir, "attribution.json"), summary)
  shutil.rmtree(os.path.join(out_dir, "chunks"), ignore_errors=True)
  logging.info("wrote %s (%d targets)", out_dir, len(res.targets))


def _write_grid(path: str, res: TopK, method: str, train: data_lib.Dataset, test: data_lib.Dataset,
                viz_config: ml_collections.ConfigDict) -> None:
  # The first viz.num_targets targets (left) and their top viz.top training images.
  n, top = min(viz_config.num_targets, len(res.targets)), viz_config.top
  train_pos = {int(i): p for p, i in enumerate(train.index)}
  viz.save_grid(path, [test.images[t] for t in res.targets[:n]],
                [[train.images[train_pos[int(i)]] for i in row[:top]] for row in res.indices[:n]],
                title=f"{method}: targets (left) and their top-{top} training images")

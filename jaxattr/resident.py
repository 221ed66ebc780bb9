"""The small resident copy of a streamed split: every image decoded once into uint8 [N, S, S, 3].

ImageNet at 64 px is 15.7 GB (1.28M x 64 x 64 x 3): one read, and it fits on an accelerator, as
CIFAR does, for the counterfactual trainer. `prepare` decodes a `stream.FileSplit` through grain
workers with `stream.ResizeCrop(S, S, draft=True)`: the shorter side resized to S (PIL bilinear,
antialiased) and the centre S x S kept, after libjpeg decoded the JPEG at the smallest of 1/2, 1/4
or 1/8 scale that still covers that size (a fraction of the pixels; the result differs from a full
decode by about 1 grey level on average, tests/test_imagenet_stream.py). The rows go to
`DIR/{split}_{S}.npy` in resumable chunks (`chunkstore.ChunkStore`, keyed by the data's
fingerprint and S), the labels, index, class names and `ok` flags to `DIR/{split}_{S}.npz`;
`load` memory-maps them back. Processes of a multi-host job may each fill their chunks
(`stream.shard_chunks`); the first one finishes the file.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np
from absl import logging

from jaxattr import chunkstore, data as data_lib, stream, utils
from jaxattr.folders import DataError

SIDES = (32, 64, 96, 128)


def paths(directory: str, split: str, side: int) -> tuple[str, str]:
  """(images .npy, labels .npz) of a split's resident copy."""
  return (os.path.join(directory, f"{split}_{side}.npy"),
          os.path.join(directory, f"{split}_{side}.npz"))


def prepare(split: stream.Split, directory: str, side: int, *, key: str, chunk_rows: int = 10000,
            batch_size: int = 256, workers: int = 0, threads: int = 4,
            skip_unreadable: bool = False, switch: str = "skip_unreadable=True") -> dict[str, Any]:
  """Decodes `split` into its resident copy under `directory` (resuming a killed run of `key`).

  Args:
    split: the streamed split.
    directory: where the copy goes.
    side: S, one of SIDES.
    key: what the copy belongs to (the data's fingerprint); a partial copy of another is redone.
    chunk_rows: rows per resumable chunk.
    batch_size: images per decode batch.
    workers, threads: decode processes (0: threads of this process) and threads per process.
    skip_unreadable: unreadable images become zeros with ok=False instead of stopping.
    switch: how the caller turns skip_unreadable on, named in the error.

  Returns:
    A summary: images, seconds, images/s, bytes, unreadable.

  Raises:
    ValueError: a side outside SIDES.
    DataError: an unreadable image (unless skip_unreadable), naming it.
  """
  if side not in SIDES:
    raise ValueError(f"resident side must be one of {SIDES}, got {side}")
  images_path, meta_path = paths(directory, split.split, side)
  store = chunkstore.ChunkStore(images_path, (len(split), side, side, 3), np.uint8, chunk_rows,
                                f"{key}:{split.split}:{side}")
  transform = stream.ResizeCrop(resize=side, crop=side, draft=True, skip_unreadable=skip_unreadable,
                                switch=switch)
  done = store.done()
  meter = utils.Throughput(f"prepare {split.split} at {side} px", len(split), "images")
  t0 = time.perf_counter()
  for j, start, stop in store.missing(meter):
    images, ok = [], []
    for b in stream.read_range(split, transform, batch_size, start, stop, workers=workers,
                               threads=threads):
      images.append(b["image"])
      ok.append(b["ok"])
      meter.update(len(b["image"]))
    store.write(j, np.concatenate(images), ok=np.concatenate(ok))
  meter.update(0, force=True)
  ok = store.extras("ok").astype(bool) if store.num_chunks else np.zeros((0,), bool)
  store.finish()
  utils.save_npz(meta_path, labels=split.labels, index=split.index,
                 class_names=np.asarray(split.class_names), ok=ok)
  seconds = time.perf_counter() - t0
  if (~ok).any():
    logging.warning("prepare %s: %d unreadable images stored as zeros", split.split, int(
        (~ok).sum()))
  return {
      "images":
          len(split),
      "side":
          side,
      "seconds":
          seconds,
      "images_per_s": (len(split) - sum(store.chunk(j)[1] - store.chunk(j)[0] for j in done)) /
                      max(seconds, 1e-9),
      "bytes":
          int(len(split)) * side * side * 3,
      "unreadable":
          int((~ok).sum())
  }


def load(directory: str, split: str, side: int) -> dict[str, Any]:
  """A prepared copy: {'images': uint8 [N, S, S, 3] memory-mapped, 'labels', 'index',
  'class_names', 'ok'}.

  Raises:
    FileNotFoundError: naming the missing file and the launcher that writes it.
  """
  images_path, meta_path = paths(directory, split, side)
  for p in (images_path, meta_path):
    if not os.path.exists(p):
      raise FileNotFoundError(f"resident copy not found: {p} (write it with launch/prepare.py)")
  with np.load(meta_path) as z:
    out = {k: z[k] for k in z.files}
  out["images"] = np.load(images_path, mmap_mode="r")
  out["class_names"] = [str(c) for c in out["class_names"]]
  return out


class ResidentMismatchError(ValueError):
  """A resident copy that does not belong to the config's data (side, classes or index)."""


def datasets(config: Any, workdir: str, train: Any, test: Any) -> tuple[Any, Any]:
  """The resident copies of both splits as in-memory `jaxattr.data.Dataset`s (pixels memory-
  mapped), for the counterfactual trainer on streamed data (configs/imagenet.py's support).

  Args:
    config: with `resident.side` and `data`.
    workdir: WORKDIR (the copy is WORKDIR/resident, written by the prepare stage).
    train, test: the streamed splits (`stream.splits(config.data)`) the copy must match.

  Raises:
    FileNotFoundError: the copy is missing (run the prepare stage).
    ResidentMismatchError: its side, class count, class names, labels or index differ from the
      config and the streamed splits (a copy of other data, or another side), naming which.
  """
  from jaxattr import data  # pylint: disable=g-import-not-at-top

  side = int(config.resident.side)
  directory = os.path.join(workdir, "resident")
  out = []
  for split in (train, test):
    copy = load(directory, split.split, side)
    what = f"resident copy {paths(directory, split.split, side)[0]}"
    fix = ("rerun the prepare stage (launch/prepare.py or launch/pipeline.py) with this config, "
           "which rewrites it")
    shape = tuple(copy["images"].shape)
    if shape[1:] != (side, side, 3):
      raise ResidentMismatchError(f"{what} holds {shape[1]} x {shape[2]} images, but "
                                  f"resident.side={side}; {fix}")
    if len(copy["class_names"]) != len(split.class_names):
      raise ResidentMismatchError(
          f"{what} has {len(copy['class_names'])} classes, the data {len(split.class_names)} "
          f"(data.source={config.data.source!r}); {fix}")
    if list(copy["class_names"]) != list(split.class_names):
      raise ResidentMismatchError(f"{what} names other classes than the data; {fix}")
    index, labels = np.asarray(copy["index"], np.int64), np.asarray(copy["labels"])
    if len(index) != len(split) or shape[0] != len(split) or not np.array_equal(
        index, np.asarray(split.index, np.int64)):
      raise ResidentMismatchError(
          f"{what} holds {shape[0]} images with another index than the {len(split)} of the "
          f"{split.split} split (limit_per_class or the tree changed?); {fix}")
    if not np.array_equal(labels, np.asarray(split.labels)):
      raise ResidentMismatchError(f"{what} has other labels than the {split.split} split; {fix}")
    ok = np.asarray(copy["ok"], bool) if "ok" in copy else None
    out.append(
        data.Dataset(images=copy["images"], labels=labels.astype(np.int32), index=index,
                     class_names=list(copy["class_names"]), source=f"resident:{directory}",
                     split=split.split, ok=None if ok is None or ok.all() else ok))
  return out[0], out[1]


def run(config: Any, workdir: str) -> dict[str, Any]:
  """`launch/prepare.py`: both splits of `config.data` (a 'folder:DIR' tree) into
  WORKDIR/resident/ at `config.resident.side`; skipped when WORKDIR/resident/fingerprint.json
  matches the data and the `resident` section, resumed after a kill otherwise."""
  from jaxattr import ownership  # pylint: disable=g-import-not-at-top

  source = config.data.source
  kind, path = data_lib.parse_source(source)
  if kind not in ("folder", "tfds") or (kind == "folder" and os.path.isfile(path)):
    raise DataError(
        f"prepare: data.source={source!r} is held in memory; the resident copy is decoded from a "
        "'folder:DIR' tree or a prepared 'tfds:NAME' only. In-memory sources (digits, npz, "
        "archives) need none: launch/support.py and the pipeline use them as they are")
  cfg = config.resident
  problems = [] if cfg.side in SIDES else [f"resident.side={cfg.side!r}: must be one of {SIDES}"]
  for name, lo in (("chunk_rows", 1), ("batch_size", 1), ("workers", 0), ("threads", 1)):
    v = cfg[name]
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
      problems.append(f"resident.{name}={v!r}: must be an int >= {lo}")
  if problems:
    from jaxattr import validate  # pylint: disable=g-import-not-at-top
    raise validate.ConfigError(problems)
  fields = {**ownership.data_fields(config), **{f"resident.{k}": cfg[k] for k in ("side",)}}
  directory = os.path.join(workdir, "resident")
  outputs = tuple(
      os.path.basename(p) for s in ("train", "test") for p in paths(directory, s, cfg.side))
  if ownership.current(workdir, "resident", fields, outputs):
    logging.info("prepare: up to date (fingerprint %s), skipped", ownership.digest(fields))
    with open(os.path.join(directory, "summary.json")) as f:
      return json.load(f)
  splits = dict(zip(("train", "test"), stream.splits(_streamed(config.data))))
  ownership.clear(workdir, "resident")
  key = ownership.digest(fields)
  summary = {
      s:
          prepare(fs, directory, cfg.side, key=key, chunk_rows=cfg.chunk_rows,
                  batch_size=cfg.batch_size, workers=cfg.workers, threads=cfg.threads,
                  skip_unreadable=cfg.skip_unreadable,
                  switch="--config.resident.skip_unreadable=True") for s, fs in splits.items()
  }
  summary["fingerprint"] = key
  utils.save_json(os.path.join(directory, "summary.json"), summary)
  ownership.record(workdir, "resident", fields)
  return summary


def _streamed(data_config: Any) -> Any:
  # The data section with stream on: preparing always reads the tree file by file.
  out = data_config.copy_and_resolve_references()
  with out.unlocked():
    out.stream = True
  return out

"""Feature extraction: jitted, batched, sharded over all local devices (batch axis on a Mesh).

The last batch is padded to the fixed batch size instead of recompiling. Output files
`WORKDIR/features/{train,test}.npz` hold `features` float32 [N, D], `labels` int32 [N],
`index` int64 [N] and `class_names`. The stage is skipped when WORKDIR/features/fingerprint.json
matches the config, the data and the encoder (`jaxattr.ownership`); the encoder of
WORKDIR/pretrain must come from this config's MoCo run.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxattr import (
    augment,
    checkpoint,
    chunkstore,
    data as data_lib,
    distributed,
    ownership,
    stream,
    utils,
    validate,
)
from jaxattr.models import get_encoder

# What a finished features stage leaves in WORKDIR/features (besides its ownership record).
OUTPUTS = ("train.npz", "test.npz", "summary.json")


def data_mesh() -> Mesh:
  """A 1-D mesh over this process's devices with axis 'data' (all devices of a single process;
  in a multi-process job each process extracts its own rows)."""
  return Mesh(np.asarray(jax.local_devices()), ("data",))


def make_batch_extractor(model: Any, variables: Any, mean, std, batch_size: int,
                         mesh: Mesh | None = None):
  """Returns (step, batch size): step(images uint8 [B <= batch, H, W, 3]) -> float32 features
  [batch, D] on the devices (not yet copied back; rows past B are padding).

  Variables are replicated; each batch is padded to the fixed size (one compiled shape) and
  split over the mesh's 'data' axis.
  """
  mesh = mesh or data_mesh()
  n_dev = mesh.devices.size
  batch_size = -(-batch_size // n_dev) * n_dev
  batch_sharding = NamedSharding(mesh, P("data"))
  variables = jax.device_put(variables, NamedSharding(mesh, P()))

  @jax.jit
  def fn(variables, images):
    x = augment.normalize(images, mean, std)
    return model.apply(variables, x, train=False)["feature"].astype(jnp.float32)

  def step(images: np.ndarray) -> jax.Array:
    real = len(images)
    if real < batch_size:
      images = np.concatenate([
          images, np.zeros((batch_size - real,) + images.shape[1:], images.dtype)
      ])
    return fn(variables, jax.device_put(images, batch_sharding))

  return step, batch_size


def make_extractor(model: Any, variables: Any, mean, std, batch_size: int,
                   mesh: Mesh | None = None):
  """Returns extract(images uint8 [N, H, W, 3]) -> float32 [N, D] numpy, plus the batch size."""
  step, batch_size = make_batch_extractor(model, variables, mean, std, batch_size, mesh)
  return functools.partial(extract_with, step, batch_size), batch_size


def extract_with(step, batch_size: int, images: np.ndarray, what: str = "features") -> np.ndarray:
  """Features float32 [N, D] of in-memory images [N, H, W, 3] through a `make_batch_extractor`
  step, with progress and images/s in the log."""
  meter = utils.Throughput(f"extract {what}", len(images), "images")
  out = []
  for feats, real in _overlapped(
      step, (images[s:s + batch_size] for s in range(0, len(images), batch_size))):
    out.append(feats[:real])
    meter.update(real)
  meter.update(0, force=True)
  return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _overlapped(step, batches):
  """(features numpy, real rows) per batch; the next batch is dispatched before the previous
  one is copied back, so the host's copy overlaps the devices' work."""
  pending = None
  for images in batches:
    feats = step(images)
    if pending is not None:
      yield np.asarray(pending[0]), pending[1]
    pending = (feats, len(images))
  if pending is not None:
    yield np.asarray(pending[0]), pending[1]


def preprocessing(config: ml_collections.ConfigDict, meta: dict[str,
                                                                Any]) -> tuple[int, int] | None:
  """(resize, crop) of the encoder's recorded input (`image_size`, as `launch/convert.py` writes
  it): torchvision's evaluation transform, shorter side to round(size * 256 / 224) then a centre
  crop of `size` (ImageNet ResNets: 256, 224). None: the encoder records none (jaxattr's own MoCo
  encoders take the data's size). A `data.options.size` the user sets that differs wins, with a
  logged warning."""
  size = meta.get("image_size")
  forced = config.data.options.get("size")
  if size is None:
    return None if forced is None else (forced, forced)
  size = int(size)
  if forced is not None and forced != size:
    logging.warning(
        "features: data.options.size=%d overrides the encoder's recorded input size %d (its "
        "features at another size are not the ones it was trained for)", forced, size)
    return forced, forced
  return int(round(size * 256 / 224)), size


def _shape_images(images: np.ndarray, resize: int, crop: int) -> np.ndarray:
  """In-memory images [N, H, W, 3] through `stream.ResizeCrop`'s resize and centre crop."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  if images.shape[1:3] == (crop, crop):
    return images
  shaper = stream.ResizeCrop(resize=max(resize, crop), crop=crop)
  return np.stack([shaper.shape(Image.fromarray(im)) for im in images])


def extract_stream(split: stream.Split, step, batch_size: int, path: str, *, resize: int, crop: int,
                   key: str, store_dtype: str = "float32", chunk_rows: int = 10000,
                   workers: int = 0, threads: int = 4, skip_unreadable: bool = False,
                   switch: str = "skip_unreadable=True",
                   feature_dim: int) -> tuple[np.ndarray, np.ndarray]:
  """Features of a streamed split written to `path` (.npy) chunk by chunk (`ChunkStore`).

  Decoding runs in grain workers (`stream.batches`) while the devices extract; a killed run
  resumes at its first unwritten chunk (when `key`, the shape and dtype match).

  Returns:
    (features [N, D] memory-mapped from `path`, ok bool [N]: False where skip_unreadable
    replaced an unreadable image by zeros).
  """
  processes, me = distributed.process_count(), distributed.process_index()
  shape = (len(split), feature_dim)
  if distributed.is_main():  # creates (or resumes) the store all processes fill
    store = chunkstore.ChunkStore(path, shape, store_dtype, chunk_rows, key)
  distributed.barrier(f"features-{split.split}-store")
  if not distributed.is_main():
    store = chunkstore.ChunkStore(path, shape, store_dtype, chunk_rows, key, create=False)
  meter = utils.Throughput(f"extract {split.split} (streamed)", len(split), "images")
  transform = stream.ResizeCrop(resize=resize, crop=crop, skip_unreadable=skip_unreadable,
                                switch=switch)
  for j, start, stop in store.missing(meter, shard=(me, processes)):
    parts = []
    loader = stream.read_range(split, transform, batch_size, start, stop, workers=workers,
                               threads=threads)
    batches = ((b["image"], b["ok"]) for b in loader)
    flags = []

    def images_of(batches=batches, flags=flags):
      for images, ok in batches:
        flags.append(ok)
        yield images

    for feats, real in _overlapped(step, images_of()):
      parts.append(feats[:real])
      meter.update(real)
    oks = np.concatenate(flags)
    rows = np.concatenate(parts)
    if not np.all(np.isfinite(rows)):
      raise FloatingPointError(f"non-finite features in rows {start}-{stop} of split {split.split}")
    store.write(j, rows, ok=oks)
  meter.update(0, force=True)
  distributed.barrier(f"features-{split.split}-written")
  ok = store.extras("ok").astype(bool) if store.num_chunks else np.zeros((0,), bool)
  if (~ok).any():
    logging.warning("features %s: %d unreadable images skipped (zero images; e.g. %s)", split.split,
                    int((~ok).sum()), [split.files[i] for i in np.flatnonzero(~ok)[:3]])
  distributed.barrier(f"features-{split.split}-read")  # before process 0 drops the markers
  if distributed.is_main():
    store.finish()
  distributed.barrier(f"features-{split.split}-finished")
  return np.load(path, mmap_mode="r"), ok


def load_encoder(config: ml_collections.ConfigDict, workdir: str) -> tuple[Any, Any, dict]:
  """(model, variables, meta) from `config.encoder.checkpoint` or WORKDIR/pretrain/encoder."""
  path = config.encoder.checkpoint or os.path.join(workdir, "pretrain", "encoder")
  variables, meta = checkpoint.load_variables(path)
  name = meta.get("encoder", config.encoder.name)
  kwargs = dict(meta.get("encoder_kwargs", {}))
  dtype = config.features.dtype
  if dtype != "float32":
    kwargs["dtype"] = jnp.dtype(dtype)
  model = get_encoder(name, **kwargs)
  return model, variables, meta


def run(config: ml_collections.ConfigDict, workdir: str, *, train: data_lib.Dataset | None = None,
        test: data_lib.Dataset | None = None) -> dict[str, Any]:
  """Extracts features of both splits of `config.data` into WORKDIR/features/.

  In memory: `{split}.npz` (features, labels, index, class_names). Streamed (`data.stream`):
  `{split}.npz` without the features, which go to `{split}.features.npy` (memory-mappable,
  `features.store_dtype`), written in resumable chunks; the npz adds `ok` (False: an unreadable
  image skipped). The encoder's recorded input size drives the images' resize and crop
  (`preprocessing`).

  Args:
    config: the experiment config (`data`, `encoder`, `features`).
    workdir: WORKDIR (the encoder is WORKDIR/pretrain/encoder unless encoder.checkpoint is set).
    train, test: the splits of `config.data` (loaded when None; unused when streamed).
  """
  fields = ownership.features_fields(config, workdir)  # the encoder must be this config's
  out_dir = os.path.join(workdir, "features")
  streamed = bool(config.data.get("stream", False))
  outputs = OUTPUTS + (("train.features.npy", "test.features.npy") if streamed else ())
  if ownership.current(workdir, "features", fields, outputs):
    logging.info("features: up to date (fingerprint %s), skipped", ownership.digest(fields))
    with open(os.path.join(out_dir, "summary.json")) as f:
      return json.load(f)
  main = distributed.is_main()
  if streamed:
    splits = dict(zip(("train", "test"), stream.splits(config.data)))
  elif train is None or test is None:
    train, test = data_lib.load_splits(config.data)
    # Where the stage loads the data, it checks its fields (the main job checks all at once).
    validate.check(config, train, test, stages=("features",))
  if main:
    ownership.clear(workdir, "features")
  distributed.barrier("features-cleared")
  model, variables, meta = load_encoder(config, workdir)
  mean = meta.get("mean", augment.IMAGENET_MEAN)
  std = meta.get("std", augment.IMAGENET_STD)
  shape = preprocessing(config, meta)
  step, batch = make_batch_extractor(model, variables, mean, std, config.features.batch_size)
  summary: dict[str, Any] = {
      "encoder": meta,
      "batch_size": batch,
      "devices": jax.device_count(),
      "processes": distributed.process_count(),
      "resize_crop": shape,
      "streamed": streamed
  }
  if streamed:
    if shape is None:
      raise data_lib.DataError(
          "features: streamed images need one size: set data.options.size, or use an encoder "
          "that records its input size (launch/convert.py writes image_size)")
    probe = np.zeros((1, shape[1], shape[1], 3), np.uint8)
    dim = int(np.asarray(step(probe)).shape[1])
    key = ownership.digest(fields)
    for split, fs in splits.items():
      t0 = time.perf_counter()
      _, ok = extract_stream(
          fs, step, batch, os.path.join(out_dir, f"{split}.features.npy"), resize=shape[0],
          crop=shape[1], key=f"{key}:{split}", store_dtype=config.features.store_dtype,
          chunk_rows=config.features.chunk_rows, workers=config.features.workers,
          threads=config.features.threads, skip_unreadable=config.features.skip_unreadable,
          switch="--config.features.skip_unreadable=True", feature_dim=dim)
      if main:
        utils.save_npz(os.path.join(out_dir, f"{split}.npz"), labels=fs.labels, index=fs.index,
                       class_names=np.asarray(fs.class_names), ok=ok)
      _summarize(summary, split, len(fs), dim, time.perf_counter() - t0, int((~ok).sum()))
  else:
    for split, ds in (("train", train), ("test", test)):
      t0 = time.perf_counter()
      feats = _extract_rows(step, batch, ds.images, shape, split, out_dir)
      if main:
        utils.save_npz(os.path.join(out_dir, f"{split}.npz"), features=feats, labels=ds.labels,
                       index=ds.index, class_names=np.asarray(ds.class_names))
      _summarize(summary, split, len(ds), int(feats.shape[1]), time.perf_counter() - t0)
  summary["fingerprint"] = ownership.digest(fields)
  if main:
    utils.save_json(os.path.join(out_dir, "summary.json"), summary)
    ownership.record(workdir, "features", fields)
  distributed.barrier("features-recorded")
  return summary


def _extract_rows(step, batch: int, images: np.ndarray, shape: tuple[int, int] | None, split: str,
                  out_dir: str) -> np.ndarray:
  """Features [N, D] of an in-memory split. In a job of n processes each extracts a contiguous
  1/n of the rows into `{split}.part<i>.npy`, and every process returns their concatenation."""
  processes, me = distributed.process_count(), distributed.process_index()
  bounds = np.linspace(0, len(images), processes + 1).round().astype(int)
  rows = images[bounds[me]:bounds[me + 1]]
  rows = rows if shape is None else _shape_images(rows, *shape)
  feats = extract_with(step, batch, rows, split)
  if not np.all(np.isfinite(feats)):
    raise FloatingPointError(f"non-finite features for split {split} (rows {bounds[me]}-"
                             f"{bounds[me + 1]})")
  if processes == 1:
    return feats
  parts = [os.path.join(out_dir, f"{split}.part{i}.npy") for i in range(processes)]
  utils.save_npy(parts[me], feats)
  distributed.barrier(f"features-{split}-parts")
  out = np.concatenate([np.load(p) for p in parts])
  distributed.barrier(f"features-{split}-parts-read")
  if distributed.is_main():
    for p in parts:
      os.remove(p)
  return out


def _summarize(summary: dict[str, Any], split: str, n: int, dim: int, seconds: float,
               skipped: int = 0) -> None:
  summary[split] = {
      "n": n,
      "dim": dim,
      "seconds": seconds,
      "images_per_s": n / max(seconds, 1e-9),
      "unreadable_skipped": skipped
  }
  logging.info("features %s: %d x %d in %.1fs (%.0f images/s, includes compile)", split, n, dim,
               seconds, n / max(seconds, 1e-9))

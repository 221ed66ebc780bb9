"""Feature extraction: jitted, batched, sharded over all local devices (batch axis on a Mesh).

The last batch is padded to the fixed batch size instead of recompiling. Output files
`WORKDIR/features/{train,test}.npz` hold `features` float32 [N, D], `labels` int32 [N],
`index` int64 [N] and `class_names`. The stage is skipped when WORKDIR/features/fingerprint.json
matches the config, the data and the encoder (`jaxattr.ownership`); the encoder of
WORKDIR/pretrain must come from this config's MoCo run.
"""

from __future__ import annotations

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

from jaxattr import augment, checkpoint, data as data_lib, ownership, utils, validate
from jaxattr.models import get_encoder

# What a finished features stage leaves in WORKDIR/features (besides its ownership record).
OUTPUTS = ("train.npz", "test.npz", "summary.json")


def data_mesh() -> Mesh:
  """A 1-D mesh over all devices with axis 'data'."""
  return Mesh(np.asarray(jax.devices()), ("data",))


def make_extractor(model: Any, variables: Any, mean, std, batch_size: int,
                   mesh: Mesh | None = None):
  """Returns extract(images uint8 [N, H, W, 3]) -> float32 [N, D] numpy, plus the batch size.

  Variables are replicated; each batch is split over the mesh's 'data' axis.
  """
  mesh = mesh or data_mesh()
  n_dev = mesh.devices.size
  batch_size = -(-batch_size // n_dev) * n_dev
  batch_sharding = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())
  variables = jax.device_put(variables, replicated)

  @jax.jit
  def fn(variables, images):
    x = augment.normalize(images, mean, std)
    return model.apply(variables, x, train=False)["feature"].astype(jnp.float32)

  def extract(images: np.ndarray, what: str = "features") -> np.ndarray:
    n = len(images)
    meter = utils.Throughput(f"extract {what}", n, "images")
    out = []
    pending = None
    for s in range(0, n, batch_size):
      chunk = images[s:s + batch_size]
      real = len(chunk)
      if real < batch_size:
        chunk = np.concatenate([
            chunk, np.zeros((batch_size - real,) + chunk.shape[1:], chunk.dtype)
        ])
      feats = fn(variables, jax.device_put(chunk, batch_sharding))
      # Copy the previous batch back while this one runs.
      if pending is not None:
        out.append(np.asarray(pending[0])[:pending[1]])
        meter.update(pending[1])
      pending = (feats, real)
    if pending is not None:
      out.append(np.asarray(pending[0])[:pending[1]])
      meter.update(pending[1], force=True)
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

  return extract, batch_size


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

  Args:
    config: the experiment config (`data`, `encoder`, `features`).
    workdir: WORKDIR (the encoder is WORKDIR/pretrain/encoder unless encoder.checkpoint is set).
    train, test: the splits of `config.data` (loaded when None).
  """
  fields = ownership.features_fields(config, workdir)  # the encoder must be this config's
  out_dir = os.path.join(workdir, "features")
  if ownership.current(workdir, "features", fields, OUTPUTS):
    logging.info("features: up to date (fingerprint %s), skipped", ownership.digest(fields))
    with open(os.path.join(out_dir, "summary.json")) as f:
      return json.load(f)
  if train is None or test is None:
    train, test = data_lib.load_splits(config.data)
    # Where the stage loads the data, it checks its fields (the main job checks all at once).
    validate.check(config, train, test, stages=("features",))
  ownership.clear(workdir, "features")
  model, variables, meta = load_encoder(config, workdir)
  mean = meta.get("mean", augment.IMAGENET_MEAN)
  std = meta.get("std", augment.IMAGENET_STD)
  extract, batch = make_extractor(model, variables, mean, std, config.features.batch_size)
  summary: dict[str, Any] = {"encoder": meta, "batch_size": batch, "devices": jax.device_count()}
  for split, ds in (("train", train), ("test", test)):
    t0 = time.perf_counter()
    feats = extract(ds.images, split)
    sec = time.perf_counter() - t0
    if not np.all(np.isfinite(feats)):
      raise FloatingPointError(f"non-finite features for split {split}")
    utils.save_npz(os.path.join(out_dir, f"{split}.npz"), features=feats, labels=ds.labels,
                   index=ds.index, class_names=np.asarray(ds.class_names))
    summary[split] = {
        "n": len(ds),
        "dim": int(feats.shape[1]),
        "seconds": sec,
        "images_per_s": len(ds) / max(sec, 1e-9)
    }
    logging.info("features %s: %d x %d in %.1fs (%.0f images/s, includes compile)", split, len(ds),
                 feats.shape[1], sec,
                 len(ds) / max(sec, 1e-9))
  summary["fingerprint"] = ownership.digest(fields)
  utils.save_json(os.path.join(out_dir, "summary.json"), summary)
  ownership.record(workdir, "features", fields)
  return summary

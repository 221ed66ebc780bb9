"""The pretrain stage: MoCo (`jaxattr.ssl`) on the training split, resumable, then the encoder.

Writes WORKDIR/pretrain/checkpoints/ (orbax, the whole MoCo state: a killed run resumes from the
last one and ends in the same state), WORKDIR/pretrain/encoder/ (the query backbone as a
variables checkpoint that the features stage loads) and WORKDIR/pretrain/summary.json (steps,
loss, kNN accuracy, images/s).

A workdir holds one MoCo run. WORKDIR/pretrain/fingerprint.json records everything the trained
state depends on (`jaxattr.ownership.pretrain_fields`: `seed`, the data and its content
fingerprint, `encoder`, `pretrain` less the fields that only say how often to log, checkpoint or
monitor and where to stop: `RUN_ONLY_FIELDS`); the exported encoder's meta.json and summary.json
carry its hash. A run resumes from the checkpoints only when its fingerprint equals the recorded
one. Otherwise it stops before any work with `RunMismatchError`, naming the fields that differ:
it never mixes two configurations in one run, and never deletes a run the user may still want;
the user picks a new --workdir or deletes WORKDIR/pretrain. A run that already reached its last
step and exported its encoder is up to date: a rerun returns its summary at once.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import flax
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import Mesh, PartitionSpec as P

from jaxattr import (
    augment,
    checkpoint,
    data as data_lib,
    distributed,
    ownership,
    ssl,
    utils,
    validate,
)

RUN_ONLY_FIELDS = ownership.RUN_ONLY_FIELDS


class RunMismatchError(ValueError):
  """WORKDIR/pretrain holds a run of another configuration or data (or of an unknown one)."""


def run_fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The flat {'seed': .., 'data.source': .., 'pretrain.base_lr': .., ...} a MoCo run depends on.

  `data.fingerprint` stands for the data's content; `RUN_ONLY_FIELDS` are left out
  (`jaxattr.ownership.pretrain_fields`).
  """
  return ownership.pretrain_fields(config)


def check_run(config: ml_collections.ConfigDict, workdir: str) -> tuple[str, dict[str, Any]]:
  """Stops unless WORKDIR/pretrain is empty or holds a run of this configuration and data.

  Args:
    config: the experiment config.
    workdir: WORKDIR.

  Returns:
    (the run's fingerprint hash, its fields).

  Raises:
    RunMismatchError: checkpoints or an encoder exist and fingerprint.json differs or is missing.
    jaxattr.data.DataError: the data source does not exist.
  """
  fields = run_fields(config)
  digest = utils.config_hash(fields)
  out_dir = os.path.join(workdir, "pretrain")
  ckpt_dir = os.path.join(out_dir, "checkpoints")
  have_run = (os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir)) or os.path.exists(
      os.path.join(out_dir, "encoder"))
  if not have_run:
    return digest, fields
  path = os.path.join(out_dir, "fingerprint.json")
  how = (f"To keep that run, use a new --workdir (or rerun with its configuration, recorded in "
         f"{path}); to discard it and start over, delete {out_dir}.")
  if not os.path.exists(path):
    raise RunMismatchError(
        f"{out_dir} holds a MoCo run without {os.path.basename(path)} (from an older jaxattr), so "
        f"it cannot tell whether that run used this configuration and data. {how}")
  with open(path) as f:
    old = json.load(f)
  if old.get("fingerprint") == digest:
    return digest, fields
  raise RunMismatchError(f"{out_dir} holds a MoCo run of another configuration or data: "
                         f"{ownership.describe(old.get('fields', {}), fields)}. Nothing was "
                         f"changed. {how}")


def export_encoder(state: ssl.MoCoState, config: ml_collections.ConfigDict, path: str,
                   extra_meta: dict[str, Any] | None = None) -> None:
  """Writes the query backbone as a variables checkpoint that feature extraction loads."""
  variables = distributed.host_copy({
      "params": state.params["backbone"],
      "batch_stats": state.batch_stats.get("backbone", {})
  })
  meta = {
      "encoder": config.encoder.name,
      "encoder_kwargs": ssl.encoder_kwargs(config),
      "mean": list(augment.IMAGENET_MEAN),
      "std": list(augment.IMAGENET_STD),
      "format": "jaxattr-moco",
      "step": int(state.step)
  }
  meta.update(extra_meta or {})
  checkpoint.save_variables(path, variables, meta, overwrite=True)


def run(config: ml_collections.ConfigDict, workdir: str, *, train: data_lib.Dataset | None = None,
        test: data_lib.Dataset | None = None) -> dict[str, Any]:
  """Pretrains MoCo on the training split; resumes from WORKDIR/pretrain/checkpoints.

  Args:
    config: the experiment config (`seed`, `data`, `encoder`, `pretrain`).
    workdir: WORKDIR.
    train, test: the splits of `config.data` (loaded when None); test is for the kNN monitor.

  Returns:
    The summary dict (steps, final loss, kNN accuracy, images/s).
  """
  p = config.pretrain
  if p.batch_size % config.encoder.num_splits:
    raise ValueError(f"pretrain.batch_size={p.batch_size} must be divisible by "
                     f"encoder.num_splits={config.encoder.num_splits}")
  digest, fields = check_run(config, workdir)  # before any work: cheap, reads no image
  if train is None or test is None:
    train, test = data_lib.load_splits(config.data)
    # Where the stage loads the data, it checks its fields (the main job checks all at once).
    validate.check(config, train, test, stages=("pretrain",))
  n = len(train)
  if n < p.batch_size:
    raise ValueError(f"pretrain.batch_size={p.batch_size} exceeds the {n} training images of "
                     f"{config.data.source}")
  spe = ssl.steps_per_epoch(n, p.batch_size)
  total = spe * p.epochs if p.max_steps < 0 else min(spe * p.epochs, p.max_steps)
  out_dir = os.path.join(workdir, "pretrain")
  done = _finished(out_dir, digest, total)
  if done is not None:
    logging.info("pretrain: up to date (fingerprint %s, step %d), skipped", digest, total)
    return done
  mesh = data_mesh(p.batch_size)
  os.makedirs(out_dir, exist_ok=True)
  if distributed.is_main():
    utils.save_json(os.path.join(out_dir, "fingerprint.json"), {
        "fingerprint": digest,
        "fields": fields
    })

  model = ssl.moco_model(config)
  k_init, k_train = jax.random.split(jax.random.key(config.seed))
  # Made on one device (the same on every process), then copied to every device of the mesh.
  state = ssl.init_state(config, k_init, train.images.shape[1:], n)
  shardings = ssl.state_shardings(state, config, mesh)
  state = jax.tree_util.tree_map(
      lambda x, sh: distributed.global_array(mesh, np.asarray(x), sh.spec), state, shardings)
  mngr = ocp.CheckpointManager(os.path.abspath(os.path.join(out_dir, "checkpoints")),
                               options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
  latest = mngr.latest_step()
  if latest is not None:
    restored = mngr.restore(latest, args=ocp.args.StandardRestore(
        flax.serialization.to_state_dict(state)))
    state = flax.serialization.from_state_dict(state, restored)
    logging.info("pretrain: resumed from step %d", latest)

  images = distributed.global_array(mesh, train.images, P())  # uint8, stays on every device
  k_train = distributed.global_array(mesh, np.asarray(jax.random.key_data(k_train)), P())
  step_fn = ssl.make_train_fn(config, model, n, mesh=mesh, state_sharding=shardings)
  embed = _embed_fn(model)
  meter = utils.Throughput("pretrain", total * p.batch_size, "images", every_s=1e9)
  knn_history = []
  loss = float("nan")
  start_step = int(state.step)
  t0 = time.perf_counter()
  for step in range(start_step, total):
    state, metrics = step_fn(state, images, k_train)
    done = step + 1
    meter.done = (done - start_step) * p.batch_size
    if done % p.log_every_steps == 0 or done == total:
      loss = float(metrics["loss"])
      lr = float(ssl.lr_schedule(config, n)(done - 1))
      logging.info("pretrain: step %d/%d epoch %.2f loss %.4f lr %.4f | %s", done, total,
                   done / spe, loss, lr, meter.message())
    if p.knn_every_epochs and done % (spe * p.knn_every_epochs) == 0 and done != total:
      variables = _variables(state)  # every process (a gather where statistics are sharded)
      if distributed.is_main():  # the others go on and wait for it in the next step
        acc = _knn(embed, variables, train, test, config)
        knn_history.append({"step": done, "knn_accuracy": acc})
        logging.info("pretrain: step %d kNN accuracy %.4f", done, acc)
    if done % p.checkpoint_every_steps == 0 or done == total:
      with distributed.overhead("checkpoints"):
        mngr.save(done, args=ocp.args.StandardSave(flax.serialization.to_state_dict(state)))
  with distributed.overhead("checkpoints"):
    mngr.wait_until_finished()
  seconds = time.perf_counter() - t0
  loss = float(metrics["loss"]) if total > start_step else loss
  mngr.close()
  summary_path = os.path.join(out_dir, "summary.json")
  variables = _variables(state)
  if not distributed.is_main():  # process 0 evaluates and writes; the others read its summary
    distributed.barrier("pretrain-exported")
    with open(summary_path) as f:
      return json.load(f)
  acc = _knn(embed, variables, train, test, config)
  logging.info("pretrain: done at step %d, kNN accuracy %.4f", int(state.step), acc)
  export_encoder(state.replace(params=variables[0], batch_stats=variables[1]), config,
                 os.path.join(out_dir, "encoder"), {
                     "knn_accuracy": acc,
                     "fingerprint": digest
                 })
  summary = {
      "steps": int(state.step),
      "epochs": int(state.step) / spe,
      "final_loss": loss,
      "knn_accuracy": acc,
      "knn_history": knn_history,
      "images_per_s": (int(state.step) - start_step) * p.batch_size / max(seconds, 1e-9),
      "seconds": seconds,
      "resumed_from": start_step,
      "fingerprint": digest,
      "config": config.to_dict(),
      "provenance": utils.provenance()
  }
  utils.save_json(summary_path, summary)
  distributed.barrier("pretrain-exported")
  return summary


def data_mesh(batch_size: int) -> Mesh:
  """The devices MoCo trains on, data parallel: all devices of all processes (axis 'data').

  On one process whose device count does not divide the batch, the largest count that does.

  Raises:
    ValueError: several processes whose devices together do not divide `pretrain.batch_size`.
  """
  devices = jax.devices()
  n = len(devices)
  if batch_size % n:
    if jax.process_count() > 1:
      raise ValueError(
          f"pretrain.batch_size={batch_size} does not divide over the job's {n} devices "
          f"({jax.process_count()} processes): every device trains on an equal shard of each "
          f"batch; choose a batch size that is a multiple of {n}")
    use = max(d for d in range(1, n + 1) if batch_size % d == 0)
    logging.warning(
        "pretrain: pretrain.batch_size=%d does not divide over %d devices; training on %d of "
        "them (a multiple of %d as batch size uses all)", batch_size, n, use, n)
    devices = devices[:use]
  logging.info(
      "pretrain: data parallel over %d device(s) of %d process(es), %d images per device "
      "per step", len(devices), jax.process_count(), batch_size // len(devices))
  return Mesh(np.asarray(devices), ("data",))


def _finished(out_dir: str, digest: str, total: int) -> dict[str, Any] | None:
  """summary.json of a run of this fingerprint that reached `total` steps and exported, or None."""
  paths = [os.path.join(out_dir, f) for f in ("summary.json", "encoder/meta.json")]
  if not all(os.path.exists(p) for p in paths):
    return None
  with open(paths[0]) as f:
    summary = json.load(f)
  with open(paths[1]) as f:
    meta = json.load(f)
  same = summary.get("fingerprint") == meta.get("fingerprint") == digest
  return summary if same and summary.get("steps") == meta.get("step") == total else None


def _embed_fn(model: ssl.MoCoNet):
  """jit of (params, batch_stats, uint8 images [B, H, W, 3]) -> backbone features [B, D]."""

  @jax.jit
  def fn(params, batch_stats, images):
    return model.backbone.apply(
        {
            "params": params["backbone"],
            "batch_stats": batch_stats["backbone"]
        }, augment.normalize(images), train=False)["feature"]

  return fn


def _features(fn, params, batch_stats, images: np.ndarray, batch: int = 512) -> np.ndarray:
  out = []
  for s in range(0, len(images), batch):
    chunk = images[s:s + batch]
    pad = batch - len(chunk)  # one shape for every call: no recompiles for the last batch
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
    out.append(np.asarray(fn(params, batch_stats, chunk))[:batch - pad])
  return np.concatenate(out)


def _variables(state: ssl.MoCoState) -> tuple[Any, Any]:
  """(params, batch_stats) of the query encoder as NumPy, on every process (a collective)."""
  return distributed.host_copy((state.params, state.batch_stats))


def _knn(fn, variables, train, test, config) -> float:
  # On this process's first device alone (the others may be busy with the next step).
  params, batch_stats = jax.device_put(variables, jax.local_devices()[0])
  return ssl.knn_accuracy(_features(fn, params, batch_stats, train.images), train.labels,
                          _features(fn, params, batch_stats,
                                    test.images), test.labels, train.num_classes,
                          k=config.pretrain.knn_k, temperature=config.pretrain.knn_temperature)

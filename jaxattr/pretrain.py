"""The pretrain stage: MoCo (`jaxattr.ssl`) on the training split, resumable, then the encoder.

Writes WORKDIR/pretrain/checkpoints/ (orbax, the whole MoCo state: a killed run resumes from the
last one and ends in the same state), WORKDIR/pretrain/encoder/ (the query backbone as a
variables checkpoint that the features stage loads) and WORKDIR/pretrain/summary.json (steps,
loss, kNN accuracy, images/s).

A workdir holds one MoCo run. WORKDIR/pretrain/fingerprint.json records everything the trained
state depends on (`seed`, the data's content fingerprint, `jaxattr.fingerprint.data_fingerprint`,
`encoder`, `pretrain` less the fields that only say how often to log, checkpoint or monitor and
where to stop: `RUN_ONLY_FIELDS`); the exported encoder's meta.json and summary.json carry its
hash. A run resumes
from the checkpoints only when its fingerprint equals the recorded one. Otherwise it stops before
any work with `RunMismatchError`, naming the fields that differ: it never mixes two configurations
in one run, and never deletes a run the user may still want; the user picks a new --workdir or
deletes WORKDIR/pretrain.
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

from jaxattr import augment, checkpoint, data as data_lib, fingerprint, ssl, utils

# pretrain fields that do not change the trained state: how often to log, checkpoint and run the
# kNN monitor (and its settings), and where to stop (a run stopped early and resumed equals an
# uninterrupted one). encoder.checkpoint names an encoder used INSTEAD of pretraining.
RUN_ONLY_FIELDS = ("pretrain.log_every_steps", "pretrain.checkpoint_every_steps",
                   "pretrain.knn_every_epochs", "pretrain.knn_k", "pretrain.knn_temperature",
                   "pretrain.max_steps", "encoder.checkpoint")


class RunMismatchError(ValueError):
  """WORKDIR/pretrain holds a run of another configuration or data (or of an unknown one)."""


def run_fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The flat {'seed': .., 'data.source': .., 'pretrain.base_lr': .., ...} a MoCo run depends on.

  `data.fingerprint` stands for the data's content; `RUN_ONLY_FIELDS` are left out.
  """
  fields: dict[str, Any] = {"seed": config.seed, "data.source": config.data.source}
  for k, v in sorted(dict(config.data.options).items()):
    if v is not None:  # None means "not given", as in data.load_splits
      fields[f"data.options.{k}"] = v
  fields["data.fingerprint"] = fingerprint.data_fingerprint(config.data)
  for section in ("encoder", "pretrain"):
    for k, v in sorted(config[section].to_dict().items()):
      fields[f"{section}.{k}"] = v
  for k in RUN_ONLY_FIELDS:
    fields.pop(k, None)
  # The JSON round trip makes fresh fields compare equal to the ones read back from the file.
  return json.loads(json.dumps(fields, sort_keys=True, default=str))


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
  old_fields = old.get("fields", {})
  diffs = []
  for k in sorted(set(old_fields) | set(fields)):
    a, b = old_fields.get(k, _ABSENT), fields.get(k, _ABSENT)
    if a == b:
      continue
    if k == "data.fingerprint":
      diffs.append("data: fingerprint changed (the data's files differ)")
    else:
      diffs.append(f"{k}: {_show(a)} -> {_show(b)}")
  raise RunMismatchError(f"{out_dir} holds a MoCo run of another configuration or data: " +
                         "; ".join(diffs or ["fingerprint format changed"]) +
                         f". Nothing was changed. {how}")


_ABSENT = object()


def _show(value: Any) -> str:
  return "(absent)" if value is _ABSENT else repr(value)


def export_encoder(state: ssl.MoCoState, config: ml_collections.ConfigDict, path: str,
                   extra_meta: dict[str, Any] | None = None) -> None:
  """Writes the query backbone as a variables checkpoint that feature extraction loads."""
  variables = {
      "params": state.params["backbone"],
      "batch_stats": state.batch_stats.get("backbone", {})
  }
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
  n = len(train)
  if n < p.batch_size:
    raise ValueError(f"pretrain.batch_size={p.batch_size} exceeds the {n} training images of "
                     f"{config.data.source}")
  spe = ssl.steps_per_epoch(n, p.batch_size)
  total = spe * p.epochs if p.max_steps < 0 else min(spe * p.epochs, p.max_steps)
  out_dir = os.path.join(workdir, "pretrain")
  os.makedirs(out_dir, exist_ok=True)
  utils.save_json(os.path.join(out_dir, "fingerprint.json"), {
      "fingerprint": digest,
      "fields": fields
  })

  model = ssl.moco_model(config)
  k_init, k_train = jax.random.split(jax.random.key(config.seed))
  state = ssl.init_state(config, k_init, train.images.shape[1:], n)
  mngr = ocp.CheckpointManager(os.path.abspath(os.path.join(out_dir, "checkpoints")),
                               options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
  latest = mngr.latest_step()
  if latest is not None:
    restored = mngr.restore(latest, args=ocp.args.StandardRestore(
        flax.serialization.to_state_dict(state)))
    state = flax.serialization.from_state_dict(state, restored)
    logging.info("pretrain: resumed from step %d", latest)

  images = jax.device_put(train.images)  # uint8, stays on device
  step_fn = ssl.make_train_fn(config, model, n)
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
      acc = _knn(embed, state, train, test, config)
      knn_history.append({"step": done, "knn_accuracy": acc})
      logging.info("pretrain: step %d kNN accuracy %.4f", done, acc)
    if done % p.checkpoint_every_steps == 0 or done == total:
      mngr.save(done, args=ocp.args.StandardSave(flax.serialization.to_state_dict(state)))
  mngr.wait_until_finished()
  seconds = time.perf_counter() - t0
  loss = float(metrics["loss"]) if total > start_step else loss
  acc = _knn(embed, state, train, test, config)
  logging.info("pretrain: done at step %d, kNN accuracy %.4f", int(state.step), acc)
  export_encoder(state, config, os.path.join(out_dir, "encoder"), {
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
  utils.save_json(os.path.join(out_dir, "summary.json"), summary)
  mngr.close()
  return summary


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


def _features(fn, state: ssl.MoCoState, images: np.ndarray, batch: int = 512) -> np.ndarray:
  out = []
  for s in range(0, len(images), batch):
    chunk = images[s:s + batch]
    pad = batch - len(chunk)  # one shape for every call: no recompiles for the last batch
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
    out.append(np.asarray(fn(state.params, state.batch_stats, chunk))[:batch - pad])
  return np.concatenate(out)


def _knn(fn, state, train, test, config) -> float:
  return ssl.knn_accuracy(_features(fn, state, train.images), train.labels,
                          _features(fn, state, test.images), test.labels, train.num_classes,
                          k=config.pretrain.knn_k, temperature=config.pretrain.knn_temperature)

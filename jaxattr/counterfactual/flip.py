"""Flip classes of the mislabel support (REFERENCE.md section 2), and the `launch/flip.py` stage.

The flip class of a target is the most likely WRONG class under an ensemble of models trained on
the full data: their softmax averaged, the top class unless it is the true label, then the
second.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from jaxattr import data, distributed, utils, validate
from jaxattr.counterfactual import ensemble


def flip_from_probs(probs: np.ndarray, true_labels: np.ndarray) -> np.ndarray:
  """Top class of probs [E, classes] unless it is the true label [E], then the second: int32 [E]."""
  order = np.argsort(-probs, axis=1, kind="stable")
  return np.where(order[:, 0] == true_labels, order[:, 1], order[:, 0]).astype(np.int32)


# A flip class that wins by less than this (in mean softmax) is logged as near-tied.
NEAR_TIE = 1e-4


def near_ties(probs: np.ndarray, true_labels: np.ndarray) -> np.ndarray:
  """Positions whose flip class beats the next non-true class by < NEAR_TIE in probs [E, C]."""
  rest = np.where(np.arange(probs.shape[1]) == np.asarray(true_labels)[:, None], -np.inf, probs)
  top2 = -np.sort(-rest, axis=1)[:, :2]
  return np.flatnonzero(top2[:, 0] - top2[:, 1] < NEAR_TIE)


def flip_classes(trainer: ensemble.Trainer, eval_images: np.ndarray, eval_labels: np.ndarray,
                 num_models: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """The flip class of each eval image, from `num_models` full-data models.

  Args:
    trainer: the counterfactual trainer of the training set.
    eval_images: uint8 [E, H, W, 3] (the targets).
    eval_labels: int [E], their true labels.
    num_models: ensemble size (reference: 10).
    seed: the first model's seed (models seed, seed + 1, ...).

  Returns:
    (mean softmax float32 [E, classes], flip class int32 [E]).
  """
  eval_labels = np.asarray(eval_labels)
  if eval_labels.shape != (len(eval_images),):
    raise ValueError(f"eval_labels must have shape [E={len(eval_images)}], got "
                     f"{eval_labels.shape}")
  seeds = seed + np.arange(num_models, dtype=np.int64)
  logits, _ = trainer.train_and_predict(eval_images, seeds)
  probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1)).mean(0)
  tied = near_ties(probs, eval_labels)
  if tied.size:
    # Models equal to the last bits (another device layout, CPU or jax version) may pick the
    # other class for these, and their mislabel searches then relabel to it.
    logging.warning(
        "flip classes of %d of %d targets (eval positions %s) beat the next class by < %g in "
        "mean softmax: a run on other hardware may pick the other; more flip models "
        "(support.flip_models in the pipeline, num_models in launch/flip.py) may separate them",
        tied.size, len(probs), tied[:10].tolist(), NEAR_TIE)
  return probs.astype(np.float32), flip_from_probs(probs, eval_labels)


def run(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Trains config.num_models full-data models (config.ensemble) and writes to workdir.

  mode 'flip' writes `flip_classes.npz` (mean_softmax [E, C], flip_class [E], labels [E], index
  [E] of the test split) and `flip_metrics.json`; mode 'train' writes `ensemble_logits.npz`
  (logits [M, E, C], labels, index) and each model's test accuracy to `ensemble_metrics.json`.
  Model seeds are config.seed, config.seed + 1, ...

  Returns:
    The path of the .npz written.
  """
  if config.mode not in ("flip", "train"):
    raise ValueError(f"config.mode must be 'flip' or 'train', got {config.mode!r}")
  if int(config.num_models) < 1:
    raise ValueError(f"config.num_models must be at least 1, got {config.num_models}")
  train, test = data.load_splits(config.data)
  validate.check(config, train, test, stages=("flip",))
  os.makedirs(workdir, exist_ok=True)
  t0 = time.perf_counter()
  trainer = ensemble.Trainer(config.ensemble, train)
  m, seed = int(config.num_models), int(config.seed)
  meta = {"config": config.to_dict(), "provenance": utils.provenance()}
  if config.mode == "flip":
    probs, flips = flip_classes(trainer, test.images, test.labels, m, seed)
    path = os.path.join(workdir, "flip_classes.npz")
    acc = float((probs.argmax(1) == test.labels).mean())
    if distributed.is_main():  # several processes: all hold the result, process 0 writes it
      utils.save_npz(path, mean_softmax=probs, flip_class=flips, labels=test.labels,
                     index=test.index)
      utils.save_json(os.path.join(workdir, "flip_metrics.json"), {
          "ensemble_accuracy": acc,
          "seconds": time.perf_counter() - t0,
          **meta
      })
      logging.info("ensemble accuracy %.4f; wrote %s", acc, path)
    distributed.barrier("flip-written")
    return path
  logits, _ = trainer.train_and_predict(test.images, seed + np.arange(m, dtype=np.int64))
  path = os.path.join(workdir, "ensemble_logits.npz")
  accs = (logits.argmax(-1) == test.labels[None]).mean(1)
  if distributed.is_main():
    utils.save_npz(path, logits=logits, labels=test.labels, index=test.index)
    utils.save_json(os.path.join(workdir, "ensemble_metrics.json"), {
        "test_accuracy": accs.tolist(),
        "seconds": time.perf_counter() - t0,
        **meta
    })
    logging.info("test accuracy per model %s; wrote %s", np.round(accs, 4).tolist(), path)
  distributed.barrier("flip-written")
  return path

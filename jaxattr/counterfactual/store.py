"""Kept ensembles: the final parameters of every model a `Trainer` trains, on disk, resumable.

An `EnsembleStore` is one directory per ensemble (a trainer config, a training set and the seeds
of its full-data models)::

  DIR/ensemble.json      what the models belong to (`key`: config, data and seeds) and M
  DIR/wave_00000/        orbax variables of models [0, wave) with a leading model axis, plus
  DIR/wave_00001/ ...    meta.json (the wave's seeds and the key), written atomically
                         (`jaxattr.checkpoint.save_variables`)

`train()` trains only the waves that are missing (a killed run resumes at its first unwritten
wave; each model depends only on its seed, so the result is the same as one uninterrupted run)
and returns every model's variables. A directory of another key is emptied first: models of
another config or data are never reused.

`evaluate(trainer, variables, images, fn)` applies any function of the models' outputs (logits,
TRAK margins) over any image set; per-example gradients are `jaxattr.attribute.trak`'s.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxattr import checkpoint, fingerprint as fingerprint_lib, utils
from jaxattr.counterfactual import ensemble


class EnsembleStore:
  """The kept full-data models of `seeds` trained by `trainer` in `directory`."""

  def __init__(self, directory: str, trainer: ensemble.Trainer, seeds: Any):
    self.directory = directory
    self.trainer = trainer
    self.seeds = np.asarray(seeds, np.int64)
    train = trainer.train
    self.key = utils.config_hash({
        "ensemble": trainer.config.to_dict(),
        "train": fingerprint_lib.arrays_fingerprint(train.index, train.labels, train.images),
        "seeds": self.seeds.tolist(),
    })
    self.wave = ensemble.wave_size(trainer.config, len(self.seeds), trainer.num_groups)
    self.num_waves = -(-len(self.seeds) // self.wave)

  def _wave_dir(self, w: int) -> str:
    return os.path.join(self.directory, f"wave_{w:05d}")

  def _open(self) -> None:
    """Empties a directory that holds another ensemble; records this one's key."""
    path = os.path.join(self.directory, "ensemble.json")
    if os.path.exists(path):
      try:
        with open(path) as f:
          if json.load(f).get("key") == self.key:
            return
      except (OSError, ValueError):
        pass
      logging.info("%s: models of another config, data or seeds; training anew", self.directory)
      shutil.rmtree(self.directory)
    os.makedirs(self.directory, exist_ok=True)
    utils.save_json(path, {
        "key": self.key,
        "models": len(self.seeds),
        "seeds": self.seeds.tolist(),
        "wave": self.wave
    })

  def done(self) -> list[int]:
    """The waves on disk that belong to this ensemble."""
    out = []
    for w in range(self.num_waves):
      d = self._wave_dir(w)
      if checkpoint.is_checkpoint(d):
        with open(os.path.join(d, checkpoint.META)) as f:
          if json.load(f).get("key") == self.key:
            out.append(w)
    return out

  def train(self) -> Any:
    """Trains the missing waves; returns every model's variables (numpy, leading axis M)."""
    if jax.process_index() == 0:
      self._open()
    from jaxattr import distributed  # pylint: disable=g-import-not-at-top
    distributed.barrier("ensemble-store-open")
    done = set(self.done())
    one = self.trainer.train.images[:1]
    parts = []
    for w in range(self.num_waves):
      seeds = self.seeds[w * self.wave:(w + 1) * self.wave]
      if w in done:
        variables, _ = checkpoint.load_variables(self._wave_dir(w))
        logging.info("%s: wave %d/%d (models %d-%d) loaded", self.directory, w + 1, self.num_waves,
                     seeds[0], seeds[-1])
      else:
        _, stats, variables = self.trainer.train_and_predict(one, seeds, return_params=True)
        if jax.process_index() == 0:
          checkpoint.save_variables(self._wave_dir(w), variables, {
              "key": self.key,
              "seeds": seeds.tolist(),
              "seconds": stats.total_seconds
          }, overwrite=True)
        distributed.barrier(f"ensemble-store-wave-{w}")
        logging.info("%s: wave %d/%d trained and kept (%d models, %.1fs)", self.directory, w + 1,
                     self.num_waves, len(seeds), stats.total_seconds)
      parts.append(variables)
    return jax.tree_util.tree_map(lambda *a: np.concatenate(a), *parts)


@functools.lru_cache(maxsize=8)
def _evaluator(trainer: ensemble.Trainer, fn: Callable, batch_size: int) -> Callable:

  def one_model(variables, images, labels):

    def batch(args):
      x, y = args
      x = ensemble.eval_normalize(trainer.config, x)
      logits = trainer.model.apply(variables, x, train=False)["logits"].astype(jnp.float32)
      return fn(logits, y)

    shape = images.shape
    xs = images.reshape((-1, batch_size) + shape[1:])
    ys = labels.reshape(-1, batch_size)
    out = jax.lax.map(batch, (xs, ys))
    return out.reshape((shape[0],) + out.shape[2:])

  return jax.jit(jax.vmap(one_model, in_axes=(0, None, None)))


def evaluate(trainer: ensemble.Trainer, variables: Any, images: np.ndarray, labels: np.ndarray,
             fn: Callable[[jax.Array, jax.Array], jax.Array], batch_size: int = 250) -> np.ndarray:
  """fn(logits [B, C] float32, labels [B]) -> [B, ...] of every model of `variables` (leading
  axis M) on uint8 images [E, H, W, 3] in eval mode -> numpy [M, E, ...]."""
  e = len(images)
  b = min(batch_size, max(e, 1))
  pad = -e % b
  x = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
  y = np.concatenate([np.asarray(labels, np.int32), np.zeros(pad, np.int32)])
  return np.asarray(_evaluator(trainer, fn, b)(variables, x, y))[:, :e]

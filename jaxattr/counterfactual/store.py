"""Kept ensembles: the final parameters of every model a `Trainer` trains, on disk, resumable.

An `EnsembleStore` is one directory per ensemble recipe (a trainer config and a training set)::

  DIR/ensemble.json        what the models belong to (`key`: the config and the data)
  DIR/models_<hash>/       orbax variables of one wave of full-data models, a leading model
                           axis, plus meta.json (the key and the wave's seeds), written atomically
                           (`jaxattr.checkpoint.save_variables`)

`train()` returns the variables of the store's seeds, training only the seeds that no kept wave
holds (a killed run resumes at its first unwritten wave). A model depends only on its seed, so
ensembles of one recipe share models: TRAK-5 after TRAK-100 with the same seeds trains nothing,
TRAK-10 after TRAK-5 trains 5. A directory of another key is emptied first: models of another
config or data are never reused.

`evaluate(trainer, variables, images, fn)` applies any function of the models' outputs (logits,
TRAK margins) over any image set; per-example gradients are `jaxattr.attribute.trak`'s.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxattr import checkpoint, distributed, fingerprint as fingerprint_lib, utils
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
    })

  def _open(self) -> None:
    """Empties a directory that holds another recipe's models; records this one's key."""
    path = os.path.join(self.directory, "ensemble.json")
    if os.path.exists(path):
      try:
        with open(path) as f:
          if json.load(f).get("key") == self.key:
            return
      except (OSError, ValueError):
        pass
      logging.info("%s: models of another config or data; training anew", self.directory)
      shutil.rmtree(self.directory)
    os.makedirs(self.directory, exist_ok=True)
    utils.save_json(path, {"key": self.key})

  def kept(self) -> dict[int, tuple[str, int]]:
    """{seed: (checkpoint directory, row)} of every kept model of this recipe."""
    out: dict[int, tuple[str, int]] = {}
    if not os.path.isdir(self.directory):
      return out
    for name in sorted(os.listdir(self.directory)):
      d = os.path.join(self.directory, name)
      if not name.startswith("models_") or not checkpoint.is_checkpoint(d):
        continue
      try:
        with open(os.path.join(d, checkpoint.META)) as f:
          meta = json.load(f)
      except (OSError, ValueError):
        continue
      if meta.get("key") == self.key:
        for row, seed in enumerate(meta["seeds"]):
          out.setdefault(int(seed), (d, row))
    return out

  def missing(self) -> list[int]:
    """The store's seeds that no kept wave holds."""
    kept = self.kept()
    return [int(s) for s in self.seeds if int(s) not in kept]

  def train(self) -> Any:
    """Trains the missing seeds in waves; returns every seed's variables (numpy, leading axis
    M, in `seeds` order)."""
    if distributed.is_main():
      self._open()
    distributed.barrier("ensemble-store-open")
    missing = np.asarray(self.missing(), np.int64)
    if len(missing):
      wave = ensemble.wave_size(self.trainer.config, len(missing), self.trainer.num_groups)
      one = self.trainer.train.images[:1]
      for w, start in enumerate(range(0, len(missing), wave)):
        seeds = missing[start:start + wave]
        _, stats, variables = self.trainer.train_and_predict(one, seeds, return_params=True)
        name = "models_" + hashlib.sha256(json.dumps(seeds.tolist()).encode()).hexdigest()[:12]
        if distributed.is_main():
          checkpoint.save_variables(os.path.join(self.directory, name), variables, {
              "key": self.key,
              "seeds": seeds.tolist(),
              "seconds": stats.total_seconds
          }, overwrite=True)
        distributed.barrier(f"ensemble-store-{name}")
        logging.info("%s: wave %d/%d trained and kept (%d models, %.1fs)", self.directory, w + 1,
                     -(-len(missing) // wave), len(seeds), stats.total_seconds)
    kept = self.kept()
    loaded: dict[str, Any] = {}
    rows = []
    for seed in self.seeds:
      d, row = kept[int(seed)]
      if d not in loaded:
        loaded[d] = checkpoint.load_variables(d)[0]
      rows.append(jax.tree_util.tree_map(lambda a, row=row: a[row], loaded[d]))
    logging.info("%s: %d models (%d trained now, %d read back)", self.directory, len(self.seeds),
                 len(missing),
                 len(self.seeds) - len(missing))
    return jax.tree_util.tree_map(lambda *a: np.stack(a), *rows)


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

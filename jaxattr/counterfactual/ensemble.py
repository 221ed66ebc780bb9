"""Many counterfactual models trained at once: the reference recipe with a leading model axis.

Each model m is given a seed, a keep-mask over the training set and its own training labels
(REFERENCE.md sections 2-3). Per model, training is exactly one reference run:

* every epoch draws a fresh permutation of the model's KEPT images and cuts it into batches of
  `batch_size` with drop_last, so a model with fewer images takes fewer steps per epoch;
* the learning rate is a per-iteration triangle (0 -> peak at `peak_epoch` -> 0 at `epochs`) whose
  iterations-per-epoch come from the FULL training set, as the reference computes it, and whose
  position is the model's own optimizer-step count;
* SGD with momentum (torch semantics, no Nesterov), weight decay on all parameters, cross-entropy
  with label smoothing, on-device augmentation (flip, translate with zero padding, Cutout filled
  with the mean) and normalisation on the 0..255 scale.

Models of one wave run in lock step for `max(steps)` steps per epoch; a model whose epoch is over
skips the remaining steps (its state is left untouched), so its result equals a run on its own.
All randomness of model m comes from `jax.random.key(seeds[m])`, never from its wave neighbours.

The model axis is sharded over all devices (`jax.sharding.Mesh` axis 'models', `jax.shard_map`);
inside a device the local models are either vmapped or run one after another with `lax.map`
(`config.formulation`). Every process passes the same host arrays and builds its own shards
(`jax.make_array_from_callback`), so the same code runs multi-host.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import time
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxattr import utils

# Normalisation of the reference, on the 0..255 scale.
CIFAR_MEAN = (125.307, 122.961, 113.8575)
CIFAR_STD = (51.5865, 50.847, 51.255)

_DEFAULTS: dict[str, Any] = {
    "model": "resnet9",  # 'resnet9' | 'mobilenetv2'
    "width": 1.0,  # channel multiplier of the model (1.0 = the reference)
    "epochs": 24,  # training epochs
    "batch_size": 512,  # images per step per model (drop_last)
    "peak_lr": 0.5,  # learning rate at the peak, per batch of `batch_size` (mean loss)
    "peak_epoch": 5.0,  # epoch at which the triangular schedule peaks
    # Size of the FULL training set that sets iterations-per-epoch of the schedule (0 = the
    # dataset given); the reference uses 50,000 // 512 = 97 even when images are removed.
    "schedule_examples": 0,
    "momentum": 0.9,  # SGD momentum (torch semantics, no Nesterov)
    "weight_decay": 5e-4,  # L2 added to the gradient of every parameter
    "label_smoothing": 0.1,
    "compute_dtype": "auto",  # 'auto' (bf16 on GPU/TPU, float32 on CPU) | 'float32' | 'bfloat16'
    "translate": 2,  # random translation in pixels (zero padding)
    "cutout": 8,  # Cutout square side in pixels (filled with the mean); 0 = off
    "flip": True,  # random horizontal flip
    # Models trained at once (rounded up to a multiple of the device count); 0 = all M at once.
    "models_per_wave": 64,
    # 'map': a device's models one after another inside one program (bit-exact independent of
    # the wave); 'vmap': a device's models batched (grouped convolutions); 'auto': the measured
    # winner of the backend (`FORMULATION_BY_BACKEND`).
    "formulation": "auto",
    # ResNet-9's XLA:CPU-friendly formulation (same parameters and values): the stride-2
    # conv's gradient through a space-to-depth conv.
    # 'auto' = on for the CPU backend only | 'on' | 'off'.
    "cpu_ops": "auto",
    "eval_batch_size": 500,  # images per model per evaluation step
    "seed": 0,  # root seed of launchers (train_and_predict takes per-model seeds)
    "log_every_s": 30.0,  # progress logging interval in seconds
}


# The default formulation per backend. CPU (2 cores, width 0.25, 4 models, jaxattr.xla_flags
# set): 'map' 1.64 s per model-epoch of 4 steps vs 'vmap' 3.42 (2.1x; 3-5.6x with XLA's default
# flags), vmap's batched convolutions being grouped convolutions that XLA:CPU runs slowly.
# GPU/TPU: not measured yet ('map' assumed: each model's step keeps XLA's ungrouped
# convolution kernels); `launch/benchmark_train.py --mode=gpu --formulations=vmap,map` decides.
FORMULATION_BY_BACKEND = {"cpu": "map", "gpu": "map", "cuda": "map", "rocm": "map",
                          "tpu": "map"}


def resolve_formulation(config) -> str:
  """config.formulation with 'auto' replaced by the backend's default ('map' or 'vmap')."""
  form = config.formulation
  if form == "auto":
    form = FORMULATION_BY_BACKEND.get(jax.default_backend(), "map")
  if form not in ("vmap", "map"):
    raise ValueError(f"config.formulation must be 'auto', 'vmap' or 'map', got {form!r}")
  return form


class _AttrDict(dict):
  """Attribute access to a dict: the config when ml_collections is unavailable (benchmarks)."""

  __getattr__ = dict.__getitem__

  def __setattr__(self, name, value):
    self[name] = value


def default_config():
  """The trainer's config section (an ml_collections.ConfigDict; see `_DEFAULTS` for units)."""
  try:
    import ml_collections  # pylint: disable=g-import-not-at-top
  except ImportError:  # the benchmark machine may lack it
    return _AttrDict(_DEFAULTS)
  return ml_collections.ConfigDict(dict(_DEFAULTS))


# --------------------------------------------------------------------------------------------
# Pure pieces: schedule, batch sampler, augmentation.


def iterations_per_epoch(config, num_train: int) -> int:
  """Iterations per epoch of the schedule: FULL-data images // batch size (drop_last)."""
  full = int(config.schedule_examples) or num_train
  return max(1, full // int(config.batch_size))


def learning_rate(step: jax.Array | np.ndarray | int, config, num_train: int) -> jax.Array:
  """The triangular lr at optimizer step `step` (0-based; step 0 uses lr 0, as torch's LambdaLR).

  np.interp(step, [0, peak_epoch * ipe, epochs * ipe], [0, peak_lr, 0]) with ipe from
  `iterations_per_epoch`; 0 beyond the end.
  """
  ipe = iterations_per_epoch(config, num_train)
  xp = jnp.asarray([0.0, float(config.peak_epoch) * ipe, float(config.epochs) * ipe])
  fp = jnp.asarray([0.0, float(config.peak_lr), 0.0])
  return jnp.interp(jnp.asarray(step, jnp.float32), xp, fp)


def epoch_batches(key: jax.Array, keep: jax.Array, batch_size: int,
                  num_steps: int) -> tuple[jax.Array, jax.Array]:
  """One epoch's batches of one model: a uniform permutation of its kept images, drop_last.

  Args:
    key: the model's key for this epoch.
    keep: bool [N], the images this model may see.
    batch_size: images per batch.
    num_steps: static number of rows to return (>= this model's steps; <= N // batch_size).

  Returns:
    (indices int32 [num_steps, batch_size], valid bool [num_steps]). Row s is the s-th batch of
    the permutation when `valid[s]`; rows past `sum(keep) // batch_size` are filler that must be
    skipped (they may hold removed images).
  """
  n = keep.shape[0]
  if num_steps * batch_size > n:
    raise ValueError(f"num_steps {num_steps} x batch_size {batch_size} exceeds N = {n}")
  perm = jax.random.permutation(key, n)
  # A stable sort on "removed" moves the kept images to the front, keeping their random order.
  order = jnp.argsort(jnp.logical_not(keep[perm]), stable=True)
  idx = perm[order][: num_steps * batch_size].reshape(num_steps, batch_size).astype(jnp.int32)
  valid = jnp.arange(num_steps) < jnp.sum(keep) // batch_size
  return idx, valid


def normalize(images: jax.Array) -> jax.Array:
  """float images on the 0..255 scale [..., 3] -> normalised with the reference mean/std."""
  return (images - jnp.asarray(CIFAR_MEAN)) / jnp.asarray(CIFAR_STD)


def augment(key: jax.Array, images: jax.Array, flip: bool = True, translate: int = 2,
            cutout: int = 8) -> jax.Array:
  """The reference's training augmentation, then normalisation, on one batch.

  Args:
    key: PRNG key for this batch.
    images: uint8 [B, H, W, 3].
    flip: random horizontal flip with probability 1/2.
    translate: shift by an integer in [-translate, translate] per axis, zero padding.
    cutout: side of a square placed uniformly inside the image and filled with the mean.

  Returns:
    float32 [B, H, W, 3], normalised.
  """
  b, h, w, _ = images.shape
  kf, kt, kc = jax.random.split(key, 3)
  x = images.astype(jnp.float32)
  if flip:
    do = jax.random.bernoulli(kf, 0.5, (b,))
    x = jnp.where(do[:, None, None, None], x[:, :, ::-1], x)
  if translate:
    t = translate
    xp = jnp.pad(x, ((0, 0), (t, t), (t, t), (0, 0)))
    off = jax.random.randint(kt, (b, 2), 0, 2 * t + 1)
    x = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, 3)))(xp, off)
  if cutout:
    c = cutout
    ky, kx = jax.random.split(kc)
    y0 = jax.random.randint(ky, (b, 1), 0, h - c + 1)
    x0 = jax.random.randint(kx, (b, 1), 0, w - c + 1)
    rows = jnp.arange(h)[None]
    cols = jnp.arange(w)[None]
    inside = (((rows >= y0) & (rows < y0 + c))[:, :, None]
              & ((cols >= x0) & (cols < x0 + c))[:, None, :])
    x = jnp.where(inside[..., None], jnp.asarray(CIFAR_MEAN), x)
  return normalize(x)


# --------------------------------------------------------------------------------------------
# The single-model training step and epoch, lifted over the model axis.


@flax.struct.dataclass
class TrainState:
  """One model's state (a leading model axis is added by vmap / lax.map)."""

  params: Any
  batch_stats: Any
  momentum: Any  # SGD momentum buffer, like params
  step: jax.Array  # int32 [], optimizer steps taken (the schedule position)


def compute_dtype(config) -> Any:
  """Resolves config.compute_dtype ('auto' = bf16 on GPU/TPU, float32 on CPU)."""
  name = config.compute_dtype
  if name == "auto":
    return jnp.bfloat16 if jax.default_backend() in ("gpu", "cuda", "rocm", "tpu") else jnp.float32
  if name not in ("float32", "bfloat16"):
    raise ValueError(f"config.compute_dtype must be 'auto', 'float32' or 'bfloat16', got {name!r}")
  return jnp.dtype(name)


def build_model(config, num_classes: int) -> nn.Module:
  """The classifier named by config.model at config.width."""
  from jaxattr.models.mobilenetv2 import MobileNetV2  # pylint: disable=g-import-not-at-top
  from jaxattr.models.resnet9 import ResNet9  # pylint: disable=g-import-not-at-top

  models = {"resnet9": ResNet9, "mobilenetv2": MobileNetV2}
  if config.model not in models:
    raise ValueError(f"config.model must be one of {sorted(models)}, got {config.model!r}")
  cpu_ops = config.get("cpu_ops", "auto")
  if cpu_ops not in ("auto", "on", "off"):
    raise ValueError(f"config.cpu_ops must be 'auto', 'on' or 'off', got {cpu_ops!r}")
  kwargs = {}
  if config.model == "resnet9":
    on = cpu_ops == "on" or (cpu_ops == "auto" and jax.default_backend() == "cpu")
    kwargs.update(s2d_grad=on)
  return models[config.model](num_classes=num_classes, width=float(config.width),
                              dtype=compute_dtype(config), **kwargs)


class _Program:
  """The jitted per-wave functions for one (config, data shape, wave size, steps) setting."""

  def __init__(self, config, model: nn.Module, num_train: int, image_shape: tuple[int, ...],
               num_classes: int, mesh: Mesh):
    self.config, self.model, self.mesh = config, model, mesh
    self.num_train, self.num_classes = num_train, num_classes
    self.image_shape = image_shape
    self.formulation = resolve_formulation(config)
    self._fns: dict[Any, Callable] = {}
    per_model = NamedSharding(mesh, P("models"))
    self.init = jax.jit(self._lift(self._init_one, n_shared=0), out_shardings=per_model)
    self.predict = jax.jit(self._lift(self._predict_one, n_shared=1))

  # -- single model ---------------------------------------------------------------------------

  def _init_one(self, key: jax.Array) -> TrainState:
    x = jnp.zeros((1,) + self.image_shape, jnp.float32)
    variables = self.model.init(jax.random.fold_in(key, 0), x, train=False)
    params = variables["params"]
    return TrainState(params=params, batch_stats=variables["batch_stats"],
                      momentum=jax.tree_util.tree_map(jnp.zeros_like, params),
                      step=jnp.zeros((), jnp.int32))

  def _loss(self, params, batch_stats, x, y):
    out, mutated = self.model.apply({"params": params, "batch_stats": batch_stats}, x,
                                    train=True, mutable=["batch_stats"])
    logits = out["logits"].astype(jnp.float32)
    eps = float(self.config.label_smoothing)
    target = jax.nn.one_hot(y, self.num_classes) * (1.0 - eps) + eps / self.num_classes
    loss = -jnp.mean(jnp.sum(target * jax.nn.log_softmax(logits), axis=-1))
    return loss, mutated["batch_stats"]

  def _train_step(self, state: TrainState, images: jax.Array, labels: jax.Array,
                  idx: jax.Array, key: jax.Array) -> tuple[TrainState, jax.Array]:
    """One SGD step of one model on the batch images[idx] with labels[idx]."""
    cfg = self.config
    x = augment(key, images[idx], bool(cfg.flip), int(cfg.translate), int(cfg.cutout))
    y = labels[idx]
    (loss, batch_stats), grads = jax.value_and_grad(self._loss, has_aux=True)(
        state.params, state.batch_stats, x, y)
    lr = learning_rate(state.step, cfg, self.num_train)
    wd, mu = float(cfg.weight_decay), float(cfg.momentum)
    # torch.optim.SGD: g += wd * p; buf = mu * buf + g; p -= lr * buf.
    buf = jax.tree_util.tree_map(lambda b, g, p: mu * b + g + wd * p, state.momentum, grads,
                                 state.params)
    params = jax.tree_util.tree_map(lambda p, b: p - lr * b, state.params, buf)
    return TrainState(params, batch_stats, buf, state.step + 1), loss

  def _plan_one(self, key: jax.Array, keep: jax.Array, epoch: jax.Array, num_steps: int):
    """One model's batch plan for an epoch: (indices [num_steps, B], valid [num_steps])."""
    return epoch_batches(jax.random.fold_in(jax.random.fold_in(key, 1), epoch), keep,
                         int(self.config.batch_size), num_steps)

  def _step_one(self, state: TrainState, key: jax.Array, labels: jax.Array, idx: jax.Array,
                valid: jax.Array, images: jax.Array, epoch: jax.Array, step: jax.Array):
    """Step `step` of an epoch for one model: a train step if its plan row is valid, else none."""
    k = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, 2), epoch), step)
    idx_s = jax.lax.dynamic_index_in_dim(idx, step, keepdims=False)
    valid_s = jax.lax.dynamic_index_in_dim(valid, step, keepdims=False)
    # A select rather than lax.cond: under vmap a cond becomes a select anyway, and on XLA:CPU
    # a training step inside a conditional (a nested computation) runs many times slower. The
    # work wasted on skipped rows is the few final steps of models that removed images.
    new_state, loss = self._train_step(state, images, labels, idx_s, k)
    new_state = jax.tree_util.tree_map(lambda a, b: jnp.where(valid_s, a, b), new_state, state)
    return new_state, jnp.where(valid_s, loss, 0.0)

  def _predict_one(self, state: TrainState, images: jax.Array) -> jax.Array:
    """Eval-mode logits [E, classes] of one model; E a multiple of eval_batch_size."""
    eb = int(self.config.eval_batch_size)
    variables = {"params": state.params, "batch_stats": state.batch_stats}

    def one(x):
      x = normalize(x.astype(jnp.float32))
      return self.model.apply(variables, x, train=False)["logits"].astype(jnp.float32)

    batches = images.reshape((-1, eb) + images.shape[1:])
    return jax.lax.map(one, batches).reshape(images.shape[0], self.num_classes)

  # -- lifting over the model axis ------------------------------------------------------------

  def _lift(self, fn: Callable, n_shared: int) -> Callable:
    """fn(*per_model_args, *shared_args) -> the same over a leading model axis, sharded.

    The per-model arguments come first and carry the model axis; the last `n_shared`
    arguments are replicated (data, epoch). Each device runs its local models with vmap or
    lax.map according to config.formulation.
    """
    formulation = self.formulation

    def local(*args):
      per_model, shared = args[: len(args) - n_shared], args[len(args) - n_shared:]
      one = lambda xs: fn(*xs, *shared)  # noqa: E731
      if formulation == "vmap":
        return jax.vmap(lambda *xs: one(xs))(*per_model)
      # lax.map = a scan over the local models. XLA:CPU runs training steps inside while loops
      # far slower than straight-line code, so on CPU the scan is fully unrolled (still one
      # model after another, inside one program); elsewhere it stays a loop.
      m_local = jax.tree_util.tree_leaves(per_model)[0].shape[0]
      if m_local == 1:  # XLA:CPU was ~50x slower on a length-1 scan than on the plain step
        out = one(jax.tree_util.tree_map(lambda a: a[0], per_model))
        return jax.tree_util.tree_map(lambda a: a[None], out)
      unroll = True if jax.default_backend() == "cpu" else 1
      return jax.lax.scan(lambda c, xs: (c, one(xs)), None, per_model, unroll=unroll)[1]

    def lifted(*args):
      n_per_model = len(args) - n_shared
      in_specs = (P("models"),) * n_per_model + (P(),) * n_shared
      return jax.shard_map(local, mesh=self.mesh, in_specs=in_specs, out_specs=P("models"),
                           check_vma=False)(*args)

    return lifted

  def plan(self, num_steps: int) -> Callable:
    """The jitted wave batch plan (keys, keep, epoch) -> (idx [W, S, B], valid [W, S])."""
    key = ("plan", num_steps)
    if key not in self._fns:
      fn = functools.partial(self._plan_one, num_steps=num_steps)
      self._fns[key] = jax.jit(self._lift(fn, n_shared=1))
    return self._fns[key]

  def step(self) -> Callable:
    """The jitted wave step (states, keys, labels, idx, valid, images, epoch, step)."""
    # The host loops over steps: on XLA:CPU a training step inside a while loop (lax.scan)
    # ran ~50x slower than the same step jitted alone, and the per-step dispatch is negligible
    # next to a step's work on an accelerator.
    if "step" not in self._fns:
      self._fns["step"] = jax.jit(self._lift(self._step_one, n_shared=3), donate_argnums=(0,))
    return self._fns["step"]


# --------------------------------------------------------------------------------------------
# Host side: waves, sharded inputs, outputs.


def _mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), ("models",))


def _global_array(mesh: Mesh, array: np.ndarray, spec: P) -> jax.Array:
  """A global array from a host array every process holds in full (multi-host safe)."""
  sharding = NamedSharding(mesh, spec)
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def _to_host(x: Any) -> Any:
  """Fetches a (possibly multi-host sharded) pytree to numpy on every process."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return multihost_utils.process_allgather(x, tiled=True)
  return jax.tree_util.tree_map(np.asarray, x)


_PROGRAMS: dict[Any, _Program] = {}
# Timings of the last train_and_predict call (read by launch/benchmark_train.py): wall seconds
# of the whole call, of all epochs (training only: no init, no evaluation), of the first epoch,
# and the steady (non-first) epochs' median.
LAST_RUN: dict[str, float] = {}


def _program(config, num_train: int, image_shape: tuple[int, ...], num_classes: int,
             mesh: Mesh) -> _Program:
  """A cached `_Program`, so repeated calls with one setting compile once."""
  key = (utils.config_hash(config), num_train, image_shape, num_classes,
         tuple(d.id for d in mesh.devices.flat), jax.default_backend())
  if key not in _PROGRAMS:
    config = copy.deepcopy(config)  # the caller may mutate theirs later
    model = build_model(config, num_classes)
    _PROGRAMS[key] = _Program(config, model, num_train, image_shape, num_classes, mesh)
  return _PROGRAMS[key]


def wave_size(config, num_models: int, num_devices: int) -> int:
  """Models per wave: config.models_per_wave (0 = all), capped at M, a multiple of devices."""
  per_wave = int(config.models_per_wave) or num_models
  per_wave = min(per_wave, num_models)
  return int(math.ceil(per_wave / num_devices)) * num_devices


def _check_inputs(config, train, eval_images, seeds, keep, labels) -> None:
  n = len(train.images)
  m = len(seeds)
  if seeds.ndim != 1 or m == 0:
    raise ValueError(f"seeds must be a non-empty 1-D array, got shape {seeds.shape}")
  if keep.shape != (m, n) or keep.dtype != np.bool_:
    raise ValueError(f"keep must be bool [M={m}, N_train={n}], got {keep.dtype} {keep.shape}")
  if labels.shape != (m, n):
    raise ValueError(f"labels must be int [M={m}, N_train={n}], got {labels.shape}")
  c = train.num_classes
  if labels.min() < 0 or labels.max() >= c:
    raise ValueError(f"labels must lie in [0, {c}), got [{labels.min()}, {labels.max()}]")
  if (eval_images.dtype != np.uint8 or eval_images.ndim != 4
      or eval_images.shape[1:] != train.images.shape[1:]):
    raise ValueError(f"eval_images must be uint8 [E, {', '.join(map(str, train.images.shape[1:]))}]"
                     f", got {eval_images.dtype} {eval_images.shape}")
  too_few = np.flatnonzero(keep.sum(1) < int(config.batch_size))
  if too_few.size:
    raise ValueError(f"models {too_few[:5].tolist()} keep fewer images than one batch of "
                     f"{config.batch_size}: they would never take a step")


def train_and_predict(config, train, eval_images: np.ndarray, seeds: np.ndarray,
                      keep: np.ndarray, labels: np.ndarray, return_params: bool = False):
  """Trains M models (each on its kept images with its labels) and predicts eval images.

  Args:
    config: the trainer section (`default_config()`).
    train: a `jaxattr.data.Dataset`; its images are put on the devices once, as uint8.
    eval_images: uint8 [E, H, W, 3], predicted in eval mode without augmentation.
    seeds: int [M], one per model; model m depends only on seeds[m] (mod 2**32), keep[m] and
      labels[m], not on the other models.
    keep: bool [M, N_train], the training images each model sees.
    labels: int [M, N_train], the training label of every image for each model.
    return_params: also return the trained variables.

  Returns:
    float32 logits [M, E, num_classes]; with return_params, (logits, variables) where variables
    is {'params', 'batch_stats'} of numpy arrays with a leading model axis [M, ...].
  """
  seeds = np.asarray(seeds)
  keep = np.asarray(keep)
  labels = np.asarray(labels)
  eval_images = np.asarray(eval_images)
  _check_inputs(config, train, eval_images, seeds, keep, labels)
  m, n = keep.shape
  num_classes = train.num_classes
  mesh = _mesh()
  ndev = mesh.devices.size
  wave = wave_size(config, m, ndev)
  bs = int(config.batch_size)
  program = _program(config, n, tuple(train.images.shape[1:]), num_classes, mesh)
  if jax.default_backend() == "cpu" and "ynn_fusion_type" not in os.environ.get("XLA_FLAGS", ""):
    logging.warning("XLA:CPU trains ~2x slower with its default YNNPACK convolutions: call "
                    "jaxattr.xla_flags.use_fast_cpu_flags() before JAX starts (see there)")

  images = _global_array(mesh, np.ascontiguousarray(train.images), P())
  eb = int(config.eval_batch_size)
  e = len(eval_images)
  e_pad = int(math.ceil(max(e, 1) / eb)) * eb
  padded_eval = np.zeros((e_pad,) + eval_images.shape[1:], np.uint8)
  padded_eval[:e] = eval_images
  eval_dev = _global_array(mesh, padded_eval, P())

  logits_out = np.zeros((m, e, num_classes), np.float32)
  params_out = []
  epochs = int(config.epochs)
  kept_steps = keep.sum(1) // bs
  total_images = int(kept_steps.sum()) * bs * epochs
  meter = utils.Throughput("ensemble training", total=total_images, unit="images",
                           every_s=float(config.log_every_s))
  num_waves = int(math.ceil(m / wave))
  epoch_seconds = []  # (wave, epoch, wall seconds incl. the sync of its losses)
  t_start = time.perf_counter()
  logging.info("training %d %s models (width %s, %s, %s) in %d wave(s) of %d on %d device(s)",
               m, config.model, config.width, jnp.dtype(compute_dtype(config)).name,
               resolve_formulation(config), num_waves, wave, ndev)
  for w in range(num_waves):
    members = np.arange(w * wave, min((w + 1) * wave, m))
    # Pad the last wave with copies of its first model so every wave has the same shape.
    rows = np.concatenate([members, np.full(wave - len(members), members[0])])
    seeds_w = (seeds[rows].astype(np.int64) % (2 ** 32)).astype(np.uint32)
    keys = jax.jit(jax.vmap(jax.random.key), out_shardings=NamedSharding(mesh, P("models")))(
        _global_array(mesh, seeds_w, P("models")))
    keep_w = _global_array(mesh, keep[rows], P("models"))
    labels_w = _global_array(mesh, labels[rows].astype(np.int32), P("models"))
    num_steps = int(kept_steps[rows].max())
    plan_fn, step_fn = program.plan(num_steps), program.step()
    states = program.init(keys)
    real = len(members)
    for ep in range(epochs):
      t_epoch = time.perf_counter()
      epoch = jnp.int32(ep)
      idx, valid = plan_fn(keys, keep_w, epoch)
      losses = []
      for s in range(num_steps):
        states, loss = step_fn(states, keys, labels_w, idx, valid, images, epoch, jnp.int32(s))
        losses.append(loss)
      # One small sync per epoch, for the log (and to bound the dispatch queue).
      loss = _to_host(jnp.stack(losses).sum(0))[:real] / np.maximum(kept_steps[members], 1)
      epoch_seconds.append((w, ep, time.perf_counter() - t_epoch))
      meter.update(int(kept_steps[members].sum()) * bs,
                   extra=(f"wave {w + 1}/{num_waves}, epoch {ep + 1}/{epochs}, "
                          f"mean loss {loss.mean():.4f}"))
    logits = _to_host(program.predict(states, eval_dev))
    logits_out[members] = logits[:real, :e]
    if return_params:
      variables = _to_host({"params": states.params, "batch_stats": states.batch_stats})
      params_out.append(jax.tree_util.tree_map(lambda a: a[:real], variables))
    logging.info("%s (models done %d/%d)", meter.message(), members[-1] + 1, m)
  # Timing for benchmarks: the first epoch includes compilation.
  steady = [t for (_, ep, t) in epoch_seconds if ep > 0] or [t for (_, _, t) in epoch_seconds]
  LAST_RUN.clear()
  LAST_RUN.update(models=m, wave=wave, waves=num_waves, epochs=epochs,
                  total_seconds=time.perf_counter() - t_start,
                  train_seconds=float(sum(t for (_, _, t) in epoch_seconds)),
                  first_epoch_seconds=epoch_seconds[0][2],
                  steady_epoch_seconds=float(np.median(steady)),
                  steady_seconds_per_model=float(np.median(steady)) * epochs * num_waves / m)
  if return_params:
    variables = jax.tree_util.tree_map(lambda *a: np.concatenate(a), *params_out)
    return logits_out, variables
  return logits_out


def flip_classes(config, train, eval_images: np.ndarray, eval_labels: np.ndarray,
                 num_models: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """The mislabel support's flip classes (REFERENCE.md section 2).

  Trains `num_models` models on the full data (seeds seed, seed + 1, ...), averages their
  softmax on each eval image and takes the top class unless it is the true label, else the
  second.

  Args:
    config: the trainer section.
    train: the training Dataset.
    eval_images: uint8 [E, H, W, 3] (the targets).
    eval_labels: int [E], their true labels.
    num_models: ensemble size (reference: 10).
    seed: first model seed.

  Returns:
    (mean softmax float32 [E, classes], flip class int32 [E]).
  """
  eval_labels = np.asarray(eval_labels)
  if eval_labels.shape != (len(eval_images),):
    raise ValueError(f"eval_labels must have shape [{len(eval_images)}], got {eval_labels.shape}")
  n = len(train.images)
  seeds = seed + np.arange(num_models, dtype=np.int64)
  keep = np.ones((num_models, n), bool)
  labels = np.broadcast_to(train.labels.astype(np.int32), (num_models, n))
  logits = train_and_predict(config, train, eval_images, seeds, keep, labels)
  probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1)).mean(0)
  return probs.astype(np.float32), flip_from_probs(probs, eval_labels)


def flip_from_probs(probs: np.ndarray, true_labels: np.ndarray) -> np.ndarray:
  """Top class of probs [E, C] unless it is the true label, then the second: int32 [E]."""
  order = np.argsort(-probs, axis=1, kind="stable")
  return np.where(order[:, 0] == true_labels, order[:, 1], order[:, 0]).astype(np.int32)


# --------------------------------------------------------------------------------------------
# Launcher entry point.


def run_config():
  """Config of `launch/train_ensemble.py`: data, mode and the trainer section."""
  import ml_collections  # pylint: disable=g-import-not-at-top

  c = ml_collections.ConfigDict()
  c.data = ml_collections.ConfigDict()
  c.data.source = "folder:/work/shared/data/cifar10-jpeg.tar.gz"  # jaxattr.data.load source
  c.data.limit_per_class = 0  # keep the first n training images per class (0 = all)
  c.data.size = 0  # resize images to size x size (0 = as stored)
  c.mode = "flip"  # 'flip': flip classes of the test set | 'train': logits of M models
  c.num_models = 10  # ensemble size (reference: 10 ResNet-9 for the flip classes)
  c.trainer = default_config()
  return c


def run(config, workdir: str) -> str:
  """Trains an ensemble on the full data and writes the result to workdir; returns its path.

  mode 'flip' writes `flip_classes.npz` (mean_softmax [E, C], flip_class [E], labels [E],
  index [E] of the test split); mode 'train' writes `ensemble_logits.npz` (logits [M, E, C],
  labels, index) and the test accuracy of each model to `ensemble_metrics.json`.
  """
  from jaxattr import data  # pylint: disable=g-import-not-at-top

  if config.mode not in ("flip", "train"):
    raise ValueError(f"config.mode must be 'flip' or 'train', got {config.mode!r}")
  sized = {"size": int(config.data.size)} if config.data.size else {}
  limit = ({"limit_per_class": int(config.data.limit_per_class)}
           if config.data.limit_per_class else {})
  train = data.load(config.data.source, "train", **sized, **limit)
  test = data.load(config.data.source, "test", **sized)
  os.makedirs(workdir, exist_ok=True)
  t0 = time.perf_counter()
  if config.mode == "flip":
    probs, flips = flip_classes(config.trainer, train, test.images, test.labels,
                                int(config.num_models), int(config.trainer.seed))
    path = os.path.join(workdir, "flip_classes.npz")
    utils.save_npz(path, mean_softmax=probs, flip_class=flips, labels=test.labels,
                   index=test.index)
    acc = float((probs.argmax(1) == test.labels).mean())
    logging.info("ensemble accuracy %.4f; wrote %s", acc, path)
    utils.save_json(os.path.join(workdir, "flip_metrics.json"),
                    {"ensemble_accuracy": acc, "seconds": time.perf_counter() - t0,
                     "config": config.to_dict(), "provenance": utils.provenance()})
    return path
  m = int(config.num_models)
  n = len(train.images)
  seeds = int(config.trainer.seed) + np.arange(m, dtype=np.int64)
  logits = train_and_predict(config.trainer, train, test.images, seeds, np.ones((m, n), bool),
                             np.broadcast_to(train.labels, (m, n)))
  path = os.path.join(workdir, "ensemble_logits.npz")
  utils.save_npz(path, logits=logits, labels=test.labels, index=test.index)
  accs = (logits.argmax(-1) == test.labels[None]).mean(1)
  utils.save_json(os.path.join(workdir, "ensemble_metrics.json"),
                  {"test_accuracy": accs.tolist(), "seconds": time.perf_counter() - t0,
                   "config": config.to_dict(), "provenance": utils.provenance()})
  logging.info("test accuracy per model %s; wrote %s", np.round(accs, 4).tolist(), path)
  return path

"""Many counterfactual models trained at once: the reference recipe with a leading model axis.

Model m has a seed, a prefix of training positions (best first), a prefix size and a flip class;
it trains with its first `size` prefix images removed (flip -1) or relabelled to the flip class
(REFERENCE.md sections 2-3). Per model, training is exactly one reference run: every epoch a
fresh permutation of its KEPT images in batches with drop_last (fewer images, fewer steps); a
per-iteration triangular lr whose iterations per epoch come from the FULL set; torch's SGD
(momentum, weight decay added to the gradient) as an optax chain; label smoothing; on-device
augmentation (`augment.cifar_train_views`). All randomness of model m comes from
`jax.random.key(seeds[m])`. Models of a wave run in lock step for the wave's longest epoch; a
model whose epoch is over skips the remaining steps (its state untouched), so its result equals
a run on its own.

`train_step` is the pure single-model step. `over_models` lifts single-model functions over the
model axis, sharded over the devices (mesh axis 'models'); a `Trainer` holds the compiled
programs of one (config, training set, mesh) for any number of calls. Every process passes the
same host arrays and builds its own shards, so the same code runs multi-host.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import numbers
import os
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxattr import augment, distributed, utils

# 'map' everywhere: it keeps each model's convolutions ungrouped, which XLA:CPU runs ~2x faster
# than vmap's grouped ones (benchmarks/benchmark_train.py); GPU/TPU are assumed to agree.
FORMULATION_BY_BACKEND = {"cpu": "map", "gpu": "map", "cuda": "map", "rocm": "map", "tpu": "map"}


def resolve_formulation(config: ml_collections.ConfigDict) -> str:
  """config.formulation with 'auto' replaced by the backend's default ('map' or 'vmap')."""
  form = config.formulation
  if form == "auto":
    form = FORMULATION_BY_BACKEND.get(jax.default_backend(), "map")
  if form not in ("vmap", "map"):
    raise ValueError(f"ensemble.formulation must be 'auto', 'vmap' or 'map', got {form!r}")
  return form


def compute_dtype(config: ml_collections.ConfigDict) -> Any:
  """Resolves config.compute_dtype ('auto' = bf16 on GPU/TPU, float32 on CPU)."""
  name = config.compute_dtype
  if name == "auto":
    return jnp.bfloat16 if jax.default_backend() in ("gpu", "cuda", "rocm", "tpu") else jnp.float32
  if name not in ("float32", "bfloat16"):
    raise ValueError(
        f"ensemble.compute_dtype must be 'auto', 'float32' or 'bfloat16', got {name!r}")
  return jnp.dtype(name)


def classifier(config: ml_collections.ConfigDict, num_classes: int,
               axis_name: str | None = None) -> nn.Module:
  """The counterfactual classifier named by config.model, at config.width; `axis_name`: the mesh
  axis its BatchNorms compute training statistics over (data parallel; resnet18 only)."""
  from jaxattr.models.mobilenetv2 import MobileNetV2  # pylint: disable=g-import-not-at-top
  from jaxattr.models.resnet import ResNet18  # pylint: disable=g-import-not-at-top
  from jaxattr.models.resnet9 import ResNet9  # pylint: disable=g-import-not-at-top

  models = {"resnet9": ResNet9, "mobilenetv2": MobileNetV2, "resnet18": ResNet18}
  if config.model not in models:
    raise ValueError(f"ensemble.model must be one of {sorted(models)}, got {config.model!r}")
  if config.cpu_ops not in ("auto", "on", "off"):
    raise ValueError(f"ensemble.cpu_ops must be 'auto', 'on' or 'off', got {config.cpu_ops!r}")
  kwargs = {}
  if axis_name is not None and config.model != "resnet18":
    raise ValueError(f"ensemble.data_parallel > 1 needs ensemble.model='resnet18', got "
                     f"{config.model!r}")
  cpu_ops = config.cpu_ops == "on" or (config.cpu_ops == "auto" and jax.default_backend() == "cpu")
  if config.model == "resnet18":
    # On the CPU, convs with outputs of <= 4 x 4 pixels as patch matrix products (layers.Conv),
    # and every conv input stored once (layers.materialize).
    kwargs.update(stem=config.stem, blurpool=bool(config.blurpool), axis_name=axis_name,
                  patch_below=16 if cpu_ops else 0, materialize=cpu_ops)
  if config.model == "resnet9":
    kwargs["s2d_grad"] = cpu_ops
  return models[config.model](num_classes=num_classes, width=float(config.width),
                              dtype=compute_dtype(config), **kwargs)


# --------------------------------------------------------------------------------------------
# Pure single-model pieces: schedule, optimizer, batch plan, counterfactual subset, step.


def iterations_per_epoch(config: ml_collections.ConfigDict, num_train: int) -> int:
  """Iterations per epoch of the schedule: FULL-data images // batch size (drop_last)."""
  full = int(config.schedule_examples) or num_train
  return max(1, full // int(config.batch_size))


def learning_rate(step: jax.Array | np.ndarray | int, config: ml_collections.ConfigDict,
                  num_train: int) -> jax.Array:
  """The triangular lr at optimizer step `step` (0-based; step 0 uses lr 0, as torch's LambdaLR):
  np.interp(step, [0, peak_epoch * ipe, epochs * ipe], [0, peak_lr, 0]), ipe of the FULL set."""
  ipe = iterations_per_epoch(config, num_train)
  xp = jnp.asarray([0.0, float(config.peak_epoch) * ipe, float(config.epochs) * ipe])
  fp = jnp.asarray([0.0, float(config.peak_lr), 0.0])
  return jnp.interp(jnp.asarray(step, jnp.float32), xp, fp)


def decay_mask(params: Any) -> Any:
  """True for the parameters that take weight decay when config.bn_weight_decay is False: all but
  those of modules whose name contains 'bn' (ffcv-imagenet's rule; the fc bias keeps it)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not any("bn" in str(getattr(k, "key", "")) for k in path), params)


def make_optimizer(config: ml_collections.ConfigDict,
                   num_train: int) -> optax.GradientTransformation:
  """torch SGD: g <- g + wd * p; buf <- m * buf + g; p <- p - lr(step) * buf (wd only where
  `decay_mask` says so when config.bn_weight_decay is False)."""
  schedule = functools.partial(learning_rate, config=config, num_train=num_train)
  mask = None if config.get("bn_weight_decay", True) else decay_mask
  return optax.chain(optax.add_decayed_weights(float(config.weight_decay), mask=mask),
                     optax.sgd(schedule, momentum=float(config.momentum)))


def crop_size(config: ml_collections.ConfigDict, epoch: int, side: int) -> int:
  """The side of epoch `epoch`'s training views (0-based epochs): `side` for 'cifar' views; for
  'rrc' ffcv-imagenet's ramp (res_min up to ramp_start, res_max from ramp_end, in between the
  linear value rounded to a multiple of res_step; a 0 side means the image's)."""
  if config.get("augment", "cifar") != "rrc":
    return side
  lo, hi = int(config.res_min) or side, int(config.res_max) or side
  start, end = int(config.ramp_start), int(config.ramp_end)
  if epoch <= start:
    return lo
  if epoch >= end:
    return hi
  step = int(config.res_step) or 1
  return int(np.round(np.interp(epoch, [start, end], [lo, hi]) / step)) * step


def train_views(key: jax.Array, images: jax.Array, config: ml_collections.ConfigDict, crop: int |
                None = None, batch: int | None = None, start: jax.Array | None = None) -> jax.Array:
  """The training views of config.augment for uint8 images (rows [start, ...) of a batch of
  `batch` when given, `augment`'s data-parallel parts) -> float32 [B, crop, crop, 3]."""
  if config.get("augment", "cifar") == "rrc":
    return augment.rrc_train_views(key, images, crop or images.shape[1], float(config.min_scale),
                                   bool(config.flip), batch=batch, start=start)
  return augment.cifar_train_views(key, images, bool(config.flip), int(config.translate),
                                   int(config.cutout), batch=batch, start=start)


def eval_normalize(config: ml_collections.ConfigDict, images: jax.Array) -> jax.Array:
  """Evaluation inputs: the whole image normalised as config.augment's training views are."""
  if config.get("augment", "cifar") == "rrc":
    return augment.normalize(images)
  return augment.cifar_normalize(images)


def epoch_batches(key: jax.Array, keep: jax.Array, batch_size: int,
                  num_steps: int) -> tuple[jax.Array, jax.Array]:
  """One epoch's batches of one model: a uniform permutation of its kept images, drop_last.

  Args:
    key: the model's key for this epoch.
    keep: bool [N], the images this model may see.
    batch_size: images per batch.
    num_steps: static number of rows to return (<= N // batch_size); fewer rows give a prefix.

  Returns:
    (indices int32 [num_steps, batch_size], valid bool [num_steps]): row s is the s-th batch
    when valid[s]; later rows are filler to skip (they may hold removed images).
  """
  n = keep.shape[0]
  if num_steps * batch_size > n:
    raise ValueError(f"num_steps {num_steps} x batch_size {batch_size} exceeds N = {n}")
  perm = jax.random.permutation(key, n)
  # A stable sort on "removed" moves the kept images to the front, keeping their random order.
  order = jnp.argsort(jnp.logical_not(keep[perm]), stable=True)
  idx = perm[order][:num_steps * batch_size].reshape(num_steps, batch_size).astype(jnp.int32)
  valid = jnp.arange(num_steps) < jnp.sum(keep) // batch_size
  return idx, valid


def counterfactual_subset(prefix: jax.Array, size: jax.Array, flip: jax.Array, labels: jax.Array,
                          usable: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """One model's training set, (keep bool [N], labels int32 [N]), built on the device.

  Args:
    prefix: int32 [K], training positions, best first.
    size: int32 [], how many prefix entries the model acts on.
    flip: int32 [], -1 = remove them, else relabel them to this class.
    labels: int32 [N], the dataset's labels.
    usable: bool [N], images any model may train on (False: unreadable ones that a resident copy
      stored as black images); None = all.
  """
  n = labels.shape[0]
  used = jnp.where(jnp.arange(prefix.shape[0]) < size, prefix, n)  # position n: dropped
  removal = flip < 0
  keep = jnp.ones(n, bool).at[used].set(False, mode="drop") | jnp.logical_not(removal)
  if usable is not None:
    keep = keep & usable
  return keep, jnp.where(removal, labels, labels.at[used].set(flip, mode="drop"))


@flax.struct.dataclass
class TrainState:
  """One model's state (a leading model axis is added by `over_models`)."""

  params: Any
  batch_stats: Any
  opt_state: optax.OptState
  step: jax.Array  # int32 [], optimizer steps taken (the schedule position)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)


def train_flops(config: ml_collections.ConfigDict, crop: int, num_classes: int) -> float:
  """FLOPs of one training image for config's classifier at crop x crop pixels: 3x the forward
  pass's, as XLA's cost analysis counts it (benchmarks, MFU, projections)."""
  model = classifier(config, num_classes)
  x = jnp.zeros((8, crop, crop, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x[:1]))
  fwd = jax.jit(lambda v, x: model.apply(v, x)["logits"]).lower(variables, x).compile()
  cost = fwd.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return 3 * float(cost["flops"]) / 8


def init_state(key: jax.Array, *, model: nn.Module, tx: optax.GradientTransformation,
               image_shape: tuple[int, ...]) -> TrainState:
  """Fresh state of one model from its key (the init uses fold_in(key, 0))."""
  x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  variables = model.init(jax.random.fold_in(key, 0), x, train=False)
  params = variables["params"]
  return TrainState(params=params, batch_stats=variables["batch_stats"], opt_state=tx.init(params),
                    step=jnp.zeros((), jnp.int32), tx=tx)


def train_step(state: TrainState, batch: tuple[jax.Array, jax.Array], key: jax.Array, *,
               model: nn.Module, config: ml_collections.ConfigDict, crop: int | None = None,
               axis_name: str | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
  """One SGD step of one model on batch = (uint8 images [B, H, W, 3], int32 labels [B]).

  With `axis_name`, the batch is this device's equal part of a batch split over that mesh axis
  (inside shard_map): the views are those rows of the whole batch's, gradients and the loss are
  averaged over the axis, and the model's BatchNorms must reduce over it too (`classifier`).
  """
  images, labels = batch
  if axis_name is None:
    x = train_views(key, images, config, crop)
  else:
    b = images.shape[0]
    x = train_views(key, images, config, crop, batch=b * jax.lax.axis_size(axis_name),
                    start=jax.lax.axis_index(axis_name) * b)

  def loss_fn(params):
    out, mutated = model.apply({
        "params": params,
        "batch_stats": state.batch_stats
    }, x, train=True, mutable=["batch_stats"])
    logits = out["logits"].astype(jnp.float32)
    eps, c = float(config.label_smoothing), logits.shape[-1]
    target = jax.nn.one_hot(labels, c) * (1.0 - eps) + eps / c
    return -jnp.mean(jnp.sum(target * jax.nn.log_softmax(logits), axis=-1)), mutated["batch_stats"]

  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  if axis_name is not None:
    grads, loss = jax.lax.pmean((grads, loss), axis_name)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  return state.replace(params=optax.apply_updates(state.params, updates), batch_stats=batch_stats,
                       opt_state=opt_state, step=state.step + 1), {
                           "loss": loss
                       }


def predict(state: TrainState, images: jax.Array, *, model: nn.Module, batch_size: int,
            config: ml_collections.ConfigDict | None = None) -> jax.Array:
  """Eval-mode float32 logits [E, classes] of one model on uint8 images [E, H, W, 3] (E a multiple
  of batch_size), normalised per `eval_normalize`; with config.eval_flip the mean of the logits
  of each image and its mirror image."""
  cfg = config if config is not None else ml_collections.ConfigDict({"augment": "cifar"})

  def one(x):
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    x = eval_normalize(cfg, x)
    logits = model.apply(variables, x, train=False)["logits"].astype(jnp.float32)
    if cfg.get("eval_flip", False):
      logits = 0.5 * (logits + model.apply(variables, x[:, :, ::-1], train=False)["logits"])
    return logits

  out = jax.lax.map(one, images.reshape((-1, batch_size) + images.shape[1:]))
  return out.reshape(images.shape[0], -1).astype(jnp.float32)


def over_models(fn: Callable, mesh: Mesh, formulation: str, num_shared: int,
                shared_specs: tuple[P, ...] | None = None) -> Callable:
  """fn(*per_model, *shared) -> the same over a leading model axis sharded on mesh axis 'models'.

  The last `num_shared` arguments are replicated (data, epoch, step), or laid out as
  `shared_specs` says. Each device runs its local models with vmap or, for 'map', one after
  another (bit-exact whatever the wave). A mesh axis 'data' beside 'models' holds copies of each
  model; `fn` may split work over it (`train_step`'s axis_name) and must return the same on all.
  """

  def local(*args):
    per_model, shared = args[:len(args) - num_shared], args[len(args) - num_shared:]

    def one(xs):
      return fn(*xs, *shared)

    if formulation == "vmap":
      return jax.vmap(lambda *xs: one(xs))(*per_model)
    if jax.tree_util.tree_leaves(per_model)[0].shape[0] == 1:  # XLA:CPU runs a 1-step scan slowly
      out = one(jax.tree_util.tree_map(lambda a: a[0], per_model))
      return jax.tree_util.tree_map(lambda a: a[None], out)
    # XLA:CPU runs training steps inside while loops far slower than straight-line code, so on
    # the CPU the model loop is unrolled (still one model after another).
    unroll = True if jax.default_backend() == "cpu" else 1
    return jax.lax.scan(lambda c, xs: (c, one(xs)), None, per_model, unroll=unroll)[1]

  def lifted(*args):
    in_specs = (P("models"),) * (len(args) - num_shared) + (shared_specs or (P(),) * num_shared)
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=P("models"),
                         check_vma=False)(*args)

  return lifted


# --------------------------------------------------------------------------------------------
# Host side: a Trainer per (config, training set, mesh), waves, sharded inputs, outputs.


def wave_size(config: ml_collections.ConfigDict, num_models: int, num_devices: int) -> int:
  """Models per wave: config.models_per_wave (0 = all), capped at M, a multiple of
  `num_devices` (the model groups of a mesh with a data axis)."""
  per_wave = min(int(config.models_per_wave) or num_models, num_models)
  return math.ceil(per_wave / num_devices) * num_devices


def _to_host(x: Any) -> Any:
  """Fetches a (possibly multi-host sharded) pytree to numpy on every process."""
  x = jax.block_until_ready(x)  # the computation is not the gather's cost
  with distributed.overhead("gathers"):
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return multihost_utils.process_allgather(x, tiled=True)
    return jax.tree_util.tree_map(np.asarray, x)


def _is_int(a: np.ndarray) -> bool:
  return np.issubdtype(a.dtype, np.integer)


def _require(ok: Any, message: str, *got: Any) -> None:
  """Raises ValueError(message + what was got: an array's dtype, shape and range, or text)."""
  if ok:
    return
  if got and isinstance(got[0], np.ndarray):
    a = got[0]
    span = f" in [{a.min()}, {a.max()}]" if a.size and a.dtype.kind in "iuf" else ""
    got = (f"{a.dtype} {list(a.shape)}{span}",)
  raise ValueError(message + (f", got {got[0]}" if got else ""))


def _number(value: Any, integer: bool = False) -> bool:
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    return False
  return isinstance(value, numbers.Integral) if integer else math.isfinite(value)


def check_config(config: ml_collections.ConfigDict, train: Any) -> None:
  """Checks the trainer config (`jaxattr.config.trainer_section()`, `config.ensemble`) against
  the training set it will train on, before anything is built.

  Raises:
    ValueError: naming the field as ``ensemble.<field>``, its value and the range expected; or
      the training set (uint8 images [N, H, W, 3], int labels [N] in [0, classes)).
  """
  images, labels = np.asarray(train.images), np.asarray(train.labels)
  n = len(images)
  _require(images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] == 3 and n >= 1,
           "the training images must be uint8 [N >= 1, H, W, 3]", images)
  _require(
      labels.shape == (n,) and _is_int(labels) and labels.min() >= 0 and
      labels.max() < train.num_classes, f"the training labels must be int [N={n}] in "
      f"[0, {train.num_classes})", labels)

  def need(name, ok, expected):
    _require(ok, f"ensemble.{name} must be {expected}", repr(config[name]))

  for name in ("model", "compute_dtype", "cpu_ops", "formulation"):
    if name not in config:
      raise ValueError(f"ensemble.{name} is missing: start from jaxattr.config.trainer_section()")
  need("model", config.model in ("resnet9", "mobilenetv2", "resnet18"),
       "'resnet9', 'mobilenetv2' or 'resnet18'")
  need("compute_dtype", config.compute_dtype in ("auto", "float32", "bfloat16"),
       "'auto', 'float32' or 'bfloat16'")
  need("cpu_ops", config.cpu_ops in ("auto", "on", "off"), "'auto', 'on' or 'off'")
  need("formulation", config.formulation in ("auto", "vmap", "map"), "'auto', 'vmap' or 'map'")
  need("width", _number(config.width) and config.width > 0, "a positive number")
  need("epochs", _number(config.epochs, True) and config.epochs >= 1, "an integer >= 1")
  bs = config.batch_size
  need("batch_size", _number(bs, True) and bs >= 1, "an integer >= 1")
  _require(
      bs <= n, f"ensemble.batch_size={bs} exceeds the {n} training images: with drop_last "
      "no model would take a step; lower ensemble.batch_size")
  need("peak_lr", _number(config.peak_lr) and config.peak_lr > 0, "a positive number")
  # Above ensemble.epochs the lr only rises (quick configs train 1 epoch of a longer ramp).
  need("peak_epoch", _number(config.peak_epoch) and config.peak_epoch >= 0, "a number >= 0")
  need("schedule_examples",
       _number(config.schedule_examples, True) and config.schedule_examples >= 0,
       "an integer >= 0 (0 = the training set's size)")
  need("momentum", _number(config.momentum) and 0 <= config.momentum < 1, "in [0, 1)")
  need("weight_decay", _number(config.weight_decay) and config.weight_decay >= 0, "a number >= 0")
  need("label_smoothing",
       _number(config.label_smoothing) and 0 <= config.label_smoothing < 1, "in [0, 1)")
  need("translate", _number(config.translate, True) and config.translate >= 0, "an integer >= 0")
  need("cutout", _number(config.cutout, True) and config.cutout >= 0, "an integer >= 0")
  need("flip", isinstance(config.flip, (bool, np.bool_)), "True or False")
  need("models_per_wave",
       _number(config.models_per_wave, True) and config.models_per_wave >= 0,
       "an integer >= 0 (0 = all models at once)")
  need("eval_batch_size",
       _number(config.eval_batch_size, True) and config.eval_batch_size >= 1, "an integer >= 1")
  need("log_every_s", _number(config.log_every_s) and config.log_every_s > 0, "a positive number")
  # The ResNet-18 recipes' fields (`jaxattr.config.imagenet_recipe`); older configs lack them.
  get = config.get
  if "stem" in config:
    need("stem", config.stem in ("small", "imagenet"), "'small' or 'imagenet'")
  for name in ("blurpool", "bn_weight_decay", "eval_flip"):
    if name in config:
      need(name, isinstance(config[name], (bool, np.bool_)), "True or False")
  if "augment" in config:
    need("augment", config.augment in ("cifar", "rrc"), "'cifar' or 'rrc'")
  if "min_scale" in config:
    need("min_scale", _number(config.min_scale) and 0 < config.min_scale <= 1, "in (0, 1]")
  side = images.shape[1]
  for name in ("res_min", "res_max"):
    if name in config:
      need(
          name,
          _number(config[name], True) and 0 <= config[name] <= side and
          (config[name] == 0 or get("augment") == "rrc"),
          f"an integer in [0, {side}] (the image side), non-zero only with augment='rrc'")
  for name in ("ramp_start", "ramp_end", "res_step"):
    if name in config:
      need(name, _number(config[name], True) and config[name] >= 0, "an integer >= 0")
  if "data_parallel" in config:
    need("data_parallel",
         _number(config.data_parallel, True) and config.data_parallel >= 1, "an integer >= 1")
    _require(
        bs % config.data_parallel == 0, f"ensemble.batch_size={bs} does not divide over "
        f"ensemble.data_parallel={config.data_parallel} devices")
  if "data_sharding" in config:
    need("data_sharding", config.data_sharding in ("replicated", "sharded"),
         "'replicated' or 'sharded'")


@dataclasses.dataclass
class RunStats:
  """Timings of one `Trainer.train_and_predict` call, in wall seconds."""

  models: int
  wave: int  # models per wave (a multiple of the devices)
  waves: int
  epochs: int
  total_seconds: float  # the whole call: inputs, init, training, evaluation, outputs
  train_seconds: float  # all epochs (no init, no evaluation)
  first_epoch_seconds: float  # the first wave's first epoch (it compiles on a fresh Trainer)
  steady_epoch_seconds: float  # median of the other epochs
  steady_seconds_per_model: float  # steady_epoch_seconds * epochs * waves / models


def _device_images(mesh: Mesh, images: np.ndarray, spec: P, parts: int) -> jax.Array:
  """The training images on the devices as laid out by `spec`, read piece by piece from `images`
  (in memory or memory-mapped, as a resident ImageNet copy is: never copied whole on the host).
  With `parts` > 1 the rows are padded with zeros to a multiple of it (equal parts per data
  device; padding rows are never in a batch)."""
  n = len(images)
  total = n + (-n % parts)
  shape = (total,) + tuple(images.shape[1:])

  def piece(index):
    start, stop, _ = index[0].indices(total)
    out = np.zeros((stop - start,) + shape[1:], np.uint8)
    if min(stop, n) > start:
      out[:min(stop, n) - start] = images[start:min(stop, n)][(slice(None),) + tuple(index[1:])]
    return out

  return jax.make_array_from_callback(shape, NamedSharding(mesh, spec), piece)


def make_mesh(data_parallel: int = 1, devices: Any = None) -> Mesh:
  """The trainer's mesh ('models', 'data') over `devices` (default: every device of the job):
  groups of `data_parallel` consecutive devices each train one model at a time.

  Raises:
    ValueError: data_parallel does not divide the number of devices.
  """
  devices = np.asarray(jax.devices() if devices is None else devices).ravel()
  if data_parallel < 1 or len(devices) % data_parallel:
    raise ValueError(f"ensemble.data_parallel={data_parallel} must divide the {len(devices)} "
                     "devices of the job")
  return Mesh(devices.reshape(-1, data_parallel), ("models", "data"))


class Trainer:
  """The compiled programs of one (trainer config, training set, mesh), reused across calls: the
  training images go to the devices once, as uint8, and each wave size compiles once."""

  def __init__(self, config: ml_collections.ConfigDict, train: Any, mesh: Mesh | None = None):
    """config: `jaxattr.config.trainer_section()`; train: a `jaxattr.data.Dataset`; mesh: one
    with the axis 'models' and optionally 'data' (default: every device, `make_mesh`).

    Raises:
      ValueError: a config value or training set it cannot train with (`check_config`), or a
        mesh whose data axis does not divide the batch.
    """
    check_config(config, train)
    self.config = copy.deepcopy(config)  # the caller may change theirs later
    self.train = train
    self.mesh = mesh if mesh is not None else make_mesh(int(config.get("data_parallel", 1)))
    data_size = dict(self.mesh.shape).get("data", 1)
    _require(
        int(config.batch_size) % data_size == 0,
        f"ensemble.batch_size={config.batch_size} does not divide over the mesh's data axis of "
        f"{data_size} devices: make it a multiple of {data_size}")
    self.data_axis = "data" if data_size > 1 else None
    self.num_groups = dict(self.mesh.shape)["models"]
    self.sharded = self.data_axis is not None and config.get("data_sharding",
                                                             "replicated") == "sharded"
    self.formulation = resolve_formulation(self.config)
    self.model = classifier(self.config, train.num_classes, axis_name=self.data_axis)
    self.tx = make_optimizer(self.config, len(train.images))
    # The plan always has the full set's rows, so no program's shape depends on a subset.
    self.plan_steps = len(train.images) // int(self.config.batch_size)
    if jax.default_backend() == "cpu" and "ynn_fusion_type" not in os.environ.get("XLA_FLAGS", ""):
      logging.warning("XLA:CPU trains ~2x slower with its default YNNPACK convolutions: call "
                      "jaxattr.xla_flags.use_fast_cpu_flags() before JAX starts (see there)")
    self.images_spec = P("data") if self.sharded else P()
    self.images = _device_images(self.mesh, train.images, self.images_spec,
                                 data_size if self.sharded else 1)
    self.labels = distributed.global_array(self.mesh, train.labels.astype(np.int32), P())
    # Unreadable images of a resident copy (`Dataset.ok`): in no model's training set.
    self.usable = None if getattr(train, "ok", None) is None else np.asarray(train.ok, bool)
    self.usable_dev = None if self.usable is None else distributed.global_array(
        self.mesh, self.usable, P())
    lift = functools.partial(over_models, mesh=self.mesh, formulation=self.formulation)
    per_model, partial = NamedSharding(self.mesh, P("models")), functools.partial
    init = partial(init_state, model=self.model, tx=self.tx, image_shape=train.images.shape[1:])
    pred = partial(predict, model=self.model, batch_size=int(self.config.eval_batch_size),
                   config=self.config)
    self.keys = jax.jit(jax.vmap(jax.random.key), out_shardings=per_model)
    self.init = jax.jit(lift(init, num_shared=0), out_shardings=per_model)
    self.subsets = jax.jit(lift(counterfactual_subset, num_shared=1 if self.usable is None else 2))
    self.plan = jax.jit(lift(self._plan_one, num_shared=1))
    self._steps: dict[int, Callable] = {}  # crop side -> compiled step
    self._warned_wave = False
    self.predict = jax.jit(lift(pred, num_shared=1))

  def step(self, crop: int) -> Callable:
    """The compiled wave step for training views of side `crop` (one per side of the ramp)."""
    if crop not in self._steps:
      fn = over_models(functools.partial(self._step_one, crop=crop), mesh=self.mesh,
                       formulation=self.formulation, num_shared=3, shared_specs=(self.images_spec,
                                                                                 P(), P()))
      self._steps[crop] = jax.jit(fn, donate_argnums=(0,))
    return self._steps[crop]

  def _plan_one(self, key: jax.Array, keep: jax.Array, epoch: jax.Array):
    """One model's batch plan for an epoch: (indices [plan_steps, B], valid [plan_steps])."""
    return epoch_batches(jax.random.fold_in(jax.random.fold_in(key, 1), epoch), keep,
                         int(self.config.batch_size), self.plan_steps)

  def _batch(self, images: jax.Array, labels: jax.Array, rows: jax.Array):
    """This device's part of a batch: (uint8 images, labels) of `rows` [B], or with a data axis
    of D devices the d-th block of B / D of them (from the device's own copy, or, 'sharded',
    each device contributing the rows it holds to a reduce-scatter over the axis)."""
    if self.data_axis is None:
      return images[rows], labels[rows]
    d, size = jax.lax.axis_index(self.data_axis), jax.lax.axis_size(self.data_axis)
    b = rows.shape[0] // size
    mine = jax.lax.dynamic_slice_in_dim(rows, d * b, b)
    if not self.sharded:
      return images[mine], labels[mine]
    held = images.shape[0]  # this device's block of the (padded) training images
    local = rows - d * held
    own = (local >= 0) & (local < held)
    x = jnp.where(own[:, None, None, None], images[jnp.clip(local, 0, held - 1)], 0)
    x = jax.lax.psum_scatter(x, self.data_axis, scatter_dimension=0, tiled=True)
    return x, labels[mine]

  def _step_one(self, state: TrainState, key: jax.Array, labels: jax.Array, idx: jax.Array,
                valid: jax.Array, images: jax.Array, epoch: jax.Array, step: jax.Array, *,
                crop: int):
    """Step `step` of an epoch for one model: a train step if its plan row is valid, else none."""
    k = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, 2), epoch), step)
    rows = jax.lax.dynamic_index_in_dim(idx, step, keepdims=False)
    ok = jax.lax.dynamic_index_in_dim(valid, step, keepdims=False)
    new, metrics = train_step(state, self._batch(images, labels, rows), k, model=self.model,
                              config=self.config, crop=crop, axis_name=self.data_axis)
    # A select, not lax.cond: under vmap a cond is a select anyway, and XLA:CPU runs a step
    # inside a conditional many times slower. Only filler rows of shorter epochs are wasted.
    new = jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, state)
    return new, jnp.where(ok, metrics["loss"], 0.0)

  def _warn_unrolled_wave(self, wave: int) -> None:
    """Warns once when XLA:CPU would compile several models per device unrolled (`over_models`):
    compile time grows with them (~12 s each for a 1/16-width ResNet-18) and the steps are no
    faster, as both cores already serve one model."""
    per_device = wave // self.num_groups
    if (per_device > 1 and self.formulation == "map" and jax.default_backend() == "cpu" and
        not self._warned_wave):
      self._warned_wave = True
      logging.warning(
          "ensemble: %d models per device in a wave; XLA:CPU compiles them unrolled, one copy "
          "of the training step each, for no faster steps. --config.ensemble.models_per_wave=%d "
          "(one per device, or per device group with a data axis) trains the same models (at "
          "most rounding differs) and compiles once", per_device, self.num_groups)

  def check_arguments(self, eval_images: np.ndarray, seeds: Any, prefixes: Any, sizes: Any,
                      flip: Any) -> tuple[np.ndarray, ...]:
    """Validates `train_and_predict`'s arguments (ValueError naming the argument, its expected
    shape or range and what it got); returns (seeds int64 [M], prefixes int32 [M, K >= 1],
    sizes int32 [M], flip int32 [M], kept int64 [M] images each model keeps)."""
    n, c, bs = len(self.train.images), self.train.num_classes, int(self.config.batch_size)
    eval_images = np.asarray(eval_images)
    seeds = np.asarray(seeds)
    m = len(seeds) if seeds.ndim == 1 and _is_int(seeds) else 0
    _require(m, "seeds must be a non-empty int [M]", seeds)
    shape = self.train.images.shape[1:]
    _require(eval_images.dtype == np.uint8 and eval_images.shape[1:] == shape,
             f"eval_images must be uint8 [E, {', '.join(map(str, shape))}]", eval_images)
    if prefixes is None:
      _require(not np.any(sizes), "sizes without prefixes: pass the prefixes they count", sizes)
      prefixes, sizes = np.zeros((m, 0), np.int64), None
    prefixes = np.asarray(prefixes)
    _require(prefixes.ndim == 2 and len(prefixes) == m and (_is_int(prefixes) or not prefixes.size),
             f"prefixes must be int [M={m}, K]", prefixes)
    k = prefixes.shape[1]
    sizes = np.asarray(np.full(m, k) if sizes is None else sizes)
    _require(sizes.shape == (m,) and _is_int(sizes) and sizes.min() >= 0 and sizes.max() <= k,
             f"sizes must be int [M={m}] in [0, K={k}]", sizes)
    used = np.arange(k)[None] < sizes[:, None]
    bad = np.argwhere(used & ((prefixes < 0) | (prefixes >= n)))
    _require(not len(bad), f"prefixes [M={m}, K={k}] must hold training positions in [0, N={n})",
             *[f"prefixes[{r}, {j}] = {prefixes[r, j]}" for r, j in bad[:1]])
    # Unused entries become distinct negatives, so only repeats among used entries match.
    s = np.sort(np.where(used, prefixes, -1 - np.arange(k)[None]), axis=1)
    dup = np.argwhere(s[:, 1:] == s[:, :-1])
    _require(
        not len(dup), f"prefixes [M={m}, K={k}] must not repeat a position within a row's "
        "first sizes[row] entries", *[f"row {r} repeats {s[r, j]}" for r, j in dup[:1]])
    flip = np.asarray(np.full(m, -1) if flip is None else flip)
    _require(flip.shape == (m,) and _is_int(flip) and flip.min() >= -1 and flip.max() < c,
             f"flip must be int [M={m}] in [-1, {c}) (-1 = removal)", flip)
    if self.usable is None:
      kept = np.where(flip < 0, n - sizes, n).astype(np.int64)
    else:  # unreadable images are never kept, removed or not
      removed_usable = np.sum(used & self.usable[np.clip(prefixes, 0, n - 1)], axis=1)
      kept = np.where(flip < 0,
                      self.usable.sum() - removed_usable, self.usable.sum()).astype(np.int64)
    too_few = np.flatnonzero(kept < bs)
    _require(
        not too_few.size, f"models {too_few[:5].tolist()} keep fewer images than one batch "
        f"of {bs}: they would never take a step")
    if k == 0:  # one unused column: the device code needs no empty-array special case
      prefixes = np.zeros((m, 1), np.int64)
    return (seeds.astype(np.int64), prefixes.astype(np.int32), sizes.astype(np.int32),
            flip.astype(np.int32), kept)

  def train_and_predict(self, eval_images: np.ndarray, seeds: Any, prefixes: Any = None,
                        sizes: Any = None, flip: Any = None, return_params: bool = False):
    """Trains M models, each on its counterfactual training set, and predicts eval images.

    Args:
      eval_images: uint8 [E, H, W, 3], predicted in eval mode without augmentation.
      seeds: int [M]; model m depends only on seeds[m] (mod 2**32), its prefix row, size and
        flip, never on the other models.
      prefixes: int [M, K] training positions (rows of `train`), best first; None = full data.
      sizes: int [M] in [0, K]: model m acts on its first sizes[m] prefix entries (None = K).
      flip: int [M] in [-1, classes), or None (= all -1). -1: removal (model m never sees its
        prefix); c >= 0: mislabel (model m's prefix images are relabelled to class c).
      return_params: also return the trained variables.

    Returns:
      (logits float32 [M, E, classes], RunStats); with return_params also variables, a dict
      {'params', 'batch_stats'} of numpy arrays with a leading model axis [M, ...].
    """
    t_start = time.perf_counter()
    cfg = self.config
    eval_images = np.asarray(eval_images)
    seeds, prefixes, sizes, flip, kept = self.check_arguments(eval_images, seeds, prefixes, sizes,
                                                              flip)
    m, bs, epochs = len(seeds), int(cfg.batch_size), int(cfg.epochs)
    ndev = self.mesh.devices.size
    wave = wave_size(cfg, m, self.num_groups)
    num_waves = math.ceil(m / wave)
    self._warn_unrolled_wave(wave)
    eb, e = int(cfg.eval_batch_size), len(eval_images)
    padded = np.zeros((math.ceil(max(e, 1) / eb) * eb,) + eval_images.shape[1:], np.uint8)
    padded[:e] = eval_images
    eval_dev = distributed.global_array(self.mesh, padded, P())
    per_model = functools.partial(distributed.global_array, self.mesh, spec=P("models"))

    logits_out = np.zeros((m, e, self.train.num_classes), np.float32)
    params_out = []
    kept_steps = kept // bs
    meter = utils.Throughput("ensemble training", total=int(kept_steps.sum()) * bs * epochs,
                             unit="images", every_s=float(cfg.log_every_s))
    epoch_seconds = []  # (epoch, wall seconds incl. the sync of its losses)
    logging.info(
        "training %d %s models (width %s, %s, %s) in %d wave(s) of %d on %d device(s), %d "
        "per model", m, cfg.model, cfg.width,
        jnp.dtype(compute_dtype(cfg)).name, self.formulation, num_waves, wave, ndev,
        ndev // self.num_groups)
    for w in range(num_waves):
      members = np.arange(w * wave, min((w + 1) * wave, m))
      # Pad the last wave with copies of its first model so every wave has the same shape.
      rows = np.concatenate([members, np.full(wave - len(members), members[0])])
      keys = self.keys(per_model((seeds[rows] % (2**32)).astype(np.uint32)))
      shared = (self.labels,) if self.usable_dev is None else (self.labels, self.usable_dev)
      keep, labels = self.subsets(per_model(prefixes[rows]), per_model(sizes[rows]),
                                  per_model(flip[rows]), *shared)
      states = self.init(keys)
      for ep in range(epochs):
        t_epoch = time.perf_counter()
        epoch = jnp.int32(ep)
        idx, valid = self.plan(keys, keep, epoch)
        losses = []
        step = self.step(crop_size(cfg, ep, self.train.images.shape[1]))
        for s in range(int(kept_steps[rows].max())):
          states, loss = step(states, keys, labels, idx, valid, self.images, epoch, jnp.int32(s))
          losses.append(loss)
        # One small sync per epoch, for the log (and to bound the dispatch queue).
        loss = _to_host(jnp.stack(losses).sum(0))[:len(members)] / kept_steps[members]
        epoch_seconds.append((ep, time.perf_counter() - t_epoch))
        meter.update(
            int(kept_steps[members].sum()) * bs,
            extra=(f"wave {w + 1}/{num_waves}, epoch {ep + 1}/{epochs}, "
                   f"mean loss {loss.mean():.4f}"))
      logits_out[members] = _to_host(self.predict(states, eval_dev))[:len(members), :e]
      if return_params:
        variables = _to_host({"params": states.params, "batch_stats": states.batch_stats})
        params_out.append(jax.tree_util.tree_map(lambda a, r=len(members): a[:r], variables))
      logging.info("%s (models done %d/%d)", meter.message(), members[-1] + 1, m)
    steady = float(
        np.median([t for ep, t in epoch_seconds if ep > 0] or [t for _, t in epoch_seconds]))
    stats = RunStats(models=m, wave=wave, waves=num_waves, epochs=epochs,
                     total_seconds=time.perf_counter() - t_start, train_seconds=float(
                         sum(t for _, t in epoch_seconds)), first_epoch_seconds=epoch_seconds[0][1],
                     steady_epoch_seconds=steady,
                     steady_seconds_per_model=steady * epochs * num_waves / m)
    if not return_params:
      return logits_out, stats
    return logits_out, stats, jax.tree_util.tree_map(lambda *a: np.concatenate(a), *params_out)

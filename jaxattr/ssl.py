"""MoCo pretraining in JAX, the reference's CIFAR-10 recipe (REFERENCE.md section 4).

Query encoder = lightly CIFAR ResNet backbone (SplitBatchNorm, 8 splits) + projection head
Linear(512, 512) -> ReLU -> Linear(512, 128). Key encoder = an exponential moving average
(m = 0.99) of the query encoder's parameters; like the reference it runs in training mode, so its
BatchNorm uses batch statistics and keeps running statistics of its own. Loss = InfoNCE
(temperature 0.1) of each query against its key and a FIFO memory bank of past keys, symmetric
in the two views (the bank is updated after each half, as the reference's loss module does).
Keys are computed on a shuffled batch and unshuffled ("batch shuffle"), so SplitBatchNorm groups
of the key encoder differ from the query's. SGD (momentum 0.9, weight decay 5e-4 on all
parameters), lr 0.06 per 128 examples, cosine decay per epoch.

Everything of one step happens in one jitted pure function `train_step(state, images, key)`;
images live on the device as uint8 and views are made inside jit (`jaxattr.augment`).
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.flatten_util
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxattr import augment
from jaxattr.models import get_encoder


class ProjectionHead(nn.Module):
  hidden_dim: int = 512
  out_dim: int = 128

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.relu(nn.Dense(self.hidden_dim, name="layers_0")(x))
    return nn.Dense(self.out_dim, name="layers_2")(x)


class MoCoNet(nn.Module):
  """Backbone + projection head: images [B, H, W, 3] -> (projection [B, out], feature [B, D])."""

  backbone: nn.Module
  head: nn.Module

  def __call__(self, x: jax.Array, train: bool = True) -> tuple[jax.Array, jax.Array]:
    feature = self.backbone(x, train=train)["feature"]
    return self.head(feature), feature


@flax.struct.dataclass
class MoCoState:
  step: jax.Array
  params: Any  # query encoder {'backbone', 'head'}
  batch_stats: Any
  ema_params: Any  # key encoder
  ema_batch_stats: Any
  opt_state: Any
  bank: jax.Array  # [memory_bank_size, proj_out_dim], L2-normalised keys, oldest first out
  bank_ptr: jax.Array  # int32 scalar: next slot to overwrite
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)


def moco_model(config: ml_collections.ConfigDict, split_layout: str = "interleaved") -> MoCoNet:
  """The query encoder of `config`: the encoder backbone plus the projection head.

  split_layout: the SplitBatchNorm groups' layout in training batches ('blocked' for the
  group-sorted batches of data-parallel training, `make_train_fn`); it does not change the
  parameters or evaluation.
  """
  extra = {} if split_layout == "interleaved" else {"split_layout": split_layout}
  backbone = get_encoder(config.encoder.name, **encoder_kwargs(config), **extra)
  head = ProjectionHead(config.pretrain.proj_hidden_dim, config.pretrain.proj_out_dim)
  return MoCoNet(backbone=backbone, head=head)


def encoder_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  enc = config.encoder
  return {"width": float(enc.width), "num_splits": int(enc.num_splits)}


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  return num_examples // batch_size  # drop_last, as the reference's loader


def lr_schedule(config: ml_collections.ConfigDict, num_examples: int):
  """Cosine over epochs, constant within an epoch (torch CosineAnnealingLR stepped per epoch)."""
  p = config.pretrain
  peak = p.base_lr * p.batch_size / 128
  spe = steps_per_epoch(num_examples, p.batch_size)

  def schedule(step):
    epoch = jnp.floor_divide(step, spe)
    return peak * 0.5 * (1 + jnp.cos(jnp.pi * epoch / p.epochs))

  return schedule


def make_optimizer(config: ml_collections.ConfigDict, num_examples: int):
  p = config.pretrain
  # torch SGD: g <- g + wd * p; buf <- m * buf + g; p <- p - lr * buf.
  return optax.chain(optax.add_decayed_weights(p.weight_decay),
                     optax.sgd(lr_schedule(config, num_examples), momentum=p.momentum))


def init_state(config: ml_collections.ConfigDict, key: jax.Array, image_shape: tuple[int, ...],
               num_examples: int) -> MoCoState:
  """Fresh state: query and key encoders equal, a random normalised memory bank (as lightly)."""
  model = moco_model(config)
  k_init, k_bank = jax.random.split(key)
  dummy = jnp.zeros((config.encoder.num_splits,) + tuple(image_shape), jnp.float32)
  variables = model.init(k_init, dummy, train=False)
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  tx = make_optimizer(config, num_examples)
  p = config.pretrain
  bank = jax.random.normal(k_bank, (p.memory_bank_size, p.proj_out_dim), jnp.float32)
  bank = bank / jnp.linalg.norm(bank, axis=1, keepdims=True)
  # Distinct buffers for the key encoder: the step donates the whole state.
  copy = functools.partial(jax.tree_util.tree_map, jnp.copy)
  return MoCoState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                   ema_params=copy(params), ema_batch_stats=copy(batch_stats),
                   opt_state=tx.init(params), bank=bank, bank_ptr=jnp.zeros((), jnp.int32), tx=tx)


def info_nce(query: jax.Array, key: jax.Array, bank: jax.Array, temperature: float) -> jax.Array:
  """Mean InfoNCE of queries [B, D] vs their keys [B, D] and negatives bank [K, D].

  Inputs need not be normalised (queries/keys are L2-normalised here, like lightly's NTXentLoss).
  """
  q = query / jnp.linalg.norm(query, axis=1, keepdims=True).clip(1e-12)
  k = key / jnp.linalg.norm(key, axis=1, keepdims=True).clip(1e-12)
  pos = jnp.sum(q * k, axis=1, keepdims=True)
  neg = q @ bank.T
  logits = jnp.concatenate([pos, neg], axis=1) / temperature
  return jnp.mean(jax.nn.logsumexp(logits, axis=1) - logits[:, 0])


def bank_enqueue(bank: jax.Array, ptr: jax.Array, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
  """FIFO: writes the L2-normalised keys [B, D] at `ptr` (wrapping), returns (bank, new ptr)."""
  size = bank.shape[0]
  k = keys / jnp.linalg.norm(keys, axis=1, keepdims=True).clip(1e-12)
  slots = (ptr + jnp.arange(k.shape[0])) % size
  return bank.at[slots].set(k.astype(bank.dtype)), (ptr + k.shape[0]) % size


def group_order(n: int, num_splits: int) -> np.ndarray:
  """Rows of a batch of n sorted by SplitBatchNorm group (group of row i: i % num_splits):
  group 0's rows first. A 'blocked' model on x[group_order] normalises exactly the groups an
  'interleaved' one forms on x."""
  return np.concatenate([np.arange(g, n, num_splits) for g in range(num_splits)])


def train_step(state: MoCoState, images: jax.Array, key: jax.Array, *, model: MoCoNet,
               config: ml_collections.ConfigDict, grouped: bool = False,
               sharding: Any = None) -> tuple[MoCoState, dict[str, jax.Array]]:
  """One MoCo step on a batch of uint8 images [B, H, W, 3]; `key` is this step's key.

  grouped: `model` has 'blocked' SplitBatchNorm groups; every application sorts its batch by
  group first and its outputs back, so the step computes what it computes with 'interleaved'
  groups (used where the batch is sharded over devices: each device then holds whole groups).
  sharding: the batch's sharding over devices (data parallel), kept on every model input.
  """
  p = config.pretrain
  n = images.shape[0]
  order = group_order(n, config.encoder.num_splits) if grouped else None
  back = None if order is None else np.argsort(order)

  def apply(variables, x, perm=None):
    # model.apply in training mode on x[perm] (x when perm is None), outputs in that order.
    rows = perm
    if order is not None:
      rows = order if rows is None else rows[order]
    x = x if rows is None else x[rows]
    if sharding is not None:
      x = jax.lax.with_sharding_constraint(x, sharding)
    (proj, _), upd = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return (proj if back is None else proj[back]), upd

  k_v0, k_v1, k_s0, k_s1 = jax.random.split(key, 4)
  out_size = images.shape[1]
  x0 = augment.simclr_views(k_v0, images, out_size, min_scale=p.min_scale)
  x1 = augment.simclr_views(k_v1, images, out_size, min_scale=p.min_scale)

  # The reference updates the key encoder before computing keys.
  m = p.ema_momentum
  ema_params = jax.tree_util.tree_map(lambda e, q: m * e + (1 - m) * q, state.ema_params,
                                      state.params)

  def keys_of(x, ema_stats, k_shuffle):
    perm = jax.random.permutation(k_shuffle, x.shape[0])
    proj, upd = apply({"params": ema_params, "batch_stats": ema_stats}, x, perm)
    unperm = jnp.zeros_like(perm).at[perm].set(jnp.arange(x.shape[0]))
    return jax.lax.stop_gradient(proj[unperm]), upd["batch_stats"]

  key1, ema_stats = keys_of(x1, state.ema_batch_stats, k_s0)
  bank1 = state.bank
  bank2, ptr2 = bank_enqueue(state.bank, state.bank_ptr, key1)
  key0, ema_stats = keys_of(x0, ema_stats, k_s1)
  bank3, ptr3 = bank_enqueue(bank2, ptr2, key0)

  def loss_fn(params):
    return query_loss(apply, params, state.batch_stats, (x0, x1, key1, key0), bank1, bank2,
                      p.temperature)

  if grouped and sharding is not None:
    # Each device differentiates the loss of its own whole groups, and the gradients cross the
    # devices as ONE flat all-reduce: from XLA's partial sums they would be one all-reduce of a
    # tuple of ~130 arrays, which the CPU collectives between processes (gloo) run array by array
    # (measured between 2 processes: 38.9 ms for 5.2 MB in 127 arrays, 3.9 ms as one array).
    rows = [x[order] for x in (x0, x1, key1, key0)]
    loss, batch_stats, grads = _group_gradients(model, state.params, state.batch_stats, rows, bank1,
                                                bank2, p.temperature, sharding)
  else:
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                      ema_params=ema_params, ema_batch_stats=ema_stats, opt_state=opt_state,
                      bank=bank3, bank_ptr=ptr3)
  return new, {"loss": loss}


def query_loss(apply, params, batch_stats, rows, bank1, bank2, temperature: float):
  """(loss, updated batch_stats) of the query encoder: the symmetric InfoNCE of the views x0 and
  x1 against the other view's keys and the memory bank as it stood before each view's keys were
  enqueued. rows = (x0, x1, key1, key0); apply(variables, x) -> (projection, updates)."""
  x0, x1, key1, key0 = rows
  q0, upd = apply({"params": params, "batch_stats": batch_stats}, x0)
  q1, upd = apply({"params": params, "batch_stats": upd["batch_stats"]}, x1)
  loss = 0.5 * (info_nce(q0, key1, bank1, temperature) + info_nce(q1, key0, bank2, temperature))
  return loss, upd["batch_stats"]


def _group_gradients(model: MoCoNet, params, batch_stats, rows, bank1, bank2, temperature: float,
                     sharding: NamedSharding):
  """`train_step`'s loss, query BatchNorm statistics and gradients for a grouped, data-parallel
  step: (loss, batch_stats, grads), computed per device under shard_map.

  rows: the views x0, x1 and their keys key1, key0, each sorted by group (`group_order`) and
  split over the mesh's 'data' axis, so every device holds whole SplitBatchNorm groups and their
  running statistics (`state_shardings`). Each device applies the 'blocked' model with its share
  of the groups to its rows; its share of the mean loss is weighted by its share of the rows, so
  the psums are the whole batch's loss and gradients.
  """
  axis = sharding.spec[0]
  devices = sharding.mesh.shape[axis]
  local_model = model.clone(backbone=model.backbone.clone(num_splits=model.backbone.num_splits //
                                                          devices))
  n = rows[0].shape[0]

  def apply(variables, x):
    (proj, _), upd = local_model.apply(variables, x, train=True, mutable=["batch_stats"])
    return proj, upd

  def local(params, stats, x0, x1, key1, key0, bank1, bank2):

    def loss_fn(params):
      loss, new_stats = query_loss(apply, params, stats, (x0, x1, key1, key0), bank1, bank2,
                                   temperature)
      return loss * (x0.shape[0] / n), new_stats

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    flat, unravel = jax.flatten_util.ravel_pytree(grads)
    return jax.lax.psum(loss, axis), new_stats, unravel(jax.lax.psum(flat, axis))

  split, whole = P(axis), P()
  return jax.shard_map(local, mesh=sharding.mesh, in_specs=(whole, split) + (split,) * 4 +
                       (whole, whole), out_specs=(whole, split, whole), check_vma=False)(
                           params, batch_stats, *rows, bank1, bank2)


def batch_indices(seed_key: jax.Array, step: jax.Array, num_examples: int,
                  batch_size: int) -> jax.Array:
  """Indices of step `step`'s batch: an epoch-wise permutation (drop_last), a pure function."""
  spe = num_examples // batch_size
  epoch, within = jnp.divmod(step, spe)
  perm = jax.random.permutation(jax.random.fold_in(seed_key, epoch), num_examples)
  return jax.lax.dynamic_slice_in_dim(perm, within * batch_size, batch_size)


def is_grouped(config: ml_collections.ConfigDict, mesh: Mesh | None) -> bool:
  """Whether data-parallel steps on `mesh` keep whole SplitBatchNorm groups on each device (the
  devices divide encoder.num_splits; `make_train_fn`)."""
  splits = int(config.encoder.num_splits)
  return mesh is not None and mesh.size > 1 and splits > 1 and splits % mesh.size == 0


def state_shardings(state: MoCoState, config: ml_collections.ConfigDict, mesh: Mesh) -> MoCoState:
  """Where each leaf of the state lives on `mesh`: replicated, except the BatchNorm running
  statistics of grouped steps, which are per group ([num_splits * C], group-major) and stay with
  the devices that own the groups (sharded over 'data': no collective updates them)."""
  replicated = NamedSharding(mesh, P())
  tree = jax.tree_util.tree_map(lambda _: replicated, state)
  if not is_grouped(config, mesh):
    return tree
  by_group = NamedSharding(mesh, P("data"))
  stats = functools.partial(jax.tree_util.tree_map, lambda _: by_group)
  return tree.replace(batch_stats=stats(state.batch_stats),
                      ema_batch_stats=stats(state.ema_batch_stats))


def make_train_fn(config: ml_collections.ConfigDict, model: MoCoNet, num_examples: int,
                  mesh: Mesh | None = None, state_sharding: MoCoState | None = None):
  """jit of (state, all images on device, root key) -> (state, metrics) for one step.

  With `mesh` (one axis, 'data', over the devices of any number of processes) the step is data
  parallel: state, images and key are replicated on every device, and every device gathers its own
  shard of each global batch from its copy of the images. The step's mathematics stay those of
  the global batch (GSPMD inserts the collectives): gradients, the split groups' BatchNorm
  statistics, the key encoder's batch shuffle and the memory bank are the same as on one device,
  up to the order of floating-point sums, and every device ends the step with the same state.
  Where the devices divide encoder.num_splits, the step is `grouped` (`train_step`): each device
  holds whole SplitBatchNorm groups, so their statistics need no communication; with
  `state_sharding` from `state_shardings`, neither do their running statistics, and the
  remaining collectives are few (the batch's reorderings, the keys, and the gradients as one flat
  all-reduce: `_group_gradients`).
  The root key may be given as its raw key data (uint32), as a replicated global array is.
  """
  batch_sharding = None if mesh is None else NamedSharding(mesh, P("data"))
  grouped = is_grouped(config, mesh)
  if grouped:
    model = model.clone(backbone=model.backbone.clone(split_layout="blocked"))

  def step_fn(state, all_images, root_key):
    if not jax.dtypes.issubdtype(root_key.dtype, jax.dtypes.prng_key):
      root_key = jax.random.wrap_key_data(root_key)
    k_perm, k_step = jax.random.split(root_key)
    idx = batch_indices(k_perm, state.step, num_examples, config.pretrain.batch_size)
    batch = jnp.take(all_images, idx, axis=0)
    if batch_sharding is not None:
      batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
    return train_step(state, batch, jax.random.fold_in(k_step, state.step), model=model,
                      config=config, grouped=grouped, sharding=batch_sharding)

  if mesh is None:
    return jax.jit(step_fn, donate_argnums=(0,))
  replicated = NamedSharding(mesh, P())
  if state_sharding is None:
    state_sharding = replicated
  return jax.jit(step_fn, donate_argnums=(0,), in_shardings=(state_sharding, replicated,
                                                             replicated),
                 out_shardings=(state_sharding, replicated))


# ----------------------------------------------------------------------------------------------
# kNN monitor


def knn_predict(train_feats: jax.Array, train_labels: jax.Array, test_feats: jax.Array,
                num_classes: int, k: int = 200, temperature: float = 0.1) -> jax.Array:
  """Weighted kNN (exp(sim / t) votes of the k most cosine-similar train features).

  Args:
    train_feats: [N, D]; train_labels: [N]; test_feats: [M, D].
  Returns:
    int32 [M] predicted classes.
  """
  tr = train_feats / jnp.linalg.norm(train_feats, axis=1, keepdims=True).clip(1e-12)
  te = test_feats / jnp.linalg.norm(test_feats, axis=1, keepdims=True).clip(1e-12)
  k = min(k, tr.shape[0])
  sim, idx = jax.lax.top_k(te @ tr.T, k)
  weights = jnp.exp(sim / temperature)
  votes = jax.nn.one_hot(train_labels[idx], num_classes) * weights[..., None]
  return jnp.argmax(votes.sum(1), axis=-1).astype(jnp.int32)


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, num_classes, k=200,
                 temperature=0.1, chunk: int = 1024) -> float:
  preds = []
  tf_, tl = jnp.asarray(train_feats), jnp.asarray(train_labels)
  fn = jax.jit(functools.partial(knn_predict, num_classes=num_classes, k=k,
                                 temperature=temperature))
  for s in range(0, len(test_feats), chunk):
    preds.append(np.asarray(fn(tf_, tl, jnp.asarray(test_feats[s:s + chunk]))))
  return float(np.mean(np.concatenate(preds) == np.asarray(test_labels)))

"""TRAK (Park et al. 2023) in JAX: per-example gradients, a seeded projection, the estimator.

For M classifiers trained on the full training set (`jaxattr.counterfactual.store`, different
seeds), each model m gives
  X_m [N, p]  the projected gradients of TRAK's output function, the correct-class margin
              f(z) = logit_y - logsumexp(logits without y), w.r.t. ALL parameters, of every
              training image (eval mode), divided by sqrt(#parameters) (as the `traker` package
              does, so X^T X stays well scaled);
  Q_m [N]     the one-minus-probability reweighting 1 - softmax(logits)_y of every training image;
  K_m [p, p]  (X_m^T X_m + lambda I)^-1 divided by its mean absolute entry (the `traker`
              package's normalisation, so each model's scores have a comparable scale);
and the scores of targets with projected gradients G_m [T, p] are
  scores [T, N] = (1/M sum_m G_m K_m X_m^T) * (1/M sum_m Q_m)[None, :].
Higher = the training image supports the target's correct-class margin more.

The projection P [#parameters, p] is never held whole: the rows of parameter leaf l (in
`jax.tree_util` order, each leaf flattened C-style) come in blocks of `block_rows` rows, block b
drawn from fold_in(fold_in(fold_in(key(seed), model), l), b) as Rademacher (+-1, 32 signs per
random 32-bit word) or Gaussian entries, on the device, when a chunk of examples is projected.
The result does not depend on the chunk size, the devices or the process count.

`Trak` runs the whole method for the attribution stage: it trains (or reloads) the models,
featurises the training set model by model into resumable chunk stores
(WORKDIR/trak/features/), computes the kernels, and scores any targets.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxattr import chunkstore, utils

PROJECTIONS = ("rademacher", "normal")


class TrakError(ValueError):
  """Bad TRAK settings or inputs (names the field or argument)."""


def margin(logits: jax.Array, label: jax.Array) -> jax.Array:
  """TRAK's output function for classification: log(p_y / (1 - p_y)) computed stably as
  logit_y - logsumexp(the other logits). logits [C], label int [] -> []."""
  logits = logits.astype(jnp.float32)
  others = jnp.where(jnp.arange(logits.shape[-1]) == label, -jnp.inf, logits)
  return logits[label] - jax.nn.logsumexp(others)


def margins(logits: jax.Array | np.ndarray, labels: jax.Array | np.ndarray) -> np.ndarray:
  """`margin` of every row: logits [..., E, C], labels int [E] -> float32 [..., E]."""
  logits = np.asarray(logits, np.float64)
  labels = np.asarray(labels)
  correct = np.take_along_axis(logits, np.broadcast_to(labels[:, None], logits.shape[:-1] + (1,)),
                               -1)[..., 0]
  others = logits.copy()
  np.put_along_axis(others, np.broadcast_to(labels[:, None], logits.shape[:-1] + (1,)), -np.inf, -1)
  top = others.max(-1, keepdims=True)
  lse = top[..., 0] + np.log(np.exp(others - top).sum(-1))
  return (correct - lse).astype(np.float32)


def out_to_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """TRAK's reweighting term 1 - softmax(logits)_y: logits [E, C], labels [E] -> [E]."""
  p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  return 1.0 - jnp.take_along_axis(p, labels[:, None], axis=-1)[:, 0]


@dataclasses.dataclass(frozen=True)
class Projection:
  """The seeded random projection to `dim` dimensions (module docstring)."""

  dim: int = 2048
  kind: str = "rademacher"
  seed: int = 0
  block_rows: int = 8192

  def __post_init__(self):
    if self.kind not in PROJECTIONS:
      raise TrakError(f"trak.projection must be one of {PROJECTIONS}, got {self.kind!r}")
    if self.dim < 1 or self.block_rows < 1:
      raise TrakError(f"trak.proj_dim ({self.dim}) and trak.block_rows ({self.block_rows}) must "
                      "be >= 1")

  def _block(self, key: jax.Array, rows: int) -> jax.Array:
    if self.kind == "rademacher":
      # 32 signs from each random 32-bit word: drawing the bits costs about as much per word as
      # per float, so this is ~30x cheaper than one draw per entry.
      words = jax.random.bits(key, (rows, -(-self.dim // 32)), jnp.uint32)
      bits = (words[:, :, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
      return bits.reshape(rows, -1)[:, :self.dim].astype(jnp.float32) * 2.0 - 1.0
    return jax.random.normal(key, (rows, self.dim), jnp.float32)

  def project(self, grads: Any, model: jax.Array | int) -> jax.Array:
    """grads: a pytree of per-example gradients, leaves [C, ...] -> [C, dim] = flat(grads) @ P_m.

    Traceable (`model` may be a traced int)."""
    base = jax.random.fold_in(jax.random.key(self.seed), model)
    out = None
    for li, leaf in enumerate(jax.tree_util.tree_leaves(grads)):
      g = leaf.reshape(leaf.shape[0], -1).astype(jnp.float32)
      key = jax.random.fold_in(base, li)
      rows, br = g.shape[1], self.block_rows
      if rows <= br:
        part = g @ self._block(jax.random.fold_in(key, 0), br)[:rows]
      else:
        nb = -(-rows // br)
        gb = jnp.pad(g, ((0, 0), (0, nb * br - rows))).reshape(g.shape[0], nb, br)

        def body(acc, b, gb=gb, key=key):
          block = self._block(jax.random.fold_in(key, b), br)
          return acc + jax.lax.dynamic_index_in_dim(gb, b, 1, keepdims=False) @ block, None

        part, _ = jax.lax.scan(body, jnp.zeros((g.shape[0], self.dim), jnp.float32), jnp.arange(nb))
      out = part if out is None else out + part
    return out

  def matrix(self, params: Any, model: int = 0) -> np.ndarray:
    """The whole P_m [#parameters, dim] for `params`' tree (tests, small models only)."""
    out = []
    base = jax.random.fold_in(jax.random.key(self.seed), model)
    for li, leaf in enumerate(jax.tree_util.tree_leaves(params)):
      rows, br = int(np.prod(leaf.shape)), self.block_rows
      key = jax.random.fold_in(base, li)
      blocks = [self._block(jax.random.fold_in(key, b), br) for b in range(-(-rows // br))]
      out.append(np.concatenate([np.asarray(b) for b in blocks])[:rows])
    return np.concatenate(out)


def num_parameters(params: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def featurizer(model: nn.Module, normalize: Callable[[jax.Array], jax.Array],
               project: Callable[[Any, jax.Array], jax.Array]) -> Callable:
  """fn(variables, images uint8 [C, H, W, 3], labels int32 [C], model int) -> (projected
  gradients [C, dim] / sqrt(#parameters), out-to-loss [C], margins [C]) of one model, eval mode.

  `project(grads, model)`: `Projection.project`, or any linear map of the gradient pytree (tests
  give one that both this and the `traker` package use)."""

  def fn(variables, images, labels, model_id):
    params = variables["params"]
    rest = {k: v for k, v in variables.items() if k != "params"}
    x = normalize(images)

    def out(p, xi, yi):
      logits = model.apply({"params": p, **rest}, xi[None], train=False)["logits"][0]
      return margin(logits, yi)

    grads = jax.vmap(jax.grad(out), in_axes=(None, 0, 0))(params, x, labels)
    scale = 1.0 / math.sqrt(num_parameters(params))
    logits = model.apply(variables, x, train=False)["logits"].astype(jnp.float32)
    f = jax.vmap(margin)(logits, labels)
    return project(grads, model_id) * scale, out_to_loss(logits, labels), f

  return fn


def kernel(x: np.ndarray, lambda_reg: float = 0.0, rows: int = 8192) -> np.ndarray:
  """(X^T X + lambda I)^-1 / mean|entries| [p, p] of X [N, p] (memory-mapped is fine): X^T X
  summed in float64 over row blocks, inverted in float64, returned as float32.

  Raises:
    TrakError: X^T X is singular (fewer training images than proj_dim and no lambda_reg).
  """
  p = x.shape[1]
  xtx = np.zeros((p, p), np.float64)
  for s in range(0, len(x), rows):
    b = np.asarray(x[s:s + rows], np.float64)
    xtx += b.T @ b
  xtx[np.diag_indices(p)] += float(lambda_reg)
  try:
    c = np.linalg.cholesky(xtx)
  except np.linalg.LinAlgError as e:
    raise TrakError(
        f"X^T X of the projected gradients ({len(x)} training images x proj_dim {p}) is "
        "singular: lower trak.proj_dim below the training images or set trak.lambda_reg > 0") from e
  inv_c = np.linalg.inv(c)
  inv = inv_c.T @ inv_c
  # Divided by its mean absolute entry, as the `traker` package (0.3) does: each model's scores
  # are rescaled by a constant before they are averaged over models.
  return (inv / np.abs(inv).mean()).astype(np.float32)


def topk_rows(scores: np.ndarray, train_labels: np.ndarray, target_labels: np.ndarray, k: int,
              same_class: bool) -> tuple[np.ndarray, np.ndarray]:
  """(positions int64 [T, k], scores float32 [T, k]) of the k largest scores per row, ties to the
  lower position; with same_class only training images of the target's label compete."""
  s = np.asarray(scores, np.float64)
  if same_class:
    s = np.where(train_labels[None, :] == np.asarray(target_labels)[:, None], s, -np.inf)
  # A stable sort of -s: equal scores keep position order.
  pos = np.argsort(-s, axis=1, kind="stable")[:, :k]
  return pos.astype(np.int64), np.take_along_axis(np.asarray(scores, np.float32), pos, 1)


class Trak:
  """TRAK of `config` (`trak` and `ensemble` sections) on the training set `train`."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, train: Any,
               trainer: Any = None, project: Callable | None = None):
    """trainer: an `ensemble.Trainer` on `train` to reuse (default: one is built); project:
    replaces the seeded projection (tests)."""
    from jaxattr.counterfactual import ensemble, store  # pylint: disable=g-import-not-at-top
    self.config, self.workdir, self.train = config, workdir, train
    tc = config.trak
    check_settings(tc)
    self.trainer = trainer if trainer is not None else ensemble.Trainer(config.ensemble, train)
    self.projection = Projection(int(tc.proj_dim), str(tc.projection), int(tc.seed),
                                 int(tc.block_rows))
    self.seeds = int(tc.seed) * 1000 + np.arange(int(tc.num_models))
    self.store = store.EnsembleStore(os.path.join(workdir, "trak", "models"), self.trainer,
                                     self.seeds)
    model = self.trainer.model
    normalize = functools.partial(ensemble.eval_normalize, config.ensemble)
    self._fn = featurizer(model, normalize, project or self.projection.project)
    # This process's devices: in a job of several processes, process 0 featurises alone.
    mesh = Mesh(np.asarray(jax.local_devices()), ("examples",))
    self._mesh = mesh
    shard = NamedSharding(mesh, P("examples"))
    # Each device featurises its block of a chunk (shard_map: XLA's automatic partitioning of
    # the vmap(grad) over a sharded batch gave wrong gradients on XLA:CPU, jax 0.10).
    sharded = jax.shard_map(self._fn, mesh=mesh, in_specs=(P(), P("examples"), P("examples"), P()),
                            out_specs=(P("examples"),) * 3, check_vma=False)
    self._featurize = jax.jit(
        sharded, in_shardings=(NamedSharding(mesh, P()), shard, shard, NamedSharding(mesh, P())),
        out_shardings=(shard, shard, shard))
    self.chunk = int(tc.chunk_size)
    self.chunk += -self.chunk % len(jax.local_devices())
    self.key = utils.config_hash({
        "models": self.store.key,
        "trak": {
            k: tc[k] for k in ("proj_dim", "projection", "seed", "block_rows")
        },
        "custom_projection": project is not None,  # the store's key covers the data
    })
    self._variables = None
    self._kernels: list[np.ndarray] = []
    self._features: list[np.ndarray] = []
    self.q: np.ndarray | None = None

  @property
  def feature_dir(self) -> str:
    return os.path.join(self.workdir, "trak", "features")

  def variables(self) -> Any:
    """The M models' variables [M, ...] (trained now unless the store holds them)."""
    if self._variables is None:
      self._variables = self.store.train()
    return self._variables

  def _model(self, variables: Any, m: int) -> Any:
    return jax.tree_util.tree_map(lambda a: a[m], variables)

  def featurize(self, variables: Any, images: np.ndarray, labels: np.ndarray, m: int,
                meter: utils.Throughput | None = None) -> tuple[np.ndarray, ...]:
    """(X [E, dim], Q [E], margins [E]) of model m's variables for uint8 images, chunk by chunk."""
    outs = []
    # Placed explicitly: in a job of several processes jit refuses host arrays with shardings
    # (this mesh is the process's own devices).
    replicated = NamedSharding(self._mesh, P())
    shard = NamedSharding(self._mesh, P("examples"))
    variables = jax.device_put(variables, replicated)
    model_id = jax.device_put(np.int32(m), replicated)
    for s in range(0, len(images), self.chunk):
      x, y = images[s:s + self.chunk], np.asarray(labels[s:s + self.chunk], np.int32)
      n = len(x)
      if n < self.chunk:  # one shape: pad the last chunk
        x = np.concatenate([x, np.zeros((self.chunk - n,) + x.shape[1:], x.dtype)])
        y = np.concatenate([y, np.zeros(self.chunk - n, np.int32)])
      out = self._featurize(variables, jax.device_put(x, shard), jax.device_put(y, shard), model_id)
      outs.append([np.asarray(o)[:n] for o in out])
      if meter is not None:
        meter.update(n)
    return tuple(np.concatenate(parts) for parts in zip(*outs))

  def prepare(self) -> None:
    """Trains or loads the models; featurises the training set per model (resumable chunk
    stores); computes the kernels and the mean reweighting Q."""
    if self._kernels:
      return
    variables = self.variables()
    n, dim, m_count = len(self.train.images), self.projection.dim, len(self.seeds)
    os.makedirs(self.feature_dir, exist_ok=True)
    qs = []
    meter = utils.Throughput("trak featurisation", total=n * m_count, unit="images",
                             every_s=float(self.config.ensemble.log_every_s))
    for m in range(m_count):
      path = os.path.join(self.feature_dir, f"model_{m:04d}.npy")
      # Per model: TRAK-5's features of model m are TRAK-100's (same seed, same projection).
      key = utils.config_hash({"trak": self.key, "model": m, "seed": int(self.seeds[m])})
      q_path = os.path.join(self.feature_dir, f"model_{m:04d}.q.npz")
      done = _q_matches(q_path, key) and os.path.exists(path)
      if not done:
        cs = chunkstore.ChunkStore(path, (n, dim), np.float32, self.chunk * 8, key)
        one = self._model(variables, m)
        for j, start, stop in cs.missing(meter):
          x, q, _ = self.featurize(one, self.train.images[start:stop],
                                   self.train.labels[start:stop], m, meter)
          cs.write(j, x, q=q)
          logging.log_every_n_seconds(logging.INFO, "%s (model %d/%d)", 10.0, meter.message(),
                                      m + 1, m_count)
        q = cs.extras("q")
        cs.finish()
        utils.save_npz(q_path, q=q.astype(np.float32), key=np.asarray(key))
      with np.load(q_path) as z:
        qs.append(z["q"])
      x = np.load(path, mmap_mode="r")
      k_path = os.path.join(self.feature_dir, f"model_{m:04d}.kernel.npz")
      if _q_matches(k_path, utils.config_hash({"x": key, "lambda": self.config.trak.lambda_reg})):
        with np.load(k_path) as z:
          kern = z["kernel"]
      else:
        kern = kernel(x, float(self.config.trak.lambda_reg))
        utils.save_npz(
            k_path, kernel=kern, key=np.asarray(
                utils.config_hash({
                    "x": key,
                    "lambda": self.config.trak.lambda_reg
                })))
      self._kernels.append(kern)
      self._features.append(x)
    self.q = np.mean(qs, axis=0).astype(np.float32)
    logging.info("trak: %d model(s) ready (%s)", m_count,
                 meter.message() if meter.done else "features loaded from disk")

  def scores(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """float32 [T, N] TRAK scores of targets (uint8 images [T, H, W, 3], labels [T]) for every
    training image."""
    self.prepare()
    variables = self.variables()
    t0 = time.perf_counter()
    acc = np.zeros((len(images), len(self.train.images)), np.float64)
    for m in range(len(self.seeds)):
      g, _, _ = self.featurize(self._model(variables, m), images, labels, m)
      acc += (g.astype(np.float64) @ self._kernels[m]) @ np.asarray(self._features[m]).T
    out = (acc / len(self.seeds) * self.q[None, :]).astype(np.float32)
    logging.info("trak: scored %d targets with %d model(s) in %.1fs (%.1f targets/s)", len(images),
                 len(self.seeds),
                 time.perf_counter() - t0,
                 len(images) / max(time.perf_counter() - t0, 1e-9))
    if not np.all(np.isfinite(out)):
      raise TrakError("TRAK scores are not finite: the models diverged or X^T X is near "
                      "singular (raise trak.lambda_reg)")
    return out


def _q_matches(path: str, key: str) -> bool:
  if not os.path.exists(path):
    return False
  try:
    with np.load(path) as z:
      return str(z["key"]) == key
  except (OSError, ValueError, KeyError):
    return False


def check_settings(tc: ml_collections.ConfigDict) -> None:
  """Raises TrakError naming the first bad `trak.<field>`."""
  for name in ("num_models", "proj_dim", "chunk_size", "block_rows"):
    v = tc[name]
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
      raise TrakError(f"trak.{name} must be an int >= 1, got {v!r}")
  if tc.projection not in PROJECTIONS:
    raise TrakError(f"trak.projection must be one of {PROJECTIONS}, got {tc.projection!r}")
  if not np.isfinite(tc.lambda_reg) or tc.lambda_reg < 0:
    raise TrakError(f"trak.lambda_reg must be a finite number >= 0, got {tc.lambda_reg!r}")

"""Top-k attribution for many targets: chunked, sharded over devices, streamed and resumable.

`topk` ranks training candidates for each target by the Exemplar-SVM decision value (``esvm``,
descending), the Euclidean distance (``l2``, ascending) or the cosine similarity (``cosine``).
With `same_class`, a target's candidates are the training examples of its label (the paper's
default) and targets of one class share one candidate matrix. Targets go in chunks of a fixed,
padded shape, sharded over all devices; candidate sets are padded (`padded_sizes`) and masked,
so classes of slightly different sizes share one compiled program. The top k are selected on
the device, or on the host for CPU devices (`host_topk`, same order). With a `chunk_dir`, every
finished chunk is written to disk at once and a restarted run skips it (only a run with the same
inputs, exact content hashes, and settings: `_prepare_chunk_dir`).

Inputs are checked before any solve (`check_inputs`); results after it: NaN/inf scores raise an
`AttributionError`, targets whose ESVM did not converge a `NotConvergedError` (unless
``allow_nonconverged``).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import numbers
import os
import shutil
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxattr import fingerprint, utils
from jaxattr.attribute import esvm
from jaxattr.attribute.options import AttributionError, NotConvergedError, SolverOptions
from jaxattr.attribute.selection import host_topk
from jaxattr.attribute.solver import Solver

METHODS = ("esvm", "l2", "cosine")
CANDIDATE_BUCKET = 128  # candidate set sizes in one bucket of this width share a padded size
TARGET_AXIS = "targets"


@dataclasses.dataclass
class TopK:
  """Result of `topk`.

  Attributes:
    indices: int64 [targets, k], train `index` values, best first.
    scores: float32 [targets, k], the method's score of each (decision value, distance, cosine).
    targets: int64 [targets], test positions (rows of the test features) of the targets.
    stats: the `esvm.SolverStats` fields as arrays [targets] (empty for l2/cosine).
    seconds: wall-clock seconds of the solve (excluding chunks loaded from disk).
    computed_targets: targets solved in this call (not loaded from a previous run).
  """

  indices: np.ndarray
  scores: np.ndarray
  targets: np.ndarray
  stats: dict[str, np.ndarray]
  seconds: float = 0.0
  computed_targets: int = 0

  @property
  def nonconverged(self) -> np.ndarray:
    """Test positions of targets whose ESVM did not converge."""
    if "converged" not in self.stats:
      return np.zeros((0,), np.int64)
    return self.targets[~self.stats["converged"]]


def _describe(a: np.ndarray) -> str:
  return f"shape {a.shape} {a.dtype}"


def _class_ids(name: str, labels: Any) -> np.ndarray:
  """int64 [N] labels; whole-number floats (e.g. labels saved as float) are accepted as such.

  Args:
    name: the argument, for the messages ('train_labels', 'test_labels').
    labels: 1-D non-negative integer class ids.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise AttributionError(f"{name} must be 1-D integer class ids [N], got {_describe(labels)}")
  whole = (np.issubdtype(labels.dtype, np.floating) and
           bool(np.all(np.isfinite(labels) & (np.mod(labels, 1) == 0))))
  if not (np.issubdtype(labels.dtype, np.integer) or whole):
    raise AttributionError(
        f"{name} must be integer class ids, got {labels.dtype} (first values: "
        f"{labels[:5].tolist()}); pass the labels as saved by the features stage")
  if len(labels) and labels.min() < 0:
    first = np.flatnonzero(labels < 0)[:5].tolist()
    raise AttributionError(f"{name} must be non-negative class ids, got {labels.min()} "
                           f"(at positions {first})")
  return labels.astype(np.int64)


def _check_features(name: str, features: np.ndarray, labels_name: str, labels: np.ndarray) -> None:
  if features.ndim != 2 or not np.issubdtype(features.dtype, np.floating):
    raise AttributionError(f"{name} must be floating point [N, d], got {_describe(features)}")
  if features.shape[1] < 1:
    raise AttributionError(f"{name} must have at least one feature column, got "
                           f"{_describe(features)}")
  if len(labels) != len(features):
    raise AttributionError(f"{name} has {len(features)} rows but {labels_name} has "
                           f"{len(labels)} labels; both come from one features file")
  bad = esvm.nonfinite_rows(features)
  if len(bad):
    values = int(np.sum(~np.isfinite(features[bad])))
    raise AttributionError(
        f"{name} {_describe(features)} contains NaN/inf ({values} values) or values beyond "
        f"float32's range in {len(bad)} of {len(features)} rows (first: {bad[:10].tolist()}); "
        "re-extract the features or drop those rows")


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def check_inputs(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                 test_labels: np.ndarray, targets: Any, method: str, k: int, same_class: bool,
                 train_index: np.ndarray | None = None, train_ok: np.ndarray | None = None) -> None:
  """Raises AttributionError for any input that would make the attribution meaningless.

  The arguments are `topk`'s: features floating point [N, d] without NaN/inf (nor values beyond
  float32's range), labels 1-D non-negative integer class ids (whole-number floats accepted) of
  the features' length, targets a non-empty 1-D integer array of distinct test positions, k a
  positive integer no larger than any candidate set, train_index 1-D integer [n_train],
  train_ok None or bool [n_train] (False: never a candidate).
  """
  if method not in METHODS:
    raise AttributionError(f"unknown attribution method {method!r}; expected one of {METHODS}")
  train_features, test_features = np.asarray(train_features), np.asarray(test_features)
  train_labels = _class_ids("train_labels", train_labels)
  test_labels = _class_ids("test_labels", test_labels)
  _check_features("train_features", train_features, "train_labels", train_labels)
  _check_features("test_features", test_features, "test_labels", test_labels)
  if train_features.shape[1] != test_features.shape[1]:
    raise AttributionError(
        f"feature dims differ: train_features {_describe(train_features)}, test_features "
        f"{_describe(test_features)}; both must come from one encoder")
  if train_index is not None:
    train_index = np.asarray(train_index)
    if (train_index.shape != (len(train_features),) or
        not np.issubdtype(train_index.dtype, np.integer)):
      raise AttributionError(
          f"train_index must be integer [{len(train_features)}] (one per train_features row), "
          f"got {_describe(train_index)}")
  targets = np.asarray(targets)
  if targets.ndim != 1 or len(targets) == 0:
    raise AttributionError(
        f"targets must be a non-empty 1-D list of test positions, got {_describe(targets)}")
  if not np.issubdtype(targets.dtype, np.integer):
    raise AttributionError(f"targets must be integer test positions, got {targets.dtype} "
                           f"(first values: {targets[:5].tolist()})")
  out = (targets < 0) | (targets >= len(test_features))
  if out.any():
    raise AttributionError(
        f"target positions out of range [0, {len(test_features)}) of test_features: "
        f"{targets[out][:10].tolist()}")
  if len(np.unique(targets)) != len(targets):
    raise AttributionError("target positions contain duplicates")
  if not _is_int(k) or k < 1:
    raise AttributionError(f"k must be a positive integer, got {k!r}")
  ok = _candidate_mask(train_ok, len(train_features))
  skipped = (f" ({int((~ok).sum())} unreadable training images, skipped when the features were "
             "extracted, are no candidates)" if not ok.all() else "")
  if same_class:
    counts = candidate_counts(train_labels, ok)
    for c in np.unique(test_labels[targets]).tolist():
      if counts.get(c, 0) == 0:
        raise AttributionError(f"class {c} has targets but no training candidates{skipped}")
      if counts[c] < k:
        raise AttributionError(
            f"k={k} is larger than class {c}, which has {counts[c]} training candidates{skipped}; "
            "lower k (e.g. --config.attribution.k) or set same_class=False")
  elif ok.sum() < k:
    raise AttributionError(f"k={k} is larger than the {int(ok.sum())} training examples{skipped}")


def _candidate_mask(train_ok: Any, n_train: int) -> np.ndarray:
  """bool [n_train]: which training rows may be ranked (all when `train_ok` is None)."""
  if train_ok is None:
    return np.ones(n_train, bool)
  ok = np.asarray(train_ok)
  if ok.shape != (n_train,) or ok.dtype != np.bool_:
    raise AttributionError(f"train_ok must be bool [{n_train}] (one per train_features row), got "
                           f"{_describe(ok)}")
  return ok


def candidate_counts(train_labels: np.ndarray, ok: np.ndarray) -> dict[int, int]:
  """{class: training rows of that label that may be ranked}."""
  classes, counts = np.unique(np.asarray(train_labels)[ok], return_counts=True)
  return dict(zip(classes.tolist(), counts.tolist()))


def _ranked_topk(scores, ranked, valid, k, on_host):
  """(positions, scores) of the k largest `ranked` per row; ties: lower position first.

  With `on_host` nothing is selected: (ranked with padding at -inf, scores) come back whole for
  `host_topk`, scores None when they are `ranked` (esvm, cosine): one [B, n] array to the host.
  """
  same = ranked is scores
  ranked = jnp.where(valid[None, :], ranked, -jnp.inf)
  if on_host:
    return ranked, None if same else scores
  _, pos = jax.lax.top_k(ranked, k)
  return pos, jnp.take_along_axis(scores, pos, axis=1)


def _score_fn(method: str, k: int, on_host: bool):
  """(targets [T, d], candidates [n, d], valid [n]) -> (positions, scores), per device."""

  def fn(targets, candidates, valid):
    if method == "l2":
      # Squared distance by expansion keeps the work a matrix product; ties are broken by
      # position (top_k is stable) exactly as for the other scores.
      sq = (jnp.sum(targets * targets, -1)[:, None] - 2.0 * targets @ candidates.T +
            jnp.sum(candidates * candidates, -1)[None, :])
      return _ranked_topk(jnp.sqrt(jnp.maximum(sq, 0.0)), -sq, valid, k, on_host)
    tn = targets / jnp.maximum(jnp.linalg.norm(targets, axis=-1, keepdims=True), 1e-12)
    cn = candidates / jnp.maximum(jnp.linalg.norm(candidates, axis=-1, keepdims=True), 1e-12)
    scores = tn @ cn.T
    return _ranked_topk(scores, scores, valid, k, on_host)

  return fn


# On CPU devices the scoring program runs over a chunk in slices of this many targets, whose
# [slice, n] arrays stay in cache.
CPU_FINISH_SLICE = 128


def _esvm_finish_fn(tol: float, k: int, on_host: bool, on_cpu: bool):
  """(targets, weights, iterations, step, cset) -> (positions, scores, stats), per device."""

  def fn(targets, w, iterations, step, cset):
    scores, st = esvm.finish(targets, w, cset, iterations, step, tol)
    pos, top = _ranked_topk(scores, scores, cset.caller_order(cset.valid), k, on_host)
    return pos, top, st._asdict()

  def sliced(targets, w, iterations, step, cset):
    b, size = targets.shape[0], CPU_FINISH_SLICE
    if not on_cpu or b % size or b == size:
      return fn(targets, w, iterations, step, cset)
    parts = tuple(
        a.reshape((b // size, size) + a.shape[1:]) for a in (targets, w, iterations, step))
    out = jax.lax.map(lambda args: fn(*args, cset), parts)
    return jax.tree.map(lambda a: a.reshape((b,) + a.shape[2:]), out)

  return sliced


@functools.lru_cache(maxsize=16)
def _sharded_fn(method: str, options: SolverOptions, k: int, mesh: Mesh, on_host: bool):
  # Cached so that repeated `topk` calls with the same settings reuse the compiled programs.
  if method == "esvm":
    solver = Solver(options, mesh=mesh)
    finish = jax.jit(
        jax.shard_map(_esvm_finish_fn(options.tol, k, on_host, solver.on_cpu), mesh=mesh,
                      in_specs=(P(TARGET_AXIS),) * 4 + (P(),), out_specs=P(TARGET_AXIS),
                      check_vma=False))
    return solver, finish
  fn = _score_fn(method, k, on_host)
  return None, jax.jit(
      jax.shard_map(fn, mesh=mesh, in_specs=(P(TARGET_AXIS), P(), P()), out_specs=P(TARGET_AXIS),
                    check_vma=False))


class _ChunkRunner:
  """Compiles (once per candidate bucket) and runs one chunk sharded over the targets axis.

  ESVM chunks are solved by `Solver`, then scored by one compiled program; l2/cosine by one
  program. The top k are picked by that program on accelerators, by `host_topk` on CPU devices.
  """

  def __init__(self, method: str, options: SolverOptions, k: int,
               devices: Sequence[jax.Device] | None = None, select_on_host: bool | None = None):
    # This process's devices: in a multi-process job each process solves its own chunks.
    devices = list(devices or jax.local_devices())
    self.mesh = Mesh(np.array(devices), (TARGET_AXIS,))
    self.num_devices = len(devices)
    self.targets_sharding = NamedSharding(self.mesh, P(TARGET_AXIS))
    self.replicated = NamedSharding(self.mesh, P())
    self.k = int(k)
    self.on_host = (devices[0].platform == "cpu"
                    if select_on_host is None else bool(select_on_host))
    self.solver, self.fn = _sharded_fn(method, options, self.k, self.mesh, self.on_host)

  def put_candidates(self, candidates: np.ndarray, padded: int):
    """Pads a candidate set [n, d] to `padded` rows and places it on the devices: (x, valid), or
    for ESVM the solver's `esvm.CandidateSet`."""
    n = len(candidates)
    x = np.zeros((padded, candidates.shape[1]), np.float32)
    x[:n] = candidates
    valid = np.zeros((padded,), bool)
    valid[:n] = True
    if self.solver is not None:
      return (self.solver.prepare(x, valid),)
    return jax.device_put(x, self.replicated), jax.device_put(valid, self.replicated)

  def __call__(self, targets: np.ndarray, candidates, num_real: int):
    """(positions [B, k], scores [B, k], stats) of a padded chunk of targets [B, d].

    The ESVM solver solves the first `num_real` rows only; the padding takes the first's result.
    """
    targets = targets.astype(np.float32)
    if self.solver is None:
      t = jax.device_put(targets, self.targets_sharding)
      out = jax.device_get(self.fn(t, *candidates)) + ({},)
    else:
      (cset,) = candidates
      m = int(num_real)
      solved = self.solver(targets[:m], cset)
      fill = np.r_[np.arange(m), np.zeros((len(targets) - m,), np.int64)]
      t, w, iterations, step = (
          jax.device_put(a[fill], self.targets_sharding) for a in (targets, *solved))
      out = jax.device_get(self.fn(t, w, iterations, step, cset))
    if self.on_host:
      ranked, scores = out[0], out[1]
      return host_topk(ranked, ranked if scores is None else scores, self.k) + (out[2],)
    return out


def padded_sizes(sizes: Sequence[int]) -> dict[int, int]:
  """The padded row count of each candidate set size: the largest of `sizes` in its bucket.

  Sizes that round up to the same multiple of CANDIDATE_BUCKET share one padded size (one
  compiled program per step shape), but none is padded beyond the largest real one (CIFAR-10's
  classes, all 5,000, are not padded to 5,120).
  """
  top: dict[int, int] = {}
  for n in sizes:
    bucket = -(-int(n) // CANDIDATE_BUCKET)
    top[bucket] = max(top.get(bucket, 0), int(n))
  return {int(n): top[-(-int(n) // CANDIDATE_BUCKET)] for n in sizes}


def plan_chunks(test_labels: np.ndarray, targets: np.ndarray, same_class: bool,
                chunk_size: int) -> list[tuple[int, np.ndarray]]:
  """[(class or -1, positions into `targets`)] in a fixed order: class, then target order."""
  if same_class:
    groups = [
        (int(c), np.flatnonzero(test_labels[targets] == c)) for c in np.unique(test_labels[targets])
    ]
  else:
    groups = [(-1, np.arange(len(targets)))]
  return [(c, members[i:i + chunk_size])
          for c, members in groups
          for i in range(0, len(members), chunk_size)]


def topk(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
         test_labels: np.ndarray, *, method: str = "esvm", k: int = 1280, same_class: bool = True,
         targets: Sequence[int] | np.ndarray | None = None, train_index: np.ndarray | None = None,
         options: SolverOptions = SolverOptions(), chunk_size: int = 1024,
         devices: Sequence[jax.Device] | None = None, chunk_dir: str | None = None,
         log_every_s: float = 10.0, select_on_host: bool | None = None,
         allow_nonconverged: bool = False, shard: tuple[int, int] | None = None,
         train_ok: np.ndarray | None = None) -> TopK:
  """Ranks training examples for each target and keeps the best k.

  Args:
    train_features, train_labels: float [n_train, d] candidate features, int [n_train] labels.
    test_features, test_labels: float [n_test, d] target features, int [n_test] labels.
    method: 'esvm', 'l2' or 'cosine'.
    k: examples kept per target.
    same_class: restrict a target's candidates to training examples of its label.
    targets: test positions to attribute (default: all).
    train_index: int64 [n_train] train indices returned in `indices` (default: positions).
    options: the ESVM solver's options.
    chunk_size: targets per step, rounded up to a multiple of the devices. Device memory grows
      with chunk_size x candidates (scores; the solver's decision values, on every device).
    devices: devices of the targets mesh (default: all).
    chunk_dir: if set, each finished chunk is saved there and reused by a rerun with the same
      arguments (resume after a kill).
    log_every_s: seconds between progress logs.
    select_on_host: pick the top k on the host (`host_topk`), not the devices (same result).
      None: on the host for CPU devices, where it is faster.
    allow_nonconverged: return targets whose ESVM did not converge within options.max_iter
      (listed by `TopK.nonconverged`) instead of raising NotConvergedError.
    shard: (i, n): compute only chunks j with j % n == i (with chunk_dir: the chunks of other
      shards are read where present, else left zero in the result). The processes of a job, or
      n separate jobs, each run their shard; a call without `shard` then assembles the result
      from the chunk files.
    train_ok: bool [n_train], False for rows never to rank (unreadable images that the features
      stage skipped, `ok` in its npz); None: every row is a candidate.

  Returns:
    A `TopK` with rows in the order of `targets`.

  Raises:
    AttributionError: bad input (see `check_inputs`; bad options or chunk_size), before any
      solve; or, at the first chunk that has them, targets with NaN/inf scores (ESVM: C too
      large for the features' scale), before that chunk is saved.
    NotConvergedError: (an AttributionError) some ESVM did not converge and not
      `allow_nonconverged`; raised after every chunk is done (and saved to `chunk_dir`).
  """
  if not isinstance(options, SolverOptions):
    raise AttributionError(
        f"options must be a SolverOptions (e.g. SolverOptions.from_config(config.attribution)), "
        f"got {type(options).__name__}")
  if not _is_int(chunk_size) or chunk_size < 1:
    raise AttributionError(f"chunk_size must be positive (an integer), got {chunk_size!r}")
  if shard is not None and (chunk_dir is None or not 0 <= shard[0] < shard[1]):
    raise AttributionError(f"shard={shard!r} needs 0 <= i < n and a chunk_dir (the shards' "
                           "chunks are assembled from it)")
  train_features = np.asarray(train_features)
  test_features = np.asarray(test_features)
  targets = np.arange(len(test_features)) if targets is None else np.asarray(targets)
  check_inputs(train_features, train_labels, test_features, test_labels, targets, method, k,
               same_class, train_index, train_ok)
  ok = _candidate_mask(train_ok, len(train_features))
  train_labels = _class_ids("train_labels", train_labels)
  test_labels = _class_ids("test_labels", test_labels)
  targets = targets.astype(np.int64)
  train_index = (np.arange(len(train_features))
                 if train_index is None else np.asarray(train_index)).astype(np.int64)

  runner = _ChunkRunner(method, options, k, devices, select_on_host)
  chunk_size = -(-chunk_size // runner.num_devices) * runner.num_devices
  plan = plan_chunks(test_labels, targets, same_class, chunk_size)
  # Candidate set sizes of the classes this run visits, and their padded sizes.
  if same_class:
    counts = candidate_counts(train_labels, ok)
    set_size = {int(c): counts[int(c)] for c, _ in plan}
  else:
    set_size = {-1: int(ok.sum())}
  padded = padded_sizes(list(set_size.values()))
  if chunk_dir is not None:
    _prepare_chunk_dir(
        chunk_dir,
        chunk_key(method, k, same_class, options, chunk_size, targets, train_features, train_labels,
                  train_index, test_features, test_labels, ok))

  indices = np.zeros((len(targets), k), np.int64)
  scores = np.zeros((len(targets), k), np.float32)
  stats: dict[str, np.ndarray] = {}
  progress = utils.Throughput(f"attribution[{method}]", len(targets), "targets", log_every_s)
  seconds, computed = 0.0, 0
  current_class, cand = None, None
  for i, (c, members) in enumerate(plan):
    path = os.path.join(chunk_dir, f"chunk_{i:06d}.npz") if chunk_dir else None
    if shard is not None and i % shard[1] != shard[0] and not os.path.exists(path):
      continue  # another shard's chunk
    if path and os.path.exists(path):
      with np.load(path) as z:
        part = {name: z[name] for name in z.files}
      _check_finite(method, options, part["scores"], targets[members], i, len(plan))
      progress.done += len(members)
    else:
      if c != current_class or cand is None:
        cand_pos = np.flatnonzero(ok & (train_labels == c) if same_class else ok)
        cand = (cand_pos, runner.put_candidates(train_features[cand_pos], padded[set_size[c]]))
        current_class = c
      start = time.perf_counter()
      rows = np.zeros((chunk_size, test_features.shape[1]), np.float32)
      rows[:len(members)] = test_features[targets[members]]
      # Padding rows repeat the first target: a real, well-posed problem (no special cases in
      # the solver) whose result is dropped.
      rows[len(members):] = rows[0]
      m = len(members)
      pos, sc, st = runner(rows, cand[1], m)
      part = {"indices": train_index[cand[0][pos[:m]]], "scores": sc[:m].astype(np.float32)}
      part.update({f"stat_{name}": np.asarray(v)[:m] for name, v in st.items()})
      seconds += time.perf_counter() - start
      computed += m
      _check_finite(method, options, part["scores"], targets[members], i, len(plan))
      if path:
        utils.save_npz(path, **part)
      progress.update(m, extra=f"chunk {i + 1}/{len(plan)}")
    indices[members] = part["indices"]
    scores[members] = part["scores"]
    for name, v in part.items():
      if name.startswith("stat_"):
        stats.setdefault(name[5:], np.zeros((len(targets),), v.dtype))[members] = v
  logging.info("%s", progress.message("done"))
  result = TopK(indices, scores, targets, stats, seconds, computed)
  bad = result.nonconverged
  if len(bad) and not allow_nonconverged:
    raise NotConvergedError(
        f"topk[{method}]: the ESVM of {len(bad)} of {len(targets)} targets did not converge "
        f"(test positions {bad[:20].tolist()}) within attribution.max_iter={options.max_iter} "
        f"iterations at attribution.tol={options.tol:g}; raise attribution.max_iter or "
        f"attribution.max_rows (now {options.max_rows}), loosen attribution.tol, or pass "
        "allow_nonconverged=True to get them (TopK.nonconverged lists them)" +
        (f"; the finished chunks in {chunk_dir} are reused by a rerun" if chunk_dir else ""))
  return result


def _check_finite(method: str, options: SolverOptions, scores: np.ndarray, positions: np.ndarray,
                  chunk: int, num_chunks: int) -> None:
  """Raises AttributionError if some target of a chunk has a NaN/inf top-k score (its ranking is
  then arbitrary): positions are the chunk's targets' test positions."""
  bad = ~np.isfinite(scores).all(axis=1)
  if not bad.any():
    return
  if method == "esvm":
    hint = (f"at attribution.C={options.C:g} the float32 ESVM problem is too ill-conditioned: "
            "lower attribution.C (sklearn's default is 0.1) or scale the features down")
  else:
    hint = "the features are too large for float32 distances: scale them down"
  raise AttributionError(
      f"topk[{method}]: non-finite (NaN/inf) scores for {int(bad.sum())} of the {len(bad)} "
      f"targets of chunk {chunk + 1}/{num_chunks} (test positions {positions[bad][:20].tolist()}; "
      f"later chunks not solved); {hint}")


def chunk_key(method: str, k: int, same_class: bool, options: SolverOptions, chunk_size: int,
              targets: np.ndarray, train_features: np.ndarray, train_labels: np.ndarray,
              train_index: np.ndarray, test_features: np.ndarray, test_labels: np.ndarray,
              train_ok: np.ndarray | None = None) -> dict[str, Any]:
  """What a `topk` call's chunk files belong to (its settings and its inputs' fingerprints);
  chunk_size already rounded to the devices; `train_ok` counts only when some row is excluded
  (so chunks written before it existed stay valid)."""
  key = dict(method=method, k=k, same_class=same_class, options=dataclasses.asdict(options),
             chunk_size=chunk_size,
             targets=fingerprint.arrays_fingerprint(targets), train=fingerprint.arrays_fingerprint(
                 train_features, train_labels, train_index), test=fingerprint.arrays_fingerprint(
                     test_features, test_labels))
  if train_ok is not None and not np.all(train_ok):
    key["excluded"] = np.flatnonzero(~np.asarray(train_ok, bool)).tolist()
  return key


def chunk_hash(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
               test_labels: np.ndarray, *, method: str, k: int, same_class: bool,
               targets: np.ndarray, train_index: np.ndarray | None, options: SolverOptions,
               chunk_size: int, train_ok: np.ndarray | None = None) -> str:
  """The hash `topk` records in chunk_dir/resume.json for these arguments (chunk_size as
  rounded to the devices): shards of one job agree on it."""
  train_index = np.arange(len(train_features)) if train_index is None else np.asarray(train_index)
  return utils.config_hash(
      chunk_key(method, k, same_class, options, chunk_size,
                np.asarray(targets).astype(np.int64), np.asarray(train_features),
                _class_ids("train_labels", train_labels), train_index.astype(np.int64),
                np.asarray(test_features), _class_ids("test_labels", test_labels), train_ok))


def _prepare_chunk_dir(chunk_dir: str, key: dict[str, Any]) -> None:
  """Keeps chunks of an identical earlier run; clears chunks of a different one."""
  key_hash = utils.config_hash(key)
  meta = os.path.join(chunk_dir, "resume.json")
  if os.path.exists(meta):
    with open(meta) as f:
      old = json.load(f).get("hash")
    if old != key_hash:
      logging.warning("%s holds chunks of a different run; starting over", chunk_dir)
      shutil.rmtree(chunk_dir)
  os.makedirs(chunk_dir, exist_ok=True)
  if not os.path.exists(meta):
    utils.save_json(meta, {"hash": key_hash, "key": key})
  done = len(glob.glob(os.path.join(chunk_dir, "chunk_*.npz")))
  if done:
    logging.info("resuming: %d finished chunks in %s", done, chunk_dir)

r"""Benchmark: jaxattr's batched Exemplar-SVMs versus a loop of sklearn LinearSVC fits.

Both sides score the same features: by default CIFAR-10 (the JPEG set in ../shared/data) through
a RANDOMLY INITIALISED lightly ResNet-18 (width 1, 512-d, seed --seed, ImageNet mean/std),
extracted once and cached in bench_results/ (git-ignored; the file is named by, and holds, a key
of everything the features depend on: --data and its content fingerprint, the encoder, --seed,
--encoder_width, --extract_batch; a cache of another key is never reused, `load_or_extract`); or
the features of a jaxattr run via --features_dir=WORKDIR/features. Random-init features are fine
for timing and for checking that both solvers find the same optimum; they say nothing about
attribution quality.

Modes (--mode):
  compare: targets = the first test images of class --class_id, candidates = that class's 5,000
    training images. sklearn LinearSVC(C=0.1, class_weight='balanced', tol=1e-6,
    max_iter=10000) fitted per target, primal (dual=False, whatever n and d) on
    --num_targets_sklearn targets and dual=True (what scikit-learn 1.1, the reference's
    environment, ran) on --num_targets_dual targets; jaxattr on --num_targets_jax targets, two
    ways: end to end through `jaxattr.attribute.topk` (candidate preparation, solve, top-1280
    selection), and like for like with sklearn's loop (preparation, solve and the decision
    values of every candidate on the host, no ranking). After a warm-up (compiles), --repeats
    rounds each time both jaxattr runs once (in alternating order) and 1/repeats of the sklearn
    primal fits, so that the machine's drifts hit all sides alike; jaxattr's rate is the median
    round's, sklearn's the median target's; beside them, the paired ratios of each round (its
    jaxattr run against its own fits: median and range). Prints targets/s of each, the ratios,
    top-k overlap at k=100 and 1280, how many top-100 lists are identical, and the largest
    decision-value difference.
  all: every test target (10,000 for CIFAR-10) with same-class candidates and k=1280, end to end
    through `jaxattr.attribute.topk` (chunks, top-k, host transfer), timed once after a warm-up.
  both (default).

  python3 -m benchmarks.benchmark_esvm                       # CPU, ~5 min the first time (features)
  python3 -m benchmarks.benchmark_esvm --features_dir=runs/cifar10/features --mode=all

Measured (2-core CPU, load 1.0-2.1, random-init features, class 0, 5,000 candidates x 512; five
runs): decision values 627-687 targets/s, topk 589-651, vs sklearn primal 11.1-11.8 (55.5-59.8x
and 51.8-55.2x), dual=True 1.81-1.96; overlap@100/@1280 1.0; max |diff| 7e-6; all 10,000 test
targets in 15.0-15.9 s (5.6 mean Newton iterations). Run as
`python3 -m benchmarks.benchmark_esvm --mode=both`.

Runs unchanged on a GPU (the solver is float32; sklearn stays on the host CPU).

Measurements behind design choices of jaxattr.attribute (same machine and features, CIFAR-10
class sets of 5,000 candidates; ad hoc timings and A/B runs, not rerun by this script):

* Margin violators: tens per target near the optimum, out of 5,000 candidates; the 1,000
  smallest-norm candidates hold ~2/3 of all targets' active-set entries (why `esvm.prepare` sorts
  the candidates by norm). The scaled convergence test reaches ~1e-6 in float32.
* `esvm.initial_weights`: counting the 256 smallest-norm candidates as violators takes 5.3-5.8
  Newton iterations on average, counting every candidate 6.6, and w = 0 about a third more.
* Carrying the decision values from step to step (`esvm.newton_step`) left the distance to
  sklearn unchanged (max 1.0e-5 vs 9.6e-6).
* `esvm._upper_gram`: the row blocks' products with the rows from their own start on are ~60%
  of the full product's, ~20% less time.
* `esvm._spd_solve`: the triangular solves with b as a row ([B, 1, r]) run ~1.5x faster on
  XLA:CPU than the column form of jax.scipy.linalg.cho_solve.
* `solver.CPU_BATCH_ROWS` / `CPU_BATCH_VALUES` (32 MiB L3; B = 128 at r <= 128, 64 above):
  the 1,000-target solve went from ~1.8 s to ~1.5 s (batches of up to 1,024 before).
* `topk.host_topk`: jax.lax.top_k over [1024, 5120] with k = 1280 takes ~0.2 s on XLA:CPU, a
  partition plus a sort of the kept entries ~0.09 s on one core; its int64-key sort is ~6x
  faster than np.lexsort.
* `topk.CPU_FINISH_SLICE`: scoring a 1,024 x 5,000 chunk in slices of 128 targets is ~30%
  faster.
* `topk.padded_sizes`: not padding 5,000-candidate sets to 5,120 makes every product with the
  candidates ~2% cheaper.
"""

from __future__ import annotations

import json
import os
import re
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from benchmarks import bench, esvm_families
from benchmarks.sklearn_reference import SKLEARN_MAX_ITER, sklearn_fit
from jaxattr import attribute, config, utils
from jaxattr.attribute import SolverOptions, esvm, solver as solver_lib

_MODE = flags.DEFINE_enum("mode", "both", ["compare", "all", "both"], "What to measure.")
_FEATURES_DIR = flags.DEFINE_string("features_dir", None,
                                    "WORKDIR/features with train.npz/test.npz (else extract).")
_DATA = flags.DEFINE_string("data", config.CIFAR10_JPEG, "jaxattr.data source to extract.")
_WIDTH = flags.DEFINE_float("encoder_width", 1.0, "Width of the random-init ResNet-18.",
                            lower_bound=0.0)
_CACHE = flags.DEFINE_string(
    "cache", None, "Feature cache (default bench_results/features_<data>_<key>.npz); one holding "
    "features of other inputs is re-extracted and overwritten.")
_SEED = flags.DEFINE_integer("seed", 0, "Encoder init seed.")
_CLASS = flags.DEFINE_integer("class_id", 0, "Class of the compare mode's targets/candidates.",
                              lower_bound=0)
_N_SK = flags.DEFINE_integer("num_targets_sklearn", 100, "Targets fitted by sklearn primal.",
                             lower_bound=1)
_N_DUAL = flags.DEFINE_integer(
    "num_targets_dual", 3, "Targets fitted by sklearn dual=True (0: "
    "none; its fits take minutes on some families).", lower_bound=0)
_N_JAX = flags.DEFINE_integer("num_targets_jax", 1000, "Targets solved by jaxattr (compare).",
                              lower_bound=1)
_CHUNK = flags.DEFINE_integer("chunk_size", 1024, "jaxattr targets per step.", lower_bound=1)
_TOL = flags.DEFINE_float("tol", 1e-5, "jaxattr tolerance (decision-value units).", lower_bound=0.0)
_MAX_ROWS = flags.DEFINE_integer("max_rows", SolverOptions.max_rows,
                                 "jaxattr: largest exact-Newton active set.", lower_bound=1)
_REPEATS = flags.DEFINE_integer(
    "repeats", 5, "Interleaved rounds of the compare mode: each times jaxattr's two runs once "
    "and 1/repeats of the sklearn primal targets.", lower_bound=1)
_BATCH = flags.DEFINE_integer("extract_batch", 250, "Images per feature-extraction step.",
                              lower_bound=1)
_OUT = flags.DEFINE_string("out", "bench_results/esvm.json", "Result JSON.")
_FAMILY = flags.DEFINE_enum(
    "family", "flax", ["flax", "hard_torch", "hard_synthetic", "imagenet_shaped"],
    "Feature family (benchmarks/esvm_families.py): 'flax' = the random-init Flax ResNet-18 "
    "features above (or --features_dir); 'hard_torch' = a random-init torchvision ResNet-18 on "
    "the CIFAR-10 JPEGs scaled to the many-violator regime; 'hard_synthetic' = its synthetic "
    "stand-in; 'imagenet_shaped' = 2048-d x 1,300 candidates per class (--family_norm).")
_FAMILY_NORM = flags.DEFINE_float(
    "family_norm", None, "Mean feature norm of the synthetic families (their default: "
    "0.8 hard_synthetic, 29 imagenet_shaped).")
_FAMILY_TARGETS = flags.DEFINE_integer(
    "family_targets", 1000, "Targets per class of the synthetic families.", lower_bound=1)
_FAMILY_CLASSES = flags.DEFINE_integer(
    "family_classes", 2, "Classes of the synthetic families, or of hard_torch's CIFAR-10 (10: "
    "every test target; --mode=all solves every target against its class).", lower_bound=1)
_EXTRACT_ONLY = flags.DEFINE_boolean("extract_only", False, "Only build the feature cache.")
_COARSE_ABOVE = flags.DEFINE_float(
    "coarse_above", None, "jaxattr: solver.COARSE_ABOVE for this run (default: the solver's; "
    "'inf' turns the coarse Newton steps off, for an A/B of them).", lower_bound=0.0)

# Bumped when `_extract` changes what it computes: older caches are then never reused.
CACHE_VERSION = 2


def cache_key(data: str, width: float, seed: int, extract_batch: int) -> dict:
  """Everything the extracted features depend on (`_extract`), as a JSON-able dict.

  The data enter by source and content fingerprint (`fingerprint.data_fingerprint`: file list,
  sizes and mtimes; no image is read), so a changed file under the same name is a new key.
  """
  from jaxattr import fingerprint  # pylint: disable=g-import-not-at-top

  source = types.SimpleNamespace(source=data, options={})
  return {
      "version": CACHE_VERSION,
      "data": data,
      "data_fingerprint": fingerprint.data_fingerprint(source),
      "encoder": "random-init LightlyResNet18, ImageNet mean/std, eval mode",
      "encoder_width": float(width),
      "seed": int(seed),
      "extract_batch": int(extract_batch),
  }


def default_cache_path(key: dict) -> str:
  """bench_results/features_<data, readable>_<hash of the whole key>.npz."""
  name = re.sub(r"[^A-Za-z0-9.]+", "_", key["data"]).strip("_")[-48:]
  return os.path.join("bench_results", f"features_{name}_{utils.config_hash(key)}.npz")


Split = dict[str, np.ndarray]  # 'features', 'labels', 'index'


def load_or_extract(features_dir: str | None = None, data: str = config.CIFAR10_JPEG,
                    width: float = 1.0, seed: int = 0, extract_batch: int = 250,
                    cache: str | None = None) -> tuple[Split, Split, dict]:
  """(train, test, info): feature dicts with 'features', 'labels', 'index'.

  From features_dir (WORKDIR/features) when given; else extracted from `data` (`_extract`), or
  read from the cache if it holds the features of exactly these inputs (`cache_key`, stored in
  the file and checked on load). A cache of other inputs is re-extracted and overwritten, with a
  warning; info['cache_reused'] says which happened.
  """
  if features_dir:
    out = []
    for split in ("train", "test"):
      path = os.path.join(features_dir, f"{split}.npz")
      if not os.path.exists(path):
        raise FileNotFoundError(f"--features_dir: {path} not found")
      with np.load(path) as z:
        out.append({k: z[k] for k in ("features", "labels", "index") if k in z.files})
    return out[0], out[1], {"features": features_dir}
  key = cache_key(data, width, seed, extract_batch)
  cache = cache or default_cache_path(key)
  info = {
      "features": f"random-init LightlyResNet18(width={width}) seed {seed} on {data}",
      "cache": cache,
      "cache_key": key,
      "cache_reused": False,
  }
  parts = None
  if os.path.exists(cache):
    with np.load(cache) as z:
      stored = json.loads(str(z["cache_key"])) if "cache_key" in z.files else None
      if stored == key:
        parts = {k: z[k] for k in z.files if k != "cache_key"}
    if parts is None:
      logging.warning(
          "feature cache %s holds features of other inputs (key %s, wanted %s): re-extracting "
          "and overwriting it", cache, stored, key)
  if parts is not None:
    info["extract_seconds"] = float(parts.pop("extract_seconds"))
    info["cache_reused"] = True
    logging.info("features from cache %s (key %s)", cache, key)
  else:
    parts, seconds = _extract(data, width, seed, extract_batch)
    utils.save_npz(cache, extract_seconds=np.float64(seconds), cache_key=np.array(json.dumps(key)),
                   **parts)
    info["extract_seconds"] = seconds
    logging.info("extracted features of %s in %.1f s; cached in %s", data, seconds, cache)
  train, test = ({
      k: parts[f"{s}_{k}"] for k in ("features", "labels", "index")
  } for s in ("train", "test"))
  return train, test, info


def _extract(data: str, width: float, seed: int,
             extract_batch: int) -> tuple[dict[str, np.ndarray], float]:
  from jaxattr import data as data_lib  # pylint: disable=g-import-not-at-top
  from jaxattr.models import LightlyResNet18  # pylint: disable=g-import-not-at-top

  model = LightlyResNet18(width=width)
  variables = model.init(jax.random.key(seed), jnp.zeros((2, 32, 32, 3)), train=False)
  mean = jnp.asarray([0.485, 0.456, 0.406]) * 255.0
  std = jnp.asarray([0.229, 0.224, 0.225]) * 255.0

  @jax.jit
  def features(images):
    x = (images.astype(jnp.float32) - mean) / std
    return model.apply(variables, x, train=False)["feature"]

  parts, start = {}, time.perf_counter()
  for split in ("train", "test"):
    ds = data_lib.load(data, split)
    n, b = len(ds.images), extract_batch
    out = np.zeros((n, model.feature_dim), np.float32)
    meter = utils.Throughput(f"extract {split}", n, "images", 30.0)
    for i in range(0, n, b):
      batch = np.zeros((b,) + ds.images.shape[1:], np.uint8)
      batch[:min(b, n - i)] = ds.images[i:i + b]
      out[i:i + b] = np.asarray(features(batch))[:min(b, n - i)]
      meter.update(min(b, n - i))
    parts.update({
        f"{split}_features": out,
        f"{split}_labels": ds.labels,
        f"{split}_index": ds.index
    })
  return parts, time.perf_counter() - start


def compare(train, test) -> tuple[list[dict], dict]:
  c = _CLASS.value
  cand = train["features"][train["labels"] == c]
  tpos = np.flatnonzero(test["labels"] == c)
  if not len(cand) or not len(tpos):
    raise app.UsageError(f"--class_id={c}: {len(cand)} training and {len(tpos)} test examples "
                         f"have that label (labels present: {np.unique(train['labels']).tolist()})")
  n_jax = min(_N_JAX.value, len(tpos))
  n_sk = min(_N_SK.value, n_jax)
  n_dual = min(_N_DUAL.value, n_sk)
  targets = test["features"][tpos]
  options = SolverOptions(tol=_TOL.value, max_rows=_MAX_ROWS.value)
  logging.info(
      "compare: class %d, %d candidates x %d-d; jaxattr %d, sklearn %d, dual %d "
      "targets", c, len(cand), cand.shape[1], n_jax, n_sk, n_dual)

  # jaxattr, end to end through topk (chunks, top-k, host transfer); compiled by the warm-up.
  # Targets that do not converge are counted (compare_nonconverged), not an error.
  def run_jax():
    return attribute.topk(train["features"], train["labels"], test["features"], test["labels"],
                          method="esvm", k=1280, targets=tpos[:n_jax], options=options,
                          chunk_size=_CHUNK.value, allow_nonconverged=True)

  run_jax()  # warm-up: compiles
  res = run_jax()

  # Like for like with sklearn's loop (a fit and the decision values of every candidate, no
  # ranking): the same solver, from the candidate set's preparation to the decision values of
  # every candidate on the host.
  solver = attribute.Solver(options)
  values_fn = jax.jit(lambda t, w, it, st, cset: esvm.finish(t, w, cset, it, st, options.tol)[0])

  def run_values():
    cset = solver.prepare(cand)
    w, it, st = solver(targets[:n_jax], cset)
    return np.asarray(values_fn(targets[:n_jax], w, it, st, cset))

  values = run_values()  # warm-up: compiles
  # Full decision values of the sklearn targets, for the comparison (not timed).
  ours, stats = attribute.esvm_scores(targets[:n_sk], cand, options, return_stats=True,
                                      allow_nonconverged=True)
  ours = np.asarray(ours, np.float64)

  converged = {False: [], True: []}

  def run_sklearn(indices, dual):
    times, values = [], []
    for i in indices:
      t0 = time.perf_counter()
      v, ok = sklearn_fit(targets[i].astype(np.float64), cand.astype(np.float64), dual)
      times.append(time.perf_counter() - t0)
      values.append(v)
      converged[dual].append(ok)
    return times, values

  # Interleaved rounds, so that the machine's drifts (this 2-core VM's speed varies by 10-30%
  # between rounds) hit every side alike: each round times the topk run, the decision-value run
  # and a 1/repeats share of the sklearn primal fits; the two jaxattr runs swap places every round,
  # so that neither always follows sklearn's fits (which leave other data in the caches).
  timings = {"topk": [], "values": [], "primal": []}
  round_primal = []  # sklearn's mean seconds per target in each round (nan: no fits in it)
  sk_values, loads = [], {"topk": [], "values": [], "primal": []}
  for r, part in enumerate(np.array_split(np.arange(n_sk), _REPEATS.value)):
    order = (("topk", run_jax), ("values", run_values))
    for name, fn in order if r % 2 == 0 else order[::-1]:
      t0 = time.perf_counter()
      fn()
      timings[name].append(time.perf_counter() - t0)
      loads[name].append(os.getloadavg()[0])
    times, vals = run_sklearn(part, False)
    timings["primal"] += times
    round_primal.append(float(np.mean(times)) if times else float("nan"))
    sk_values += vals
    loads["primal"].append(os.getloadavg()[0])
    logging.info("round %d/%d: topk %.3f s, values %.3f s (%d targets); sklearn primal %s", r + 1,
                 _REPEATS.value, timings["topk"][-1], timings["values"][-1], n_jax,
                 f"{np.mean(times):.3f} s/target" if times else "none (more rounds than fits)")
  sk_times, sk_values = np.asarray(timings["primal"]), np.stack(sk_values)
  dual_times, dual_values = run_sklearn(range(n_dual), True)
  dual_times = np.asarray(dual_times)
  load_dual = os.getloadavg()[0]
  t_jax = bench.summarize(timings["topk"])
  t_values = bench.summarize(timings["values"])
  load_jax, load_values, load_sk = (float(np.mean(loads[k])) for k in ("topk", "values", "primal"))

  def agreement(ref: np.ndarray) -> dict:
    m = len(ref)
    diff = np.abs(ours[:m] - ref)
    out = {
        "max_abs_diff": float(diff.max()),
        "max_rel_diff": float((diff / np.maximum(np.abs(ref), 1e-12)).max())
    }
    for k in (100, 1280):
      ref_top = np.argsort(-ref, axis=1, kind="stable")[:, :k]
      our_top = res.indices[:m, :k]  # train index values
      cand_index = train["index"][train["labels"] == c]
      overlap = [len(np.intersect1d(cand_index[r], o)) / k for r, o in zip(ref_top, our_top)]
      out[f"overlap@{k}"] = float(np.mean(overlap))
      out[f"min_overlap@{k}"] = float(np.min(overlap))
      if k == 100:
        out["identical_top100_frac"] = float(
            np.mean([np.array_equal(cand_index[r], o) for r, o in zip(ref_top, our_top)]))
        # Identical up to ties: our list's reference scores equal the reference's, to 1e-6.
        pos = np.searchsorted(cand_index, our_top)
        tie_ok = [
            np.allclose(rv[p], rv[r], rtol=0, atol=1e-6) for rv, p, r in zip(ref, pos, ref_top)
        ]
        out["identical_top100_up_to_ties_frac"] = float(np.mean(tie_ok))
    return out

  # Paired ratios: each round's jaxattr run against the sklearn fits of the same round, seconds
  # apart, so that a slow spell of the machine hits both sides of a ratio; their median
  # and range show how far the drift moves the headline ratio (medians over all rounds).
  paired = {
      name: [sk * n_jax / t for sk, t in zip(round_primal, timings[name]) if np.isfinite(sk)]
      for name in ("topk", "values")
  }

  def spread(ratios):
    return (f"{np.median(ratios):.1f} ({min(ratios):.1f}-{max(ratios):.1f})" if ratios else "")

  rate_jax = n_jax / t_jax["median_s"]
  rate_values = n_jax / t_values["median_s"]
  rate_sk = 1.0 / float(np.median(sk_times))
  rate_dual = 1.0 / float(np.median(dual_times)) if n_dual else float("nan")
  rows = [
      {
          "solver": "jaxattr ESVM (topk, k=1280)",
          "targets": n_jax,
          "targets/s": rate_jax,
          "s/target": 1.0 / rate_jax,
          "vs primal": rate_jax / rate_sk,
          "paired rounds": spread(paired["topk"]),
          "vs dual": rate_jax / rate_dual,
          "load1": load_jax
      },
      {
          "solver": "jaxattr ESVM decision values",
          "targets": n_jax,
          "targets/s": rate_values,
          "s/target": 1.0 / rate_values,
          "vs primal": rate_values / rate_sk,
          "paired rounds": spread(paired["values"]),
          "vs dual": rate_values / rate_dual,
          "load1": load_values
      },
      {
          "solver": "sklearn LinearSVC primal",
          "targets": n_sk,
          "targets/s": rate_sk,
          "s/target": 1.0 / rate_sk,
          "vs primal": 1.0,
          "vs dual": rate_sk / rate_dual,
          "load1": load_sk
      },
  ]
  if n_dual:
    rows.append({
        "solver": "sklearn LinearSVC dual=True",
        "targets": n_dual,
        "targets/s": rate_dual,
        "s/target": 1.0 / rate_dual,
        "vs primal": rate_dual / rate_sk,
        "vs dual": 1.0,
        "load1": load_dual
    })
  agree = {
      "vs_primal": agreement(sk_values),
      "vs_dual": agreement(np.stack(dual_values)) if n_dual else None,
      "jax_timing": t_jax,
      "values_timing": t_values,
      # The decision-value run against the topk run's solve (same solver, same targets).
      "values_vs_esvm_scores_max_abs_diff": float(np.abs(values[:n_sk] - ours).max()),
      # Fits that reached max_iter (liblinear's ConvergenceWarning); their decision values
      # are off by up to ~1e-3, which shows in the agreement figures.
      "sklearn_primal_unconverged": int(np.sum(~np.asarray(converged[False], bool))),
      "sklearn_dual_unconverged": int(np.sum(~np.asarray(converged[True], bool))),
      "sklearn_primal_s": sk_times.tolist(),
      "paired_round_ratios_topk": paired["topk"],
      "paired_round_ratios_values": paired["values"],
      "sklearn_dual_s": dual_times.tolist(),
      "solver_iterations_mean": float(np.mean(stats.iterations)),
      "solver_iterations_max": int(np.max(stats.iterations)),
      "num_violators_max": int(np.max(stats.num_violators)),
      "num_violators_mean": float(np.mean(stats.num_violators)),
      "compare_nonconverged": int(len(res.nonconverged)),
      "topk_iterations_mean": float(res.stats["iterations"].mean()),
      "topk_iterations_max": int(res.stats["iterations"].max())
  }
  return rows, agree


def all_targets(train, test) -> tuple[list[dict], dict]:
  # Targets that do not converge are counted (all_nonconverged), not an error.
  kw = dict(method="esvm", k=1280, same_class=True, chunk_size=_CHUNK.value, options=SolverOptions(
      tol=_TOL.value, max_rows=_MAX_ROWS.value), allow_nonconverged=True)
  # Warm-up: compiles the program for the (shared) candidate bucket on one chunk.
  first = np.flatnonzero(test["labels"] == test["labels"][0])[:_CHUNK.value]
  attribute.topk(train["features"], train["labels"], test["features"], test["labels"],
                 targets=first, **kw)
  t0 = time.perf_counter()
  res = attribute.topk(train["features"], train["labels"], test["features"], test["labels"],
                       train_index=train["index"], log_every_s=10.0, **kw)
  seconds = time.perf_counter() - t0
  n = len(res.targets)
  rows = [{
      "solver": f"jaxattr ESVM, all {n} test targets (k=1280)",
      "targets": n,
      "targets/s": n / seconds,
      "s/target": seconds / n,
      "seconds": seconds,
      "load1": os.getloadavg()[0]
  }]
  return rows, {
      "all_seconds": seconds,
      "all_nonconverged": int(len(res.nonconverged)),
      "all_iterations_mean": float(res.stats["iterations"].mean()),
      "all_iterations_max": int(res.stats["iterations"].max()),
      "all_num_violators_max": int(res.stats["num_violators"].max())
  }


def family_features(name: str, norm: float | None, num_targets: int, num_classes: int = 2
                   ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict]:
  """(train, test, info) of a feature family: candidates as the training split, targets as the
  test split, per class; cached under bench_results by the family's key (`esvm_families`)."""
  builders = {
      "hard_torch": esvm_families.hard_torch,
      "hard_synthetic": esvm_families.hard_synthetic,
      "imagenet_shaped": esvm_families.imagenet_shaped
  }
  kwargs = {} if norm is None else {"norm": norm}
  if name != "hard_torch":
    kwargs.update(num_targets=num_targets, num_classes=num_classes)
  elif norm is not None:
    raise app.UsageError("--family_norm applies to the synthetic families")
  elif num_classes != 2:  # CIFAR-10's classes 0..n-1 (10: every test target, for --mode=all)
    if not 1 <= num_classes <= 10:
      raise app.UsageError(f"--family_classes={num_classes}: hard_torch has CIFAR-10's 1-10")
    kwargs.update(classes=tuple(range(num_classes)))
  data = esvm_families.cached(builders[name](**kwargs))

  def split(arrays):
    labels = np.concatenate([np.full(len(a), c, np.int32) for c, a in enumerate(arrays)])
    return {
        "features": np.concatenate(arrays),
        "labels": labels,
        "index": np.arange(len(labels), dtype=np.int64)
    }

  return split(data.candidates), split(data.targets), {"family": data.key}


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  if _COARSE_ABOVE.value is not None:
    solver_lib.COARSE_ABOVE = _COARSE_ABOVE.value
  if _FAMILY.value == "flax":
    train, test, info = load_or_extract(_FEATURES_DIR.value, _DATA.value, _WIDTH.value, _SEED.value,
                                        _BATCH.value, _CACHE.value)
  else:
    train, test, info = family_features(_FAMILY.value, _FAMILY_NORM.value, _FAMILY_TARGETS.value,
                                        _FAMILY_CLASSES.value)
  logging.info("features: %s; train %s, test %s", info, train["features"].shape,
               test["features"].shape)
  if _EXTRACT_ONLY.value:
    return
  rows, extra = [], {}
  load = os.getloadavg()
  if _MODE.value in ("compare", "both"):
    r, e = compare(train, test)
    rows += r
    extra.update(e)
  if _MODE.value in ("all", "both"):
    r, e = all_targets(train, test)
    rows += r
    extra.update(e)
  print(
      bench.format_table(rows, [
          "solver", "targets", "targets/s", "s/target", "vs primal", "paired rounds", "vs dual",
          "seconds", "load1"
      ]))
  if _MODE.value in ("compare", "both"):
    print("paired rounds: the ratio to sklearn's primal loop per round (each jaxattr run against "
          "the fits of its own round), median (min-max).")
  print("load1: 1-minute load average of this 2-core machine right after each measurement "
        "(other processes compete for the cores while it is above ~2).")
  for key in ("vs_primal", "vs_dual"):
    if extra.get(key):
      print(key, {k: round(v, 8) for k, v in extra[key].items()})
  solver = {
      k: round(extra[k], 2)
      for k in ("topk_iterations_mean", "topk_iterations_max", "num_violators_mean",
                "num_violators_max", "compare_nonconverged", "all_iterations_mean",
                "all_iterations_max", "all_num_violators_max", "all_nonconverged")
      if k in extra
  }
  print(f"features: {info}")
  print(f"Newton iterations and margin violators at the optimum: {solver}")
  if "sklearn_dual_unconverged" in extra:
    print(f"sklearn fits stopped at max_iter={SKLEARN_MAX_ITER} (not converged): primal "
          f"{extra['sklearn_primal_unconverged']}, dual {extra['sklearn_dual_unconverged']}")
  names = ("mode", "features_dir", "data", "encoder_width", "seed", "extract_batch", "class_id",
           "num_targets_sklearn", "num_targets_dual", "num_targets_jax", "chunk_size", "tol",
           "max_rows", "repeats", "family", "family_norm", "family_targets", "family_classes",
           "coarse_above")
  settings = {
      "flags": {
          name: flags.FLAGS[name].value for name in names
      },
      "features": info,
      "coarse_above": solver_lib.COARSE_ABOVE,
      "loadavg_before": load,
      "loadavg_after": os.getloadavg(),
      "cpu_count": os.cpu_count(),
      **extra
  }
  bench.write_result(_OUT.value, "esvm", rows, settings)
  logging.info("wrote %s", _OUT.value)


if __name__ == "__main__":
  app.run(main)

r"""An ImageNet-sized ESVM sweep: every target of 1,000 classes x 1,300 candidates x 2048-d.

Issue #15's goal: all 50,000 targets (ImageNet's validation set: 50 per class) ranked against
their class's 1,300 training candidates in under 10 minutes on this CPU. The features are
`esvm_families.imagenet_shaped` (a random-init ResNet-50's avgpool statistics), generated one
class at a time (`esvm_families.SyntheticPostReLU.class_problem`: 1,000 classes of them would
take 11 GB), outside the timed region. Each class is one `attribute.topk` call (the candidate
set's preparation, the solves, the top-k), the way a sweep over per-class feature files runs.
Beside it, in the same run, scikit-learn's primal LinearSVC fits `--sklearn_per_class` targets
of every `--sklearn_every`-th class, for the ratio and sklearn's projected time of the sweep.

With `--memmap_dir=DIR` the sweep runs as the attribution stage does on streamed features: all
classes are first written (untimed) to memory-mappable float16 arrays in DIR (1.3M x 2048 train
rows: 5.3 GB; the stage's `features/{split}.features.npy` format), then ONE `attribute.topk` call
ranks all 50,000 targets from the memory maps, class by class, with resumable chunks; the peak of
the process's anonymous memory (not the file pages the maps cache) is sampled throughout.

  python3 -m benchmarks.esvm_imagenet_sweep            # the goal: 1,000 classes, norm 29
  python3 -m benchmarks.esvm_imagenet_sweep --classes=20 --norm=1000
  python3 -m benchmarks.esvm_imagenet_sweep --memmap_dir=/tmp/sweep   # from memory maps
"""

from __future__ import annotations

import os
import time

import numpy as np
from absl import app, flags, logging

from benchmarks import bench, esvm_families
from benchmarks.sklearn_reference import sklearn_fit
from jaxattr import attribute
from jaxattr.attribute.options import SolverOptions

_CLASSES = flags.DEFINE_integer("classes", 1000, "Classes (ImageNet: 1,000).", lower_bound=1)
_TARGETS = flags.DEFINE_integer("targets", 50, "Targets per class (ImageNet val: 50).",
                                lower_bound=1)
_CANDIDATES = flags.DEFINE_integer("candidates", 1300, "Candidates per class.", lower_bound=2)
_DIM = flags.DEFINE_integer("dim", 2048, "Feature dimension (ResNet-50: 2048).", lower_bound=1)
_NORM = flags.DEFINE_float("norm", 29.0, "Mean feature norm (imagenet_shaped: 3, 29 or 1000).")
_K = flags.DEFINE_integer("k", 1280, "Top-k per target.", lower_bound=1)
_SK_EVERY = flags.DEFINE_integer("sklearn_every", 50, "sklearn fits targets of every n-th class.",
                                 lower_bound=1)
_SK_PER_CLASS = flags.DEFINE_integer("sklearn_per_class", 1, "sklearn fits per sampled class.",
                                     lower_bound=0)
_OUT = flags.DEFINE_string("out", "bench_results/esvm_imagenet_sweep.json", "Result JSON.")
_MEMMAP = flags.DEFINE_string(
    "memmap_dir", None, "Write the features to memory maps here, then rank every target with one "
    "topk call over them (the attribution stage's way).")


class AnonPeak:
  """Samples the process's anonymous resident memory (RssAnon) every 0.2 s in a thread: the
  memory the run holds, without the file pages of memory maps, which the kernel can drop."""

  def __init__(self):
    import threading  # pylint: disable=g-import-not-at-top

    self.peak, self._stop = 0, threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()

  @staticmethod
  def now() -> int:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("RssAnon:"):
          return int(line.split()[1]) * 1024
    return 0

  def _run(self):
    while not self._stop.wait(0.2):
      self.peak = max(self.peak, self.now())

  def stop(self) -> int:
    self._stop.set()
    self._thread.join()
    return max(self.peak, self.now())


def write_memmaps(family, directory: str) -> dict[str, np.ndarray]:
  """Every class of `family` in float16 memory maps under `directory` (written to temporary names,
  renamed when complete; reused when present and complete), and the labels."""
  n, t, d, classes = family.num_candidates, family.num_targets, family.dim, family.num_classes
  os.makedirs(directory, exist_ok=True)
  paths = {s: os.path.join(directory, f"{s}.features.npy") for s in ("train", "test")}
  shapes = {"train": (classes * n, d), "test": (classes * t, d)}
  labels = {
      "train": np.repeat(np.arange(classes, dtype=np.int32), n),
      "test": np.repeat(np.arange(classes, dtype=np.int32), t)
  }
  key = os.path.join(directory, "key.txt")
  if all(os.path.exists(p) for p in paths.values()) and os.path.exists(key):
    with open(key) as f:
      if f.read() == family.key():
        return labels
  maps = {}
  for s, path in paths.items():
    maps[s] = np.lib.format.open_memmap(path + ".partial", "w+", np.float16, shapes[s])
  t0 = time.perf_counter()
  for c in range(classes):
    targets, candidates = family.class_problem(c)
    maps["train"][c * n:(c + 1) * n] = candidates
    maps["test"][c * t:(c + 1) * t] = targets
    if (c + 1) % 50 == 0:
      logging.info("memmaps: %d/%d classes written (%.0f s)", c + 1, classes,
                   time.perf_counter() - t0)
  for s, m in maps.items():
    m.flush()
    del m
    os.replace(paths[s] + ".partial", paths[s])
  with open(key, "w") as f:
    f.write(family.key())
  return labels


def sweep_from_memmaps(family, directory: str, k: int, options: SolverOptions) -> None:
  """The `--memmap_dir` mode (module docstring)."""
  labels = write_memmaps(family, directory)
  train = np.load(os.path.join(directory, "train.features.npy"), mmap_mode="r")
  test = np.load(os.path.join(directory, "test.features.npy"), mmap_mode="r")
  chunk_dir = os.path.join(directory, "chunks")
  if os.path.isdir(chunk_dir):
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(chunk_dir)  # a timed run starts afresh
  load_before = os.getloadavg()
  # Compile outside the timed run (one class, the shapes every class has).
  first = labels["test"] == 0
  attribute.topk(np.asarray(train[labels["train"] == 0],
                            np.float32), labels["train"][labels["train"] == 0],
                 np.asarray(test[first], np.float32), labels["test"][first], method="esvm", k=k,
                 options=options, allow_nonconverged=True)
  base = AnonPeak.now()
  peak = AnonPeak()
  t0 = time.perf_counter()
  res = attribute.topk(train, labels["train"], test, labels["test"], method="esvm", k=k,
                       options=options, chunk_dir=chunk_dir, allow_nonconverged=True)
  seconds = time.perf_counter() - t0
  peak_bytes = peak.stop()
  sk_seconds, overlaps = [], []
  for c in range(0, family.num_classes, _SK_EVERY.value):
    cand = np.asarray(train[labels["train"] == c], np.float64)
    rows = np.flatnonzero(labels["test"] == c)[:_SK_PER_CLASS.value]
    for i in rows:
      t1 = time.perf_counter()
      ref, _ = sklearn_fit(np.asarray(test[i], np.float64), cand, False)
      sk_seconds.append(time.perf_counter() - t1)
      top = min(100, k)
      order = np.flatnonzero(labels["train"] == c)[np.argsort(-ref, kind="stable")[:top]]
      overlaps.append(float(np.array_equal(order, res.indices[i, :top])))
  its, viol = res.stats["iterations"], res.stats["num_violators"]
  _report(
      "jaxattr topk (memory maps)", family, len(labels["test"]), seconds, sk_seconds, its, viol,
      int(len(res.nonconverged)), overlaps, load_before, f"memory maps in {directory}",
      "esvm_imagenet_sweep_memmap", {
          "anon_memory_before_mib": base / 2**20,
          "anon_memory_peak_mib": peak_bytes / 2**20,
          "train_features_file_mib": train.nbytes / 2**20,
          "one_class_float32_mib": family.num_candidates * family.dim * 4 / 2**20,
          "output_mib": (res.indices.nbytes + res.scores.nbytes) / 2**20,
      })


def _report(solver: str, family, total: int, seconds: float, sk_seconds: list[float],
            its: np.ndarray, viol: np.ndarray, nonconverged: int, overlaps: list[float],
            load_before: tuple[float, ...], where: str, name: str, extra: dict) -> None:
  """Prints the table and the summary of a sweep and writes its JSON (`_OUT`)."""
  sk_per_target = float(np.mean(sk_seconds)) if sk_seconds else float("nan")
  load = os.getloadavg()[0]
  rows = [{
      "solver": solver,
      "targets": total,
      "seconds": seconds,
      "targets/s": total / seconds,
      "vs sklearn": total / seconds * sk_per_target,
      "load1": load
  }, {
      "solver": "sklearn LinearSVC primal",
      "targets": len(sk_seconds),
      "seconds": float(sum(sk_seconds)),
      "targets/s": 1.0 / sk_per_target,
      "vs sklearn": 1.0,
      "load1": load
  }]
  print(
      bench.format_table(rows,
                         ["solver", "targets", "seconds", "targets/s", "vs sklearn", "load1"]))
  summary = {
      "all_targets_seconds": seconds,
      "goal_seconds": 600.0,
      "sklearn_projected_seconds": sk_per_target * total,
      "iterations_mean": float(its.mean()),
      "iterations_max": int(its.max()),
      "num_violators_mean": float(viol.mean()),
      "num_violators_max": int(viol.max()),
      "nonconverged": nonconverged,
      "top100_identical_share": float(np.mean(overlaps)) if overlaps else None,
      **extra
  }
  print(f"features: {family.key()} ({where})")
  print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in summary.items()})
  bench.write_result(
      _OUT.value, name, rows, {
          "flags": {
              flag: flags.FLAGS[flag].value
              for flag in ("classes", "targets", "candidates", "dim", "norm", "k", "sklearn_every",
                           "sklearn_per_class", "memmap_dir")
          },
          "family": family.key(),
          "loadavg_before": load_before,
          "loadavg_after": os.getloadavg(),
          "cpu_count": os.cpu_count(),
          **summary
      })
  logging.info("wrote %s", _OUT.value)


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  family = esvm_families.imagenet_shaped(norm=_NORM.value, dim=_DIM.value,
                                         num_candidates=_CANDIDATES.value,
                                         num_targets=_TARGETS.value, num_classes=_CLASSES.value)
  options = SolverOptions()
  k = min(_K.value, _CANDIDATES.value)
  if _MEMMAP.value:
    sweep_from_memmaps(family, _MEMMAP.value, k, options)
    return
  load_before = os.getloadavg()
  jax_seconds, sk_seconds, generate_seconds = [], [], 0.0
  iterations, violators, nonconverged, overlaps = [], [], 0, []
  for c in range(_CLASSES.value):
    t0 = time.perf_counter()
    targets, candidates = family.class_problem(c)
    generate_seconds += time.perf_counter() - t0
    labels = np.full(len(candidates), c, np.int32)
    test_labels = np.full(len(targets), c, np.int32)

    def run():
      return attribute.topk(candidates, labels, targets, test_labels, method="esvm", k=k,
                            options=options, allow_nonconverged=True)

    if c == 0:
      run()  # compiles (the shapes are the same for every class)
    t0 = time.perf_counter()
    res = run()
    jax_seconds.append(time.perf_counter() - t0)
    iterations.append(res.stats["iterations"])
    violators.append(res.stats["num_violators"])
    nonconverged += int(len(res.nonconverged))
    if c % _SK_EVERY.value == 0:
      for i in range(min(_SK_PER_CLASS.value, len(targets))):
        t0 = time.perf_counter()
        ref, _ = sklearn_fit(targets[i].astype(np.float64), candidates.astype(np.float64), False)
        sk_seconds.append(time.perf_counter() - t0)
        top = min(100, k)
        overlaps.append(
            float(np.array_equal(np.argsort(-ref, kind="stable")[:top], res.indices[i, :top])))
    if (c + 1) % max(1, _CLASSES.value // 20) == 0 or c + 1 == _CLASSES.value:
      done = (c + 1) * len(targets)
      logging.info(
          "class %d/%d: %d targets in %.1f s of solving (%.1f targets/s); %d not "
          "converged", c + 1, _CLASSES.value, done, sum(jax_seconds), done / sum(jax_seconds),
          nonconverged)
  _report(
      "jaxattr topk (per class)", family,
      _CLASSES.value * _TARGETS.value, float(sum(jax_seconds)), sk_seconds,
      np.concatenate(iterations), np.concatenate(violators), nonconverged, overlaps, load_before,
      "per class, class_problem", "esvm_imagenet_sweep", {
          "per_class_seconds_median": float(np.median(jax_seconds)),
          "generate_seconds_untimed": generate_seconds,
      })


if __name__ == "__main__":
  app.run(main)

r"""Streaming loader and resident-copy preparation vs torchvision, side by side in one run.

On a generated tree of ImageNet-sized JPEGs (`imagenet_tree.make_sized_tree`, ~500 x 375,
natural-looking gradients and noise; built once under bench_results/, keyed by its parameters):

* loader: decode + Resize(256) + CenterCrop(224) of every training image, as uint8 batches,
  jaxattr (`stream.batches`: grain with W worker processes, one decode thread each; and W
  threads in one process) vs torchvision `ImageFolder` + `DataLoader(num_workers=W)` with the same
  transforms (PIL bilinear, antialiased), W = 1 and 2;
* prepare: the resident copy's per-image work at 64 px (`stream.ResizeCrop(64, 64, draft=True)`,
  JPEG decoded at a reduced DCT scale) vs torchvision `ImageFolder` decoding fully and resizing to
  the same side, one process each (images/s per worker), plus how far the draft images are from a
  full decode + the same resize.

Rounds alternate between the sides; the table gives the median of `--repeats` rounds and the
spread; JSON in bench_results/.

  python3 -m benchmarks.benchmark_loader
  python3 -m benchmarks.benchmark_loader --classes=4 --per_class=32 --repeats=2   # quicker
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
from absl import app, flags, logging

from benchmarks import bench, imagenet_tree
from jaxattr import stream

_CLASSES = flags.DEFINE_integer("classes", 8, "Classes of the generated tree.", lower_bound=1)
_PER_CLASS = flags.DEFINE_integer("per_class", 48, "Training images per class.", lower_bound=1)
_BATCH = flags.DEFINE_integer("batch", 32, "Images per batch.", lower_bound=1)
_WORKERS = flags.DEFINE_list("workers", ["1", "2"], "Worker counts to compare.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Interleaved rounds.", lower_bound=1)
_SIDE = flags.DEFINE_integer("side", 64, "Side of the resident copy compared.", lower_bound=8)
_OUT = flags.DEFINE_string("out", "bench_results/loader.json", "Result JSON.")


def _tree() -> str:
  root = os.path.join("bench_results", f"imagenet_tree_{_CLASSES.value}x{_PER_CLASS.value}_500x375")
  if not os.path.isdir(root):
    logging.info("generating %s (untimed)", root)
    tmp = root + ".partial"
    if os.path.isdir(tmp):
      import shutil  # pylint: disable=g-import-not-at-top
      shutil.rmtree(tmp)
    imagenet_tree.make_sized_tree(tmp, _CLASSES.value, _PER_CLASS.value, 1, 500, 375)
    os.replace(tmp, root)
  return root


def _jaxattr_pass(split, transform, workers: int, threads: int) -> tuple[int, float, int]:
  # (images, seconds until the first batch, its size): the start-up (worker spawn) apart.
  t0, n, first = time.perf_counter(), 0, None
  for b in stream.batches(split, transform, _BATCH.value, workers=workers, threads=threads):
    if first is None:
      first = (time.perf_counter() - t0, len(b["image"]))
    n += len(b["image"])
  return n, *first


def _torch_loader(root: str, transform, workers: int):
  import torch  # pylint: disable=g-import-not-at-top
  from torchvision import datasets  # pylint: disable=g-import-not-at-top

  ds = datasets.ImageFolder(os.path.join(root, "train"), transform=transform)
  return torch.utils.data.DataLoader(ds, batch_size=_BATCH.value, num_workers=workers,
                                     shuffle=False)


def _torch_pass(make_loader) -> tuple[int, float, int]:
  t0, n, first = time.perf_counter(), 0, None
  for images, _ in make_loader():
    if first is None:
      first = (time.perf_counter() - t0, len(images))
    n += len(images)
  return n, *first


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  import torch  # pylint: disable=g-import-not-at-top
  from torchvision import transforms  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(1)
  worker_counts = bench.int_list("workers", _WORKERS.value, 0)  # checked before any work
  images = _CLASSES.value * _PER_CLASS.value
  if images < 2 * _BATCH.value:
    raise app.UsageError(
        f"--classes x --per_class = {images} images make fewer than two batches of --batch="
        f"{_BATCH.value}; the steady rate (after the first batch) needs at least two: raise "
        "--per_class or lower --batch")
  root = _tree()
  split = stream.open_split(f"folder:{root}", "train")
  n = len(split)
  eval_tf = transforms.Compose([
      transforms.Resize(256),
      transforms.CenterCrop(224),
      transforms.PILToTensor()
  ])
  side = _SIDE.value
  small_tf = transforms.Compose([
      transforms.Resize(side),
      transforms.CenterCrop(side),
      transforms.PILToTensor()
  ])
  ours_eval = stream.ResizeCrop(256, 224)
  ours_small = stream.ResizeCrop(side, side, draft=True)
  cases = []
  for w in worker_counts:
    cases.append((f"loader {w} worker(s)", f"jaxattr grain, {w} process(es)",
                  lambda w=w: _jaxattr_pass(split, ours_eval, w, 1)))
    cases.append((f"loader {w} worker(s)", f"jaxattr grain, {w} thread(s) in-process",
                  lambda w=w: _jaxattr_pass(split, ours_eval, 0, w)))
    cases.append((f"loader {w} worker(s)", f"torchvision DataLoader, {w} worker(s)",
                  lambda w=w: _torch_pass(lambda: _torch_loader(root, eval_tf, w))))
  cases.append((f"prepare {side} px, 1 process", "jaxattr draft decode + resize",
                lambda: _jaxattr_pass(split, ours_small, 0, 1)))
  cases.append((f"prepare {side} px, 1 process", "torchvision ImageFolder full decode + resize",
                lambda: _torch_pass(lambda: _torch_loader(root, small_tf, 0))))
  for _, _, fn in cases:  # warm-up: page cache, imports
    fn()
  times = {i: [] for i in range(len(cases))}
  steady = {i: [] for i in range(len(cases))}
  startup = {i: [] for i in range(len(cases))}
  loads = []
  for _ in range(_REPEATS.value):
    for i, (_, _, fn) in enumerate(cases):
      t0 = time.perf_counter()
      got, first_s, first_n = fn()
      total = time.perf_counter() - t0
      times[i].append(total)
      startup[i].append(first_s)
      steady[i].append((got - first_n) / max(total - first_s, 1e-9))
      assert got == n, (got, n)
    loads.append(os.getloadavg()[0])
  rows = []
  for i, (task, who, _) in enumerate(cases):
    s = bench.summarize(times[i])
    rows.append({
        "task": task,
        "who": who,
        "images": n,
        "images/s": n / s["median_s"],
        "min images/s": n / s["max_s"],
        "max images/s": n / s["min_s"],
        "first batch s": float(np.median(startup[i])),
        "steady images/s": float(np.median(steady[i]))
    })
  for task in dict.fromkeys(r["task"] for r in rows):
    group = [r for r in rows if r["task"] == task]
    ref = next(r for r in group if r["who"].startswith("torchvision"))
    for r in group:
      r["vs torchvision"] = r["images/s"] / ref["images/s"]
      r["steady vs torchvision"] = r["steady images/s"] / ref["steady images/s"]
  # How far the draft decode is from a full decode + the same resize (uint8 grey levels).
  diffs = []
  for i in range(0, n, max(1, n // 64)):
    a = ours_small(split[i])["image"].astype(np.int16)
    b = stream.ResizeCrop(side, side)(split[i])["image"].astype(np.int16)
    diffs.append(np.abs(a - b))
  diffs = np.stack(diffs)
  draft = {
      "mean_abs_diff": float(diffs.mean()),
      "p99_abs_diff": float(np.percentile(diffs, 99)),
      "max_abs_diff": int(diffs.max())
  }
  print(
      bench.format_table(rows, [
          "task", "who", "images", "images/s", "min images/s", "max images/s", "vs torchvision",
          "first batch s", "steady images/s", "steady vs torchvision"
      ]))
  print("images/s: the whole pass, worker start-up included; steady: after the first batch")
  print(f"draft vs full decode at {side} px (grey levels over {len(diffs)} images): {draft}")
  print(f"load1 per round: {[round(x, 2) for x in loads]} (2 cores; other jobs share them)")
  bench.write_result(
      _OUT.value, "loader", rows, {
          "flags": {
              k: flags.FLAGS[k].value
              for k in ("classes", "per_class", "batch", "workers", "repeats", "side")
          },
          "tree": root,
          "draft_vs_full": draft,
          "loadavg_rounds": loads,
          "python": sys.version.split()[0],
          "cpu_count": os.cpu_count()
      })


if __name__ == "__main__":
  app.run(main)

r"""Files -> features on disk, ResNet-50 at 224, jaxattr vs torchvision + PyTorch, side by side.

Both sides read the same generated ImageNet-sized JPEGs (`imagenet_tree.make_sized_tree`, ~500 x
375), apply Resize(256) + CenterCrop(224) + ImageNet normalisation, run the same random-init
torchvision ResNet-50 (jaxattr's copy converted by `jaxattr.convert`) in eval mode at float32 and
write the 2048-d features to a .npy on disk:

* jaxattr: `stream.open_split` + `features.make_batch_extractor` + `features.extract_stream`
  (grain decode threads, chunked memory-mapped output);
* reference: torchvision `ImageFolder` + `DataLoader(num_workers=W)` + `torch.no_grad()` model,
  features written into an `np.lib.format.open_memmap` array batch by batch.

Each side runs in its own process (so its peak resident memory, VmHWM, is its own), after
an untimed warm-up batch (compilation, thread pools), at two dataset sizes (peak memory must not
grow with the number of images), in alternating rounds.

  python3 -m benchmarks.benchmark_stream_features
  python3 -m benchmarks.benchmark_stream_features --images=64,128 --repeats=1   # quicker
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
from absl import app, flags, logging

from benchmarks import bench, imagenet_tree

_IMAGES = flags.DEFINE_list("images", ["96", "192"], "Dataset sizes (images) to run at.")
_BATCH = flags.DEFINE_integer("batch", 32, "Images per batch (both sides).", lower_bound=1)
_WORKERS = flags.DEFINE_integer("workers", 2, "Decode threads (jaxattr) and DataLoader workers.",
                                lower_bound=0)
_REPEATS = flags.DEFINE_integer("repeats", 2, "Alternating rounds.", lower_bound=1)
_OUT = flags.DEFINE_string("out", "bench_results/stream_features.json", "Result JSON.")
_SIDE = flags.DEFINE_string("side", "", "Internal: run one side ('jax'/'torch') and print JSON.")
_ROOT = flags.DEFINE_string("root", "", "Internal: the tree.")
_CKPT = flags.DEFINE_string("ckpt", "", "Internal: jaxattr's converted checkpoint.")
_PTH = flags.DEFINE_string("pth", "", "Internal: the PyTorch state_dict.")
_N = flags.DEFINE_integer("n", 0, "Internal: images to use.")
_DST = flags.DEFINE_string("dst", "", "Internal: output .npy.")

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _jax_side() -> dict:
  from jaxattr import checkpoint, features, stream  # pylint: disable=g-import-not-at-top
  from jaxattr.models import get_encoder  # pylint: disable=g-import-not-at-top

  split = stream.open_split(f"folder:{_ROOT.value}", "train")
  split = split.subset(np.arange(_N.value))
  variables, meta = checkpoint.load_variables(_CKPT.value)
  model = get_encoder(meta["encoder"], **meta.get("encoder_kwargs", {}))
  step, batch = features.make_batch_extractor(model, variables, MEAN, STD, _BATCH.value)
  np.asarray(step(np.zeros((1, 224, 224, 3), np.uint8)))  # warm-up: compiles
  t0 = time.perf_counter()
  feats, _ = features.extract_stream(split, step, batch, _DST.value, resize=256, crop=224,
                                     key="bench", chunk_rows=4 * batch, threads=_WORKERS.value,
                                     feature_dim=2048)
  seconds = time.perf_counter() - t0
  return {"images": len(feats), "seconds": seconds, "checksum": float(np.abs(feats).sum())}


def _torch_side() -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top
  from torchvision import datasets, transforms  # pylint: disable=g-import-not-at-top

  model = torchvision.models.resnet50()
  model.load_state_dict(torch.load(_PTH.value))
  model.fc = torch.nn.Identity()
  model.eval()
  tf = transforms.Compose([
      transforms.Resize(256),
      transforms.CenterCrop(224),
      transforms.ToTensor(),
      transforms.Normalize(MEAN, STD)
  ])
  ds = datasets.ImageFolder(os.path.join(_ROOT.value, "train"), transform=tf)
  ds = torch.utils.data.Subset(ds, range(_N.value))
  loader = torch.utils.data.DataLoader(ds, batch_size=_BATCH.value, num_workers=_WORKERS.value)
  with torch.no_grad():
    model(torch.zeros(1, 3, 224, 224))  # warm-up
    t0 = time.perf_counter()
    out = np.lib.format.open_memmap(_DST.value, mode="w+", dtype=np.float32, shape=(len(ds), 2048))
    row = 0
    for images, _ in loader:
      out[row:row + len(images)] = model(images).numpy()
      row += len(images)
    out.flush()
    seconds = time.perf_counter() - t0
  return {"images": row, "seconds": seconds, "checksum": float(np.abs(out).sum())}


def _peak_mib() -> float:
  """This process's peak resident memory (VmHWM: its own address space's high-water mark;
  ru_maxrss would also count the launching process's, which Linux carries across exec)."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(side: str, root: str, ckpt: str, pth: str, n: int, dst: str) -> dict:
  # The XLA flags launch/features.py runs with (`jaxattr.xla_flags.INFERENCE_CPU_FLAGS`: without
  # the YNNPACK switch this side ran 1.45x slower), unless the user set XLA_FLAGS, as there.
  from jaxattr import xla_flags  # pylint: disable=g-import-not-at-top
  env = dict(os.environ)
  env.setdefault("XLA_FLAGS", " ".join(xla_flags.INFERENCE_CPU_FLAGS))
  res = subprocess.run([
      sys.executable, "-m", "benchmarks.benchmark_stream_features", f"--side={side}",
      f"--root={root}", f"--ckpt={ckpt}", f"--pth={pth}", f"--n={n}", f"--dst={dst}",
      f"--batch={_BATCH.value}", f"--workers={_WORKERS.value}"
  ], env=env, capture_output=True, text=True, timeout=3600)
  if res.returncode:
    raise RuntimeError(f"{side} side failed:\n{res.stderr[-3000:]}")
  return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  if _SIDE.value:
    out = _jax_side() if _SIDE.value == "jax" else _torch_side()
    out["maxrss_mib"] = _peak_mib()
    print(json.dumps(out))
    return
  logging.set_verbosity(logging.INFO)
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top

  from jaxattr import convert  # pylint: disable=g-import-not-at-top

  sizes = sorted(bench.int_list("images", _IMAGES.value, 1))
  per_class = 48
  classes = -(-sizes[-1] // per_class)
  root = os.path.join("bench_results", f"imagenet_tree_{classes}x{per_class}_500x375")
  if not os.path.isdir(root):
    imagenet_tree.make_sized_tree(root + ".partial", classes, per_class, 1, 500, 375)
    os.replace(root + ".partial", root)
  pth = os.path.join("bench_results", "rn50_seed0.pth")
  ckpt = os.path.join("bench_results", "rn50_seed0")
  if not os.path.exists(ckpt):
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet50().state_dict(), pth)
    convert.convert(pth, ckpt)
  results: dict = {}
  loads = []
  for _ in range(_REPEATS.value):
    for n in sizes:
      for side in ("jax", "torch"):
        dst = os.path.join("bench_results", f"stream_features_{side}_{n}.npy")
        for p in (dst, dst + ".partial"):
          if os.path.exists(p):
            os.remove(p)
        r = _child(side, root, ckpt, pth, n, dst)
        results.setdefault((side, n), []).append(r)
        logging.info("%s %d images: %.1f s, peak %.0f MiB", side, n, r["seconds"], r["maxrss_mib"])
      loads.append(os.getloadavg()[0])
  rows = []
  for n in sizes:
    ref = None
    for side, who in (("torch", "torchvision DataLoader + PyTorch"), ("jax", "jaxattr")):
      rs = results[(side, n)]
      s = bench.summarize([r["seconds"] for r in rs])
      row = {
          "who": who,
          "images": n,
          "images/s": n / s["median_s"],
          "min images/s": n / s["max_s"],
          "max images/s": n / s["min_s"],
          "peak MiB": max(r["maxrss_mib"] for r in rs)
      }
      ref = ref or row
      row["vs torch"] = row["images/s"] / ref["images/s"]
      rows.append(row)
    ours = np.load(os.path.join("bench_results", f"stream_features_jax_{n}.npy"))
    ref_feats = np.load(os.path.join("bench_results", f"stream_features_torch_{n}.npy"))
    rows[-1]["max diff / max"] = float(np.abs(ours - ref_feats).max() / np.abs(ref_feats).max())
  print(
      bench.format_table(rows, [
          "who", "images", "images/s", "min images/s", "max images/s", "vs torch", "peak MiB",
          "max diff / max"
      ]))
  print(f"load1 per round: {[round(x, 2) for x in loads]}; decode workers/threads "
        f"{_WORKERS.value}, batch {_BATCH.value}")
  bench.write_result(
      _OUT.value, "stream_features", rows, {
          "flags": {
              k: flags.FLAGS[k].value for k in ("images", "batch", "workers", "repeats")
          },
          "tree": root,
          "loadavg_rounds": loads,
          "cpu_count": os.cpu_count()
      })


if __name__ == "__main__":
  app.run(main)

r"""A generated ImageNet-layout tree (issue #16): wnid class folders of JPEGs with odd sizes and
aspect ratios, a CMYK JPEG, a grayscale JPEG, a PNG named .JPEG, a flat validation folder labelled
by LOC_val_solution.csv and by a devkit ground-truth file with a meta.mat. The tests, the README's
tiny ImageNet run and the loader benchmarks use it (no ImageNet download here).

  python -m benchmarks.imagenet_tree /tmp/imagenet_tiny            # 3 classes, 9 + 6 images
  python -m benchmarks.imagenet_tree /tmp/imagenet_big --classes=8 --per_class=64 \
      --val_per_class=8 --width=500 --height=375                    # ImageNet-sized JPEGs
"""

from __future__ import annotations

import io
import os

import numpy as np

WNIDS = ("n01440764", "n01443537", "n01484850")  # sorted: the class order
TRAIN_SIZES = {  # per class: (width, height) of each training image
    "n01440764": [(37, 53), (80, 41), (64, 64)],
    "n01443537": [(45, 30), (30, 45), (51, 50), (33, 71)],
    "n01484850": [(40, 40), (90, 35)],
}
# Flat validation images: (file number, wnid), out of class order; the devkit's ids of the wnids
# follow its own order (not sorted), as the real devkit's do.
VAL = [(1, "n01484850"), (2, "n01440764"), (3, "n01443537"), (4, "n01440764"), (5, "n01484850"),
       (6, "n01443537")]
DEVKIT_IDS = {"n01484850": 1, "n01440764": 2, "n01443537": 3}


def _image(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
  # Smooth gradients plus noise: natural-looking enough for JPEG and resampling.
  yy, xx = np.mgrid[0:h, 0:w]
  base = np.stack([xx * 255 / max(w - 1, 1), yy * 255 / max(h - 1, 1), (xx + yy) % 256], -1)
  return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def _jpeg(array: np.ndarray, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
  from PIL import Image  # pylint: disable=g-import-not-at-top

  im = Image.fromarray(array)
  if mode == "L":
    im = im.convert("L")
  elif mode == "CMYK":
    im = im.convert("CMYK")
  buf = io.BytesIO()
  im.save(buf, format=fmt, quality=90)
  return buf.getvalue()


def write_meta_mat(path: str, ids: dict[str, int], field: str = "synsets") -> None:
  """A devkit-style meta.mat: a struct array of synsets (ILSVRC2012_ID, WNID, words)."""
  from scipy import io as sio  # pylint: disable=g-import-not-at-top

  dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O")]
  rows = np.zeros((len(ids),), dtype=dtype)
  for k, (wnid, i) in enumerate(sorted(ids.items(), key=lambda kv: kv[1])):
    rows[k] = (np.array([[i]], np.uint16), np.array([wnid]), np.array([f"class {i}"]))
  sio.savemat(path, {field: rows[:, None]})


def make_sized_tree(root: str, classes: int, per_class: int, val_per_class: int, width: int,
                    height: int, seed: int = 0) -> dict:
  """A larger tree of natural-looking JPEGs of about width x height (sizes jittered by up to
  20%), a flat validation folder with LOC_val_solution.csv; returns the listing like `make_tree`."""
  rng = np.random.default_rng(seed)
  wnids = [f"n{10000000 + 7919 * c:08d}" for c in range(classes)]
  listing = {"train": [], "val": []}

  def size():
    return (max(8, int(width * rng.uniform(0.8, 1.2))), max(8, int(height * rng.uniform(0.8, 1.2))))

  for label, wnid in enumerate(wnids):
    os.makedirs(os.path.join(root, "train", wnid))
    for k in range(per_class):
      name = f"{wnid}_{k + 1:05d}.JPEG"
      with open(os.path.join(root, "train", wnid, name), "wb") as f:
        f.write(_jpeg(_image(rng, *size())))
      listing["train"].append((f"train/{wnid}/{name}", label))
  os.makedirs(os.path.join(root, "val"))
  rows = []
  for number in range(1, classes * val_per_class + 1):
    label = (number * 7) % classes
    name = f"ILSVRC2012_val_{number:08d}.JPEG"
    with open(os.path.join(root, "val", name), "wb") as f:
      f.write(_jpeg(_image(rng, *size())))
    rows.append(f"ILSVRC2012_val_{number:08d},{wnids[label]} 0 0 1 1\n")
    listing["val"].append((f"val/{name}", label))
  with open(os.path.join(root, "LOC_val_solution.csv"), "w") as f:
    f.write("ImageId,PredictionString\n" + "".join(rows))
  listing["val"].sort(key=lambda fl: (fl[1], fl[0]))
  return listing


def make_tree(root: str, *, flat_val: bool = True, csv: bool = True, devkit: bool = True,
              seed: int = 0) -> dict:
  """Writes the tree; returns the independent listing {'train': [(file, label)], 'val': [...]}."""
  rng = np.random.default_rng(seed)
  listing = {"train": [], "val": []}
  for label, wnid in enumerate(WNIDS):
    os.makedirs(os.path.join(root, "train", wnid))
    for k, (w, h) in enumerate(TRAIN_SIZES[wnid]):
      name = f"{wnid}_{k + 1:05d}.JPEG"
      mode, fmt = "RGB", "JPEG"
      if (wnid, k) == ("n01440764", 1):
        mode = "CMYK"
      elif (wnid, k) == ("n01443537", 2):
        mode = "L"
      elif (wnid, k) == ("n01484850", 1):
        fmt = "PNG"  # a PNG with a .JPEG name, as ImageNet holds one
      with open(os.path.join(root, "train", wnid, name), "wb") as f:
        f.write(_jpeg(_image(rng, w, h), mode, fmt))
      listing["train"].append((f"train/{wnid}/{name}", label))
  for number, wnid in VAL:
    name = f"ILSVRC2012_val_{number:08d}.JPEG"
    folder = os.path.join(root, "val") if flat_val else os.path.join(root, "val", wnid)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "wb") as f:
      f.write(_jpeg(_image(rng, 30 + 7 * number, 60 - 3 * number)))
    rel = f"val/{name}" if flat_val else f"val/{wnid}/{name}"
    listing["val"].append((rel, WNIDS.index(wnid)))
  listing["val"].sort(key=lambda fl: (fl[1], fl[0].rsplit("/", 1)[-1]))
  if flat_val and csv:
    with open(os.path.join(root, "LOC_val_solution.csv"), "w") as f:
      f.write("ImageId,PredictionString\n")
      for number, wnid in reversed(VAL):  # any row order
        f.write(f"ILSVRC2012_val_{number:08d},{wnid} 1 2 20 30 {wnid} 3 4 10 12\n")
  if flat_val and devkit:
    data = os.path.join(root, "ILSVRC2012_devkit_t12", "data")
    os.makedirs(data)
    with open(os.path.join(data, "ILSVRC2012_validation_ground_truth.txt"), "w") as f:
      f.write("".join(f"{DEVKIT_IDS[w]}\n" for _, w in VAL))
    write_meta_mat(os.path.join(data, "meta.mat"), DEVKIT_IDS)
  return listing


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top

  f = flags.FLAGS
  if len(argv) != 2:
    raise SystemExit("usage: python -m benchmarks.imagenet_tree DIR [--classes=N ...]")
  if os.path.exists(argv[1]):
    raise SystemExit(f"{argv[1]} exists; pass a new directory")
  if f.classes:
    make_sized_tree(argv[1], f.classes, f.per_class, f.val_per_class, f.width, f.height)
  else:
    make_tree(argv[1])
  print(f"wrote {argv[1]}")


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_integer("classes", 0, "Classes of a sized tree (0: the small test tree).")
  flags.DEFINE_integer("per_class", 64, "Training images per class of a sized tree.")
  flags.DEFINE_integer("val_per_class", 8, "Validation images per class of a sized tree.")
  flags.DEFINE_integer("width", 500, "Mean image width of a sized tree.")
  flags.DEFINE_integer("height", 375, "Mean image height of a sized tree.")
  app.run(main)

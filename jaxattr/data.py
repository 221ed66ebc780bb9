"""Image data sources, all returning the same in-memory record.

`load(source, split, **options)` understands:

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes), scaled from
  0..16 to 0..255, resized (bilinear) to ``size`` x ``size`` (default 32) and replicated to RGB.
  Split: a permutation of the 1,797 images by ``np.random.default_rng(0)``; its first 1,438
  (80%, rounded) are ``train``, the remaining 359 ``test``. Within a split images keep
  scikit-learn's order, and ``index`` is the position in that split.
* ``folder:PATH``: a class-per-subfolder tree ``PATH/{train,test}/<class>/<image>``, where PATH is a
  directory or a ``.tar``/``.tar.gz``/``.tgz`` archive of one (optionally below one top folder).
  Canonical order: sorted class folder, then sorted file name (as torchvision's ImageFolder).
* ``npz:PATH``: arrays ``x_train, y_train, x_test, y_test`` (+ optional ``class_names``).
* ``tfds:NAME``: an already prepared tensorflow-datasets dataset, read without TensorFlow, returned
  in the dataset's ORIGINAL order recovered from its ``id`` feature (``train_00042`` -> 42), which
  is the order torchvision uses, so indices match the PyTorch reference.

Every record holds uint8 images [N, H, W, 3], int32 labels [N], the class names and ``index``
(int64 [N]): each example's position in the source's canonical order for that split. Options common
to all sources: ``size`` (resize to size x size), ``limit_per_class`` (keep the first n of each
class in canonical order; ``index`` still refers to the full split).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import io
import os
import re
import tarfile
from typing import Any, Sequence

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")
SPLITS = ("train", "test")


class DataError(ValueError):
  """Bad or missing input data; the message names the file, key or split."""


@dataclasses.dataclass
class Dataset:
  """One split of an image dataset, in memory.

  Attributes:
    images: uint8 [N, H, W, 3].
    labels: int32 [N], values in [0, len(class_names)).
    class_names: one name per label id.
    index: int64 [N], each example's position in the source's canonical order of the split.
    source: the source string given to `load`.
    split: 'train' or 'test'.
  """

  images: np.ndarray
  labels: np.ndarray
  class_names: list[str]
  index: np.ndarray
  source: str = ""
  split: str = ""

  def __post_init__(self):
    n = len(self.images)
    if self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
      raise DataError(f"{self.source}:{self.split}: images must be uint8 [N, H, W, 3], got "
                      f"{self.images.dtype} {self.images.shape}")
    if len(self.labels) != n or len(self.index) != n:
      raise DataError(f"{self.source}:{self.split}: {n} images but {len(self.labels)} labels and "
                      f"{len(self.index)} indices")
    if n and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
      raise DataError(
          f"{self.source}:{self.split}: labels must lie in [0, {len(self.class_names)}), got "
          f"[{self.labels.min()}, {self.labels.max()}]")

  def __len__(self) -> int:
    return len(self.images)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def subset(self, positions: np.ndarray) -> "Dataset":
    """The examples at `positions` (positions in this record, not `index` values)."""
    positions = np.asarray(positions)
    return dataclasses.replace(self, images=self.images[positions], labels=self.labels[positions],
                               index=self.index[positions])


def load(source: str, split: str, **options: Any) -> Dataset:
  """Loads one split of `source` (see the module docstring for sources and options).

  Args:
    source: 'digits', 'folder:PATH', 'npz:PATH' or 'tfds:NAME'.
    split: 'train' or 'test'.
    **options: `size`, `limit_per_class`, and per-source options (`data_dir` for tfds, `seed`
      is fixed for digits and not an option).

  Returns:
    The split as a `Dataset`.

  Raises:
    DataError: a missing path, an unknown source or split, an empty class folder, an unreadable
      image, or arrays of mismatched lengths.
  """
  if split not in SPLITS:
    raise DataError(f"unknown split {split!r} for {source!r}; expected one of {SPLITS}")
  size = options.pop("size", None)
  limit = options.pop("limit_per_class", None)
  kind, _, arg = source.partition(":")
  if kind == "digits":
    ds = _load_digits(split, size=size or 32, **options)
  elif kind == "folder":  # decodes only the images it keeps
    ds = _load_folder(_require_arg(source, arg), split, size=size, limit=limit, **options)
    limit = None
  elif kind == "npz":
    ds = _load_npz(_require_arg(source, arg), split, **options)
  elif kind == "tfds":
    ds = _load_tfds(_require_arg(source, arg), split, **options)
  else:
    raise DataError(
        f"unknown data source {source!r}; expected 'digits', 'folder:PATH', 'npz:PATH' or "
        "'tfds:NAME'")
  ds.source, ds.split = source, split
  if size is not None and ds.images.shape[1:3] != (size, size):
    ds.images = resize(ds.images, size)
  if limit is not None:
    ds = ds.subset(_first_per_class(ds.labels, int(limit)))
  return ds


def load_splits(data_config: Any) -> tuple[Dataset, Dataset]:
  """(train, test) of a config's `data` section: `source` plus the `options` given (not None).

  Args:
    data_config: `config.data` (`jaxattr.config.data_section()`): `source` and `options`
      (`size`, `limit_per_class`, ...), applied to both splits.

  Returns:
    (train, test) `Dataset`s.
  """
  options = {k: v for k, v in dict(data_config.options).items() if v is not None}
  return (load(data_config.source, "train", **options), load(data_config.source, "test", **options))


def _require_arg(source: str, arg: str) -> str:
  if not arg:
    raise DataError(f"data source {source!r} needs an argument after the colon")
  return arg


def _first_per_class(labels: np.ndarray, limit: int) -> np.ndarray:
  keep = np.zeros(len(labels), bool)
  for c in np.unique(labels):
    keep[np.flatnonzero(labels == c)[:limit]] = True
  return np.flatnonzero(keep)


def resize(images: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize of uint8 [N, H, W, 3] to [N, size, size, 3] (Pillow)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  out = np.empty((len(images), size, size, 3), np.uint8)
  for i, im in enumerate(images):
    out[i] = np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR))
  return out


# ----------------------------------------------------------------------------------------------
# digits


def _load_digits(split: str, size: int = 32) -> Dataset:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  digits = load_digits()
  perm = np.random.default_rng(0).permutation(len(digits.images))
  n_train = int(round(0.8 * len(perm)))
  chosen = np.sort(perm[:n_train] if split == "train" else perm[n_train:])
  gray = np.clip(digits.images[chosen] * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
  images = np.empty((len(chosen), size, size, 3), np.uint8)
  for i, g in enumerate(gray):
    images[i] = np.asarray(Image.fromarray(g).resize((size, size), Image.BILINEAR))[..., None]
  return Dataset(images=images, labels=digits.target[chosen].astype(np.int32), class_names=[
      str(c) for c in range(10)
  ], index=np.arange(len(chosen), dtype=np.int64))


# ----------------------------------------------------------------------------------------------
# folder / tar


def _limited(files: list[str], labels: np.ndarray,
             limit: int | None) -> tuple[list[str], np.ndarray, np.ndarray]:
  """The first `limit` files of each class (all when None), their labels and split positions."""
  pos = np.arange(len(files)) if limit is None else _first_per_class(labels, int(limit))
  return [files[i] for i in pos], labels[pos], pos.astype(np.int64)


def _load_folder(path: str, split: str, size: int | None = None, limit: int | None = None,
                 workers: int = 4) -> Dataset:
  if not os.path.exists(path):
    raise DataError(f"folder source: path does not exist: {path}")
  if os.path.isdir(path):
    entries = _scan_directory(path)
    reader = _DirReader(path)
  elif path.endswith((".tar", ".tar.gz", ".tgz")):
    st = os.stat(path)
    # A shallow copy: callers may rebind fields, the cached arrays stay shared (read-only).
    return dataclasses.replace(
        _load_tar_cached(os.path.abspath(path), st.st_mtime_ns, st.st_size, split, size, limit))
  else:
    raise DataError(f"folder source: {path} is neither a directory nor a .tar/.tar.gz/.tgz file")
  files, labels, class_names = _layout(entries, split, path)
  files, labels, index = _limited(files, labels, limit)
  images = _decode_all(reader, files, size, workers)
  return Dataset(images=images, labels=labels, class_names=class_names, index=index)


def _scan_directory(root: str) -> list[str]:
  out = []
  for dirpath, _, filenames in os.walk(root):
    rel = os.path.relpath(dirpath, root)
    for name in filenames:
      out.append(os.path.normpath(os.path.join(rel, name)).replace(os.sep, "/"))
    if rel != "." and not filenames:
      out.append(rel.replace(os.sep, "/") + "/")  # keeps empty folders visible
  return out


def _layout(entries: Sequence[str], split: str,
            where: str) -> tuple[list[str], np.ndarray, list[str]]:
  """Splits archive/directory entries into (files of `split`, labels, class names).

  Classes are the sorted class folders of the train split, so both splits share label ids.
  Entries may lie below one top-level folder (``cifar10/train/...``).
  """
  prefix = _find_prefix(entries, where)
  per_split: dict[str, dict[str, list[str]]] = {s: {} for s in SPLITS}
  for e in entries:
    if not e.startswith(prefix):
      continue
    parts = e[len(prefix):].split("/")
    if len(parts) < 2 or parts[0] not in SPLITS:
      continue
    s, cls = parts[0], parts[1]
    if not cls:
      continue
    bucket = per_split[s].setdefault(cls, [])
    if len(parts) == 3 and parts[2] and parts[2].lower().endswith(IMAGE_SUFFIXES):
      bucket.append(e)
  if not per_split[split]:
    found = [s for s in SPLITS if per_split[s]]
    raise DataError(f"folder source {where}: no '{prefix}{split}/<class>/' folders found "
                    f"(splits present: {found or 'none'})")
  class_names = sorted(per_split["train"] or per_split[split])
  for s in SPLITS:
    for cls, files in per_split[s].items():
      if not files:
        raise DataError(f"folder source {where}: class folder '{prefix}{s}/{cls}/' has no images")
      if cls not in class_names:
        raise DataError(f"folder source {where}: class '{cls}' of split '{s}' is not a class of "
                        f"the train split {class_names}")
  files, labels = [], []
  for label, cls in enumerate(class_names):
    for f in sorted(per_split[split].get(cls, [])):
      files.append(f)
      labels.append(label)
  return files, np.asarray(labels, np.int32), class_names


def _find_prefix(entries: Sequence[str], where: str) -> str:
  tops = {e.split("/")[0] for e in entries}
  if tops & set(SPLITS):
    return ""
  if len(tops) == 1:
    top = tops.pop()
    if {e.split("/")[1] for e in entries if e.count("/") >= 1} & set(SPLITS):
      return top + "/"
  raise DataError(f"folder source {where}: expected train/ and test/ folders at the top "
                  f"(or below one top folder), found {sorted(tops)[:5]}")


class _DirReader:

  def __init__(self, root: str):
    self.root = root

  def read(self, name: str) -> bytes:
    with open(os.path.join(self.root, name), "rb") as f:
      return f.read()

  def where(self, name: str) -> str:
    return os.path.join(self.root, name)


def _decode(data: bytes, where: str, size: int | None) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top

  try:
    with Image.open(io.BytesIO(data)) as im:
      im = im.convert("RGB")
      if size is not None and im.size != (size, size):
        im = im.resize((size, size), Image.BILINEAR)
      return np.asarray(im, np.uint8)
  except Exception as e:  # Pillow raises several types
    raise DataError(f"unreadable image {where}: {e}") from e


def _stack(arrays: list[np.ndarray], names: Sequence[str]) -> np.ndarray:
  if not arrays:
    return np.zeros((0, 1, 1, 3), np.uint8)
  shape = arrays[0].shape
  for a, name in zip(arrays, names):
    if a.shape != shape:
      raise DataError(f"image {name} has shape {a.shape} but {names[0]} has {shape}; pass "
                      "size=N to resize all images")
  return np.stack(arrays)


def _decode_all(reader: _DirReader, files: Sequence[str], size: int | None,
                workers: int) -> np.ndarray:

  def one(name):
    return _decode(reader.read(name), reader.where(name), size)

  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    arrays = list(pool.map(one, files))
  return _stack(arrays, [reader.where(f) for f in files])


@functools.lru_cache(maxsize=4)
def _load_tar_cached(path: str, mtime_ns: int, nbytes: int, split: str, size: int | None,
                     limit: int | None) -> Dataset:
  del mtime_ns, nbytes  # only part of the cache key
  try:
    tar = tarfile.open(path, "r:*")
  except (tarfile.TarError, OSError) as e:
    raise DataError(f"folder source: cannot open archive {path}: {e}") from e
  with tar:
    members = tar.getmembers()
    entries = [m.name.lstrip("./") + ("/" if m.isdir() else "") for m in members]
    files, labels, class_names = _layout(entries, split, path)
    files, labels, index = _limited(files, labels, limit)
    by_name = {e: m for e, m in zip(entries, members)}
    # Sequential reads (gzip streams cannot seek cheaply), threaded decodes.
    wanted = set(files)
    blobs: dict[str, bytes] = {}
    for e, m in zip(entries, members):
      if e in wanted:
        f = tar.extractfile(m)
        if f is None:
          raise DataError(f"unreadable image {path}:{e}: not a regular file")
        blobs[e] = f.read()
    del by_name
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    arrays = list(pool.map(lambda e: _decode(blobs[e], f"{path}:{e}", size), files))
  images = _stack(arrays, [f"{path}:{e}" for e in files])
  images.setflags(write=False)  # shared by the cache
  return Dataset(images=images, labels=labels, class_names=class_names, index=index)


# ----------------------------------------------------------------------------------------------
# npz


def _load_npz(path: str, split: str) -> Dataset:
  if not os.path.exists(path):
    raise DataError(f"npz source: file does not exist: {path}")
  try:
    z = np.load(path, allow_pickle=False)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"npz source: cannot read {path}: {e}") from e
  with z:
    xk, yk = f"x_{split}", f"y_{split}"
    for k in (xk, yk):
      if k not in z.files:
        raise DataError(f"npz source {path}: missing key {k!r} (keys: {sorted(z.files)})")
    x, y = z[xk], z[yk]
    names = [str(c) for c in z["class_names"]] if "class_names" in z.files else None
  if len(x) != len(y):
    raise DataError(f"npz source {path}: {xk} has {len(x)} images but {yk} has {len(y)} labels")
  if x.ndim == 3:
    x = np.repeat(x[..., None], 3, axis=-1)
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise DataError(f"npz source {path}: {xk} must be [N, H, W, 3] (or [N, H, W]), got {x.shape}")
  if x.shape[-1] == 1:
    x = np.repeat(x, 3, axis=-1)
  if x.dtype != np.uint8:
    if np.issubdtype(x.dtype, np.floating) and x.size and x.max() <= 1.0:
      x = x * 255.0
    x = np.clip(np.round(x), 0, 255).astype(np.uint8)
  y = np.asarray(y).astype(np.int32).reshape(-1)
  if names is None:
    names = [str(c) for c in range(int(y.max()) + 1 if len(y) else 0)]
  return Dataset(images=x, labels=y, class_names=names, index=np.arange(len(y), dtype=np.int64))


# ----------------------------------------------------------------------------------------------
# tfds (read-only, TensorFlow-free)

_ID_RE = re.compile(r"(\d+)\s*$")


def order_from_ids(ids: Sequence[Any], where: str = "tfds") -> np.ndarray:
  """Original positions from tfds `id` features (b'train_00042' -> 42).

  Returns:
    int64 [N]: the original position of each record. Raises if an id has no trailing number or
    the numbers are not a permutation of 0..N-1.
  """
  out = np.empty(len(ids), np.int64)
  for i, raw in enumerate(ids):
    s = raw.decode() if isinstance(raw, (bytes, np.bytes_)) else str(raw)
    m = _ID_RE.search(s)
    if not m:
      raise DataError(f"{where}: id {s!r} of record {i} has no trailing number")
    out[i] = int(m.group(1))
  if len(out) and not np.array_equal(np.sort(out), np.arange(len(out))):
    raise DataError(f"{where}: ids are not a permutation of 0..{len(out) - 1}; cannot recover the "
                    "original order")
  return out


def _load_tfds(name: str, split: str, data_dir: str | None = None) -> Dataset:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    where = data_dir or "~/tensorflow_datasets"
    raise DataError(
        f"tfds dataset {name!r} is not prepared in {where}. Prepare it once (needs TensorFlow):\n"
        f"  pip install 'jaxattr[tf]'\n"
        f"  tfds build {name} --data_dir={where} --manual_dir=MANUAL_DIR\n"
        "Offline, first put the dataset's original archive (e.g. cifar-10-python.tar.gz) in "
        f"MANUAL_DIR (or in {where}/downloads/manual/).")
  if split not in builder.info.splits:
    raise DataError(f"tfds dataset {name!r} has no split {split!r} "
                    f"(splits: {sorted(builder.info.splits)})")
  source = builder.as_data_source()[split]
  features = builder.info.features
  if "id" not in features:
    raise DataError(f"tfds dataset {name!r} has no 'id' feature; cannot recover its original "
                    "order")
  n = len(source)
  records = [source[i] for i in range(n)]
  order = order_from_ids([r["id"] for r in records], where=f"tfds:{name}:{split}")
  inv = np.argsort(order)
  images = np.stack([np.asarray(records[i]["image"]) for i in inv])
  if images.ndim == 3:
    images = images[..., None]
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  labels = np.asarray([records[i]["label"] for i in inv], np.int32)
  names = list(features["label"].names)
  return Dataset(images=images.astype(np.uint8), labels=labels, class_names=names, index=order[inv])

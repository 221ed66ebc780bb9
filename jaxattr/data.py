"""Image data sources, all returning the same in-memory record.

`load(source, split, **options)` understands (`parse_source` checks the source string):

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes), scaled from
  0..16 to 0..255, resized (bilinear) to ``size`` x ``size`` (default 32) and replicated to RGB.
  Split: a permutation of the 1,797 images by ``np.random.default_rng(0)``; its first 1,438
  (80%, rounded) are ``train``, the remaining 359 ``test``. Within a split images keep
  scikit-learn's order, and ``index`` is the position in that split.
* ``folder:PATH``: a class-per-subfolder tree ``PATH/{train,test}/<class>/<image>``, where PATH is a
  directory or a ``.tar``/``.tar.gz``/``.tgz`` archive of one (optionally below one top folder).
  ImageNet's layouts too (`jaxattr.folders`): ``val/`` as the test split, in class folders or flat
  (``val/ILSVRC2012_val_*.JPEG``, labelled by ``LOC_val_solution.csv`` or the devkit's ground
  truth and ``meta.mat``). Canonical order: sorted class folder, then sorted file name (as
  torchvision ImageFolder). Files without an image suffix are ignored; an image directly in a
  class-folder split or below a class folder's subfolder is an error, as is a truncated or
  corrupt archive. Every image decodes to RGB (grayscale, CMYK, a PNG named .JPEG). Options
  ``workers`` (decode threads of a directory, default 4) and ``val_labels`` (a flat validation
  folder's label file, when it is not in the tree). `jaxattr.stream` opens a directory tree
  lazily (names and labels, no pixels) for splits that do not fit in memory.
* ``npz:PATH``: arrays ``x_train, y_train, x_test, y_test`` (+ optional ``class_names``: 1-D,
  strings, or bytes decoded as UTF-8).
  ``x_*``: [N, H, W], [N, H, W, 1] or [N, H, W, 3] with N >= 1, either integers in [0, 255] or
  finite floats, which are multiplied by 255 when all lie in [0, 1] and otherwise must lie in
  [0, 255]; values are then rounded to uint8. Anything else (NaN/inf, values outside those
  ranges, bool or other non-numeric arrays) is an error, never clipped. ``y_*``: [N] or [N, 1]
  integer class ids, or floats that are whole numbers, in [0, len(class_names)); without
  ``class_names`` the classes are ``'0'..'C-1'`` with C = 1 + the largest label of ``y_train`` and
  ``y_test``, so both splits share them.
* ``tfds:NAME``: an already prepared tensorflow-datasets dataset, read without TensorFlow, returned
  in the dataset's ORIGINAL order recovered from its ``id`` feature (``train_00042`` -> 42), which
  is the order torchvision uses, so indices match the PyTorch reference. Option ``data_dir``.

Every record holds uint8 images [N, H, W, 3], int32 labels [N], the class names and ``index``
(int64 [N]): each example's position in the source's canonical order for that split. Options common
to all sources: ``size`` (an int >= 1: resize to size x size), ``limit_per_class`` (an int >= 1:
keep the first n of each class in canonical order; ``index`` still refers to the full split).
`check_options` rejects any other option, and a bad value, before anything is read; an option set to
None counts as not given. Bad input raises one `DataError` that names the file, key or option.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import io
import os
import re
import tarfile
import zlib
from typing import Any, Sequence

import numpy as np

from jaxattr import folders
from jaxattr.folders import IMAGE_SUFFIXES, SPLITS, DataError  # noqa: F401 (re-exported)


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
    ok: None, or bool [N] with False for images that were unreadable when a resident copy was
      prepared with skip_unreadable (black images there, which the trainer never trains on).
  """

  images: np.ndarray
  labels: np.ndarray
  class_names: list[str]
  index: np.ndarray
  source: str = ""
  split: str = ""
  ok: np.ndarray | None = None

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
    if self.ok is not None and (np.shape(self.ok) != (n,) or np.asarray(self.ok).dtype != bool):
      raise DataError(f"{self.source}:{self.split}: ok must be bool [{n}], got "
                      f"{np.asarray(self.ok).dtype} {np.shape(self.ok)}")

  def __len__(self) -> int:
    return len(self.images)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def subset(self, positions: np.ndarray) -> "Dataset":
    """The examples at `positions` (positions in this record, not `index` values)."""
    positions = np.asarray(positions)
    return dataclasses.replace(self, images=self.images[positions], labels=self.labels[positions],
                               index=self.index[positions],
                               ok=None if self.ok is None else self.ok[positions])


def load(source: str, split: str, **options: Any) -> Dataset:
  """Loads one split of `source` (see the module docstring for sources and options).

  Args:
    source: 'digits', 'folder:PATH', 'npz:PATH' or 'tfds:NAME'.
    split: 'train' or 'test'.
    **options: `size`, `limit_per_class`, and per-source options (`workers` for folder,
      `data_dir` for tfds; `seed` is fixed for digits and not an option). None = not given.

  Returns:
    The split as a `Dataset`.

  Raises:
    DataError: a missing path, an unknown source, split or option, a bad option value (all
      before anything is read), an empty class folder, an unreadable image or archive, or arrays
      of bad values, types, shapes or mismatched lengths.
  """
  if split not in SPLITS:
    raise DataError(f"unknown split {split!r} for {source!r}; expected one of {SPLITS}")
  kind, arg = parse_source(source)
  check_options(kind, options)
  options = {k: v for k, v in options.items() if v is not None}
  size = options.pop("size", None)
  limit = options.pop("limit_per_class", None)
  if kind == "digits":
    ds = _load_digits(split, size=32 if size is None else size)
  elif kind == "folder":  # decodes only the images it keeps
    ds = _load_folder(arg, split, size=size, limit=limit, **options)
    limit = None
  elif kind == "npz":
    ds = _load_npz(arg, split)
  else:
    ds = _load_tfds(arg, split, **options)
  ds.source, ds.split = source, split
  if size is not None and ds.images.shape[1:3] != (size, size):
    ds.images = resize(ds.images, size)
  if limit is not None:
    ds = ds.subset(_first_per_class(ds.labels, limit))
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


SOURCE_FORMS = "'digits', 'folder:PATH', 'npz:PATH' or 'tfds:NAME'"
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
COMMON_OPTIONS = ("size", "limit_per_class")
# The options each kind of source takes besides COMMON_OPTIONS.
SOURCE_OPTIONS = {
    "digits": (),
    "folder": ("workers", "val_labels"),
    "npz": (),
    "tfds": ("data_dir",)
}


def parse_source(source: str) -> tuple[str, str]:
  """Splits and checks a source string: ('digits', ''), ('folder', PATH), ('npz', PATH), ...

  Checks what needs no reading: the kind, that it has its argument (and 'digits' none), that a
  folder PATH is a directory or a .tar/.tar.gz/.tgz file and that an npz PATH exists.

  Args:
    source: 'digits', 'folder:PATH', 'npz:PATH' or 'tfds:NAME'.

  Returns:
    (kind, argument), the argument '' for 'digits'.

  Raises:
    DataError: naming the source and the accepted forms.
  """
  if not isinstance(source, str):
    raise DataError(f"data.source must be a string, one of {SOURCE_FORMS}; got {source!r}")
  kind, colon, arg = source.partition(":")
  if kind not in SOURCE_OPTIONS:
    raise DataError(f"unknown data source {source!r}; expected {SOURCE_FORMS}")
  if kind == "digits":
    if colon:
      raise DataError(f"data source {source!r}: 'digits' takes no argument; write 'digits'")
    return kind, ""
  if not arg:
    raise DataError(f"data source {source!r} needs an argument after the colon")
  if kind == "folder":
    if not os.path.exists(arg):
      raise DataError(f"folder source: path does not exist: {arg}")
    if not os.path.isdir(arg) and not arg.endswith(ARCHIVE_SUFFIXES):
      raise DataError(f"folder source: {arg} is neither a directory nor a .tar/.tar.gz/.tgz file")
  elif kind == "npz" and not os.path.exists(arg):
    raise DataError(f"npz source: file does not exist: {arg}")
  return kind, arg


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_options(kind: str, options: dict[str, Any]) -> None:
  """Raises unless every option is one that `kind` sources take, with an allowed value.

  Args:
    kind: a source kind, as `parse_source` returns it ('digits', 'folder', 'npz', 'tfds').
    options: {name: value}; a value of None means not given (any name must still be known).

  Raises:
    DataError: naming `data.options.NAME`, the value and the allowed ones.
  """
  accepted = COMMON_OPTIONS + SOURCE_OPTIONS[kind]
  for name, value in options.items():
    if name not in accepted:
      raise DataError(f"data.options.{name} is not an option of {kind!r} sources; they accept "
                      f"{', '.join(accepted)}")
    if value is None:
      continue
    if name == "size" and not (_is_int(value) and value >= 1):
      raise DataError(f"data.options.size must be an int >= 1 (pixels per side), or None for "
                      f"the images' own size; got {value!r}")
    if name == "limit_per_class" and not (_is_int(value) and value >= 1):
      raise DataError(f"data.options.limit_per_class must be an int >= 1 (images kept per "
                      f"class), or None to keep all; got {value!r}")
    if name == "workers" and not (_is_int(value) and value >= 1):
      raise DataError(f"data.options.workers must be an int >= 1 (decode threads); got {value!r}")
    if name == "val_labels" and not (isinstance(value,
                                                (str, os.PathLike)) and os.path.isfile(value)):
      raise DataError(f"data.options.val_labels must be the path of an existing file "
                      f"({folders.LOC_CSV}, or the devkit's {folders.DEVKIT_TRUTH} with "
                      f"{folders.DEVKIT_META} beside it), or None to look in the tree; got "
                      f"{value!r}")
    if name == "data_dir" and not isinstance(value, (str, os.PathLike)):
      raise DataError(f"data.options.data_dir must be a directory path, or None for tfds' "
                      f"default; got {value!r}")


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
                 workers: int = 4, val_labels: str | None = None) -> Dataset:
  if not os.path.isdir(path):  # an archive: `parse_source` checked the path and its suffix
    st = os.stat(path)
    # A shallow copy: callers may rebind fields, the cached arrays stay shared (read-only).
    return dataclasses.replace(
        _load_tar_cached(os.path.abspath(path), st.st_mtime_ns, st.st_size, split, size, limit,
                         val_labels))
  entries = folders.scan_directory(path)
  reader = _DirReader(path)
  files, labels, class_names = folders.layout(entries, split, path, reader.read, val_labels)
  files, labels, index = _limited(files, labels, limit)
  images = _decode_all(reader, files, size, workers)
  return Dataset(images=images, labels=labels, class_names=class_names, index=index)


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
                     limit: int | None, val_labels: str | None = None) -> Dataset:
  del mtime_ns, nbytes  # only part of the cache key
  try:
    tar = tarfile.open(path, "r:*")
  except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
    raise DataError(f"folder source: cannot open archive {path} (not a tar archive, or truncated "
                    f"or corrupt): {e}") from e
  try:
    with tar:
      members = tar.getmembers()
      _check_tar_end(tar, path)
      entries = [m.name.lstrip("./") + ("/" if m.isdir() else "") for m in members]
      by_name = dict(zip(entries, members))

      def read(name: str) -> bytes:
        f = tar.extractfile(by_name[name])
        if f is None:
          raise DataError(f"{path}:{name}: not a regular file")
        return f.read()

      files, labels, class_names = folders.layout(entries, split, path, read, val_labels)
      files, labels, index = _limited(files, labels, limit)
      # Sequential reads (gzip streams cannot seek cheaply), threaded decodes.
      wanted = set(files)
      blobs: dict[str, bytes] = {}
      for e, m in zip(entries, members):
        if e in wanted:
          f = tar.extractfile(m)
          if f is None:
            raise DataError(f"unreadable image {path}:{e}: not a regular file")
          blobs[e] = f.read()
  except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
    raise DataError(_TAR_BROKEN.format(path=path, error=f"{type(e).__name__}: {e}")) from e
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    arrays = list(pool.map(lambda e: _decode(blobs[e], f"{path}:{e}", size), files))
  images = _stack(arrays, [f"{path}:{e}" for e in files])
  images.setflags(write=False)  # shared by the cache
  return Dataset(images=images, labels=labels, class_names=class_names, index=index)


_TAR_BROKEN = ("folder source: archive {path} is truncated or corrupt ({error}); re-download or "
               "re-create it")


def _check_tar_end(tar: tarfile.TarFile, path: str) -> None:
  """Raises unless the member list ended at the end-of-archive (zero) block.

  `tarfile` stops silently, as at the end, where an archive cut at a member boundary ends or where
  a header is garbage after the first one.
  """
  tar.fileobj.seek(tar.offset)
  block = tar.fileobj.read(tarfile.BLOCKSIZE)
  if block != tarfile.NUL * tarfile.BLOCKSIZE:
    what = "ends" if not block else "has an invalid header"
    raise DataError(
        _TAR_BROKEN.format(
            path=path, error=f"{what} after {len(tar.members)} members, at byte "
            f"{tar.offset} of the tar stream, without the end-of-archive block"))


# ----------------------------------------------------------------------------------------------
# npz


def _load_npz(path: str, split: str) -> Dataset:
  try:
    z = np.load(path, allow_pickle=False)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"npz source: cannot read {path}: {e}") from e
  if not isinstance(z, np.lib.npyio.NpzFile):
    raise DataError(f"npz source {path}: holds a single array, not an .npz archive of x_train, "
                    "y_train, x_test, y_test; write one with np.savez")
  with z:
    xk, yk = f"x_{split}", f"y_{split}"
    for k in (xk, yk):
      if k not in z.files:
        raise DataError(f"npz source {path}: missing key {k!r} (keys: {sorted(z.files)})")
    x, y = _npz_array(z, xk, path), _npz_array(z, yk, path)
    names = None
    if "class_names" in z.files:
      names = _npz_class_names(_npz_array(z, "class_names", path), path)
    other_ys = {k: _npz_array(z, k, path) for k in ("y_train", "y_test") if k in z.files}
    del other_ys[yk]
  x = _npz_images(x, path, xk)
  y = _npz_labels(y, path, yk, names)
  if len(x) != len(y):
    raise DataError(f"npz source {path}: {xk} has {len(x)} images but {yk} has {len(y)} labels")
  if names is None:  # both splits share the classes 0..C-1 of all their labels
    top = max(
        int(labels.max())
        for labels in [y] + [_npz_labels(v, path, k, None) for k, v in other_ys.items()]
        if len(labels))
    names = [str(c) for c in range(top + 1)]
  return Dataset(images=x, labels=y, class_names=names, index=np.arange(len(y), dtype=np.int64))


def _npz_array(z: Any, key: str, path: str) -> np.ndarray:
  try:
    return z[key]
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"npz source {path}: cannot read key {key!r} ({e}); store it as a plain "
                    "numeric or string array (no Python objects)") from e


def _npz_class_names(names: np.ndarray, path: str) -> list[str]:
  if names.ndim != 1:
    raise DataError(f"npz source {path}: class_names must be a 1-D array of names, got shape "
                    f"{names.shape}")
  return [c.decode() if isinstance(c, bytes) else str(c) for c in names.tolist()]


def _npz_images(x: np.ndarray, path: str, key: str) -> np.ndarray:
  """`key`'s images as uint8 [N, H, W, 3], after checking their shape, type and values."""
  if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] not in (1, 3)):
    raise DataError(f"npz source {path}: {key} must be [N, H, W, 3] (or [N, H, W]), got {x.shape}")
  if len(x) == 0 or x.shape[1] == 0 or x.shape[2] == 0:
    raise DataError(f"npz source {path}: {key} holds no pixels (shape {x.shape}); each split needs "
                    "at least one image of at least 1x1 pixels")
  is_float = np.issubdtype(x.dtype, np.floating)
  if not (is_float or np.issubdtype(x.dtype, np.integer)):
    raise DataError(f"npz source {path}: {key} has dtype {x.dtype}; images must be integers in "
                    "[0, 255] (uint8) or floats in [0, 1] or [0, 255]")
  if is_float:
    bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
    if bad:
      raise DataError(f"npz source {path}: {key} has {bad} non-finite values (NaN or inf); "
                      "replace them or drop those images")
    lo, hi = float(x.min()), float(x.max())
    if lo >= 0 and hi <= 1:
      x = x * 255.0
    elif lo < 0 or hi > 255:
      raise DataError(
          f"npz source {path}: {key} has float values in [{lo:g}, {hi:g}]; float images "
          "must lie in [0, 1] (multiplied by 255) or in [0, 255]")
  elif x.dtype != np.uint8:
    lo, hi = int(x.min()), int(x.max())
    if lo < 0 or hi > 255:
      raise DataError(
          f"npz source {path}: {key} has integer values in [{lo}, {hi}]; integer images "
          "must lie in [0, 255]")
  if x.dtype != np.uint8:
    x = np.clip(np.round(x), 0, 255).astype(np.uint8)
  if x.ndim == 3:
    x = x[..., None]
  if x.shape[-1] == 1:
    x = np.repeat(x, 3, axis=-1)
  return x


def _npz_labels(y: np.ndarray, path: str, key: str, names: list[str] | None) -> np.ndarray:
  """`key`'s labels as int32 [N], after checking their shape, type and values."""
  is_float = np.issubdtype(y.dtype, np.floating)
  if not (is_float or np.issubdtype(y.dtype, np.integer)):
    raise DataError(f"npz source {path}: {key} has dtype {y.dtype}; labels must be integer class "
                    "ids (or floats that are whole numbers)")
  if y.ndim == 2 and y.shape[1] == 1:
    y = y[:, 0]
  if y.ndim != 1:
    raise DataError(f"npz source {path}: {key} must be [N] (or [N, 1]) class ids, got shape "
                    f"{y.shape}")
  if is_float:
    bad = int(len(y) - np.count_nonzero(np.isfinite(y)))
    if bad:
      raise DataError(f"npz source {path}: {key} has {bad} non-finite labels (NaN or inf); labels "
                      "must be class ids")
    fractional = np.flatnonzero(y != np.round(y))
    if len(fractional):
      i = fractional[0]
      raise DataError(f"npz source {path}: {key} has {len(fractional)} fractional labels (e.g. "
                      f"{y[i]:g} at position {i}); labels must be whole class ids")
  if not len(y):
    return y.astype(np.int32)
  lo, hi = y.min(), y.max()
  if lo < 0:
    raise DataError(
        f"npz source {path}: {key} has negative labels (the smallest is {int(lo)}); labels "
        "must be class ids 0, 1, ...")
  if names is not None and hi >= len(names):
    raise DataError(
        f"npz source {path}: {key} has label {int(hi)} but class_names has {len(names)} "
        f"names; labels must lie in [0, {len(names)})")
  if hi > np.iinfo(np.int32).max:
    raise DataError(f"npz source {path}: {key} has label {int(hi)}, too large for a class id")
  return y.astype(np.int32)


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


def prepared_tfds_builder(name: str, data_dir: str | None = None) -> Any:
  """The tensorflow-datasets builder of `name`, which must be prepared in `data_dir`.

  Args:
    name: the tfds dataset name (the NAME of 'tfds:NAME').
    data_dir: tfds' data directory; None = its default (~/tensorflow_datasets).

  Returns:
    `tfds.builder(name, data_dir=data_dir)`.

  Raises:
    DataError: the dataset is not prepared; the message gives the command that prepares it.
  """
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
  return builder


def _load_tfds(name: str, split: str, data_dir: str | None = None) -> Dataset:
  builder = prepared_tfds_builder(name, data_dir)
  if split not in builder.info.splits:
    raise DataError(f"tfds dataset {name!r} has no split {split!r} "
                    f"(splits: {sorted(builder.info.splits)})")
  source = builder.as_data_source()[split]
  features = builder.info.features
  if "id" not in features:
    raise DataError(f"tfds dataset {name!r} has no 'id' feature; cannot recover its original "
                    "order")
  n = len(source)
  if not n:
    raise DataError(f"tfds dataset {name!r}: split {split!r} has no examples; each split needs "
                    "at least one image")
  records = [source[i] for i in range(n)]
  order = order_from_ids([r["id"] for r in records], where=f"tfds:{name}:{split}")
  inv = np.argsort(order)
  arrays = [np.asarray(records[i]["image"]) for i in inv]
  for i, a in zip(inv, arrays):
    if a.shape != arrays[0].shape:
      raise DataError(f"tfds dataset {name!r}: split {split!r} mixes image shapes ({a.shape} at "
                      f"original position {order[i]}, {arrays[0].shape} at 0); datasets of mixed "
                      "image sizes are not supported")
  images = np.stack(arrays)
  if images.ndim == 3:
    images = images[..., None]
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  labels = np.asarray([records[i]["label"] for i in inv], np.int32)
  names = list(features["label"].names)
  return Dataset(images=images.astype(np.uint8), labels=labels, class_names=names, index=order[inv])

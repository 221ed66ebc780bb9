"""Streamed image splits: opened lazily, decoded by parallel workers, never whole in memory.

`open_split(source, split)` lists a directory tree's split (`jaxattr.folders`: ImageNet's layouts
included) as a `FileSplit`: file names, labels and indices, no pixels (ImageNet's 1.28M training
images are ~140 GB of JPEGs); a prepared tfds dataset (e.g. `tfds:imagenet2012`, array_record
format) as a `TfdsSplit` in the same order, read without TensorFlow. `batches` reads a range of
it through grain: a random-access source, a picklable decode transform (`ResizeCrop`), batching,
and either threads in this process or `workers` spawned processes with bounded prefetch;
`shard_chunks` spreads fixed chunks of rows over processes. In-memory sources (digits, CIFAR)
keep `jaxattr.data.load`.

grain's multi-process prefetch reads absl flags: parse them before the first `batches` call with
workers > 0 (the launchers do; elsewhere `absl.flags.FLAGS(sys.argv[:1])`).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
from typing import Any, Iterator, NamedTuple

import numpy as np

from jaxattr import data as data_lib, folders, utils
from jaxattr.folders import DataError


class _LazySplit:
  """What both kinds of lazily opened split share (they have `files`, `labels`, `class_names`
  and `index` fields)."""

  def __len__(self) -> int:
    return len(self.files)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def images(self) -> "Thumbnails":
    """The images, decoded one at a time when indexed (grids and reports show a few)."""
    return Thumbnails(self)

  def subset(self, positions: np.ndarray) -> Any:
    """The items at `positions` (positions in this split, not `index` values)."""
    positions = np.asarray(positions, np.int64)
    return dataclasses.replace(self, files=tuple(self.files[i] for i in positions),
                               labels=self.labels[positions], index=self.index[positions])


@dataclasses.dataclass(frozen=True, eq=False)
class FileSplit(_LazySplit):
  """A split of a directory tree, opened lazily: what `jaxattr.data.Dataset` holds, minus pixels.

  A grain random-access source: item i is (path, label, index). Picklable (workers get a copy).

  Attributes:
    root: the tree's directory.
    files: paths relative to `root`, in the canonical order.
    labels: int32 [N].
    class_names: one name per label id (ImageNet: wnids).
    index: int64 [N], each file's position in the split's canonical order.
    source, split: as given to `open_split`.
  """

  root: str
  files: tuple[str, ...]
  labels: np.ndarray
  class_names: tuple[str, ...]
  index: np.ndarray
  source: str = ""
  split: str = ""

  def __getitem__(self, i: int) -> tuple[str, int, int, int]:
    """(path, label, index, position i)."""
    return (os.path.join(self.root, self.files[i]), int(self.labels[i]), int(self.index[i]), int(i))


class Encoded(NamedTuple):
  """An image's encoded bytes and a name for messages: item 0 of a `TfdsSplit` item, where a
  `FileSplit` item has the file's path."""

  name: str
  data: bytes


@dataclasses.dataclass(frozen=True, eq=False)
class TfdsSplit(_LazySplit):
  """A split of a prepared tensorflow-datasets dataset, opened lazily (`open_split('tfds:NAME')`).

  Records are put in the order of a directory tree of the same images (`jaxattr.folders`: by
  class, then file name, as torchvision's ImageFolder), which needs each record's `file_name` and
  `label` once (`open_split` reads them, without decoding an image). A grain random-access source
  like `FileSplit`: item i is (`Encoded` bytes read when indexed, label, index, position).
  Picklable: the tfds data source is reopened in each process.

  Attributes:
    name, data_dir: the tfds dataset and its data directory (None: tfds' default).
    tfds_split: the tfds split read ('validation' for ImageNet's test split).
    records: int64 [N], the record of each item.
    files: each item's `file_name`.
    labels, class_names, index, source, split: as `FileSplit`.
  """

  name: str
  data_dir: str | None
  tfds_split: str
  records: np.ndarray
  files: tuple[str, ...]
  labels: np.ndarray
  class_names: tuple[str, ...]
  index: np.ndarray
  source: str = ""
  split: str = ""

  def __getitem__(self, i: int) -> tuple[Encoded, int, int, int]:
    """(`Encoded` image bytes, label, index, position i)."""
    record = _tfds_source(self.name, self.data_dir, self.tfds_split)[int(self.records[i])]
    where = f"{self.source}:{self.tfds_split}:{self.files[i]}"
    return (Encoded(where, bytes(record["image"])), int(self.labels[i]), int(self.index[i]), int(i))

  def subset(self, positions: np.ndarray) -> "TfdsSplit":
    """The items at `positions` (positions in this split, not `index` values)."""
    positions = np.asarray(positions, np.int64)
    return dataclasses.replace(super().subset(positions), records=self.records[positions])


# What `open_split` returns: a lazily opened split of either kind of source.
Split = FileSplit | TfdsSplit


@functools.lru_cache(maxsize=8)
def _tfds_source(name: str, data_dir: str | None, tfds_split: str) -> Any:
  # The data source of a prepared tfds split, images left encoded (one per process).
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  builder = data_lib.prepared_tfds_builder(name, data_dir)
  try:
    return builder.as_data_source(tfds_split, decoders={"image": tfds.decode.SkipDecoding()})
  except Exception as e:  # tfds raises several types for a format without random access
    raise DataError(
        f"tfds:{name}: split {tfds_split!r} cannot be read record by record ({e}); streaming "
        "needs the array_record format: prepare it with `tfds build "
        f"{name} --file_format=array_record`") from e


class Thumbnails:
  """`FileSplit.images`: image i as uint8 [THUMBNAIL, THUMBNAIL, 3] (shorter side resized, centre
  cropped), read when indexed."""

  def __init__(self, split: Split):
    self.split = split

  def __len__(self) -> int:
    return len(self.split)

  def __getitem__(self, i: int) -> np.ndarray:
    return ResizeCrop(THUMBNAIL, THUMBNAIL)(self.split[int(i)])["image"]


# The side of the images that grids and the report show of a streamed split.
THUMBNAIL = 96


def splits(config_data: Any) -> tuple[Any, Any]:
  """(train, test) of a config's `data` section: `open_split`'s when `data.stream`, else the
  in-memory `jaxattr.data.load_splits`."""
  if not config_data.get("stream", False):
    return data_lib.load_splits(config_data)
  options = {k: v for k, v in dict(config_data.options).items() if v is not None}
  return (open_split(config_data.source, "train", **options),
          open_split(config_data.source, "test", **options))


def open_split(source: str, split: str, *, limit_per_class: int | None = None,
               val_labels: str | None = None, data_dir: str | None = None, **ignored: Any) -> Split:
  """Lists one split of a `folder:DIR` or `tfds:NAME` source without decoding any image.

  Args:
    source: 'folder:DIR' with DIR a directory (archives are read whole by `jaxattr.data.load`), or
      'tfds:NAME', a prepared tfds dataset in the array_record format (`TfdsSplit`).
    split: 'train' or 'test' (ImageNet's val/, or tfds' 'validation', is the test split).
    limit_per_class: keep the first n files of each class (`index` still counts all).
    val_labels: a flat validation folder's label file (`jaxattr.folders`).
    data_dir: tfds' data directory (None: its default).
    **ignored: other `config.data.options` (size, workers: the transform and loader set those).

  Raises:
    DataError: a source that cannot be streamed, a bad option, or the layout's problems.
  """
  del ignored
  if split not in folders.SPLITS:
    raise DataError(f"unknown split {split!r} for {source!r}; expected one of {folders.SPLITS}")
  kind, path = data_lib.parse_source(source)
  given = {"limit_per_class": limit_per_class}
  given.update({
      k: v for k, v in (("val_labels", val_labels), ("data_dir", data_dir)) if v is not None
  })
  if kind == "tfds":
    data_lib.check_options("tfds", given)
    return _open_tfds(source, path, split, data_dir, limit_per_class)
  if kind != "folder" or not os.path.isdir(path):
    raise DataError(f"data source {source!r} cannot be streamed: streaming reads a 'folder:DIR' "
                    "directory tree or a prepared 'tfds:NAME' (extract an archive first; digits, "
                    "npz and CIFAR-sized sources load in memory: set data.stream=False)")
  data_lib.check_options("folder", given)
  entries = folders.scan_directory(path)

  def read(name: str) -> bytes:
    with open(os.path.join(path, name), "rb") as f:
      return f.read()

  files, labels, class_names = folders.layout(entries, split, path, read, val_labels)
  positions = np.arange(len(files))
  if limit_per_class is not None:
    positions = data_lib._first_per_class(labels, int(limit_per_class))  # pylint: disable=protected-access
  return FileSplit(root=path, files=tuple(files[i] for i in positions), labels=labels[positions],
                   class_names=tuple(class_names), index=positions.astype(np.int64), source=source,
                   split=split)


def _open_tfds(source: str, name: str, split: str, data_dir: str | None,
               limit_per_class: int | None) -> TfdsSplit:
  """`open_split` of 'tfds:NAME': reads every record's file_name and label once (images left
  encoded; for ImageNet's train split a pass over its ~140 GB, logged with its progress)."""
  builder = data_lib.prepared_tfds_builder(name, data_dir)
  available = sorted(builder.info.splits)
  tfds_split = split
  if split == "test":
    tfds_split = next((s for s in ("validation", "test") if s in available), "test")
  if tfds_split not in available:
    raise DataError(f"tfds dataset {name!r} has no split {tfds_split!r} for the {split} split "
                    f"(splits: {available})")
  features = builder.info.features
  missing = [k for k in ("image", "label", "file_name") if k not in features]
  if missing:
    raise DataError(f"tfds dataset {name!r} has no {missing} feature(s) (features: "
                    f"{sorted(features)}); streaming orders records by file name, as "
                    "imagenet2012 holds them; load it in memory instead (data.stream=False)")
  ds = _tfds_source(name, data_dir, tfds_split)
  n = len(ds)
  if not n:
    raise DataError(f"tfds dataset {name!r}: split {tfds_split!r} has no examples")
  names, labels = [], np.empty((n,), np.int64)
  meter = utils.Throughput(f"listing tfds:{name}:{tfds_split}", n, "records")
  for i in range(n):
    record = ds[i]
    raw = record["file_name"]
    names.append(raw.decode() if isinstance(raw, (bytes, np.bytes_)) else str(raw))
    labels[i] = int(record["label"])
    meter.update(1, force=i + 1 == n)
  class_names = tuple(features["label"].names)
  if labels.min() < 0 or labels.max() >= len(class_names):
    raise DataError(f"tfds dataset {name!r}: split {tfds_split!r} has labels outside "
                    f"[0, {len(class_names)}) (e.g. {int(labels.min())}); an unlabelled split "
                    "cannot be a test split")
  # A tree's order (`folders.layout`): by class, then file name.
  records = np.asarray(sorted(range(n), key=lambda i: (labels[i], names[i].rsplit("/", 1)[-1])),
                       np.int64)
  positions = np.arange(n)
  if limit_per_class is not None:
    positions = data_lib._first_per_class(labels[records].astype(np.int32), int(limit_per_class))  # pylint: disable=protected-access
  records = records[positions]
  return TfdsSplit(name=name, data_dir=data_dir, tfds_split=tfds_split, records=records,
                   files=tuple(names[i] for i in records), labels=labels[records].astype(
                       np.int32), class_names=class_names, index=positions.astype(np.int64),
                   source=source, split=split)


def decode_rgb(data: bytes, where: str, draft_side: int | None = None) -> Any:
  """A PIL RGB image of encoded bytes (JPEG, PNG, ... by content, whatever the suffix; grayscale
  and CMYK converted). draft_side: let a JPEG decode at 1/2, 1/4 or 1/8 scale, as long as its
  shorter side stays >= draft_side (libjpeg scales in the DCT domain: a fraction of the work)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  try:
    im = Image.open(io.BytesIO(data))
    if draft_side is not None and im.format == "JPEG":
      im.draft("RGB", resized_shape(*im.size, draft_side))
    return im.convert("RGB")
  except Exception as e:  # Pillow raises several types
    raise DataError(f"unreadable image {where}: {e}") from e


def resized_shape(width: int, height: int, side: int) -> tuple[int, int]:
  """(w, h) with the shorter side `side`, the longer scaled and truncated (torchvision Resize)."""
  if width <= height:
    return side, int(side * height / width)
  return int(side * width / height), side


@dataclasses.dataclass(frozen=True)
class ResizeCrop:
  """Reads, decodes and shapes one item of a `Split`: torchvision's Resize(resize) then
  CenterCrop(crop) (PIL bilinear, antialiased when shrinking), uint8 RGB [crop, crop, 3].

  Attributes:
    resize: the shorter side after resizing (ImageNet evaluation: 256).
    crop: the centre crop's side (224); <= resize.
    draft: decode JPEGs at a reduced scale first (`decode_rgb`), for small sides (the resident
      copy): the result differs from a full decode by a few grey levels (see `prepare`).
    skip_unreadable: an unreadable file gives a zero image and ok=False instead of raising.
    switch: how the caller turns skip_unreadable on, named in the error (a config flag in the
      stages).
  """

  resize: int
  crop: int
  draft: bool = False
  skip_unreadable: bool = False
  switch: str = "skip_unreadable=True"

  def __post_init__(self):
    if not 1 <= self.crop <= self.resize:
      raise DataError(f"ResizeCrop: need 1 <= crop <= resize, got crop {self.crop} and resize "
                      f"{self.resize}")

  def __call__(self, item: tuple[str, int, int, int]) -> dict[str, np.ndarray]:

    path, label, index, position = item
    try:
      if isinstance(path, Encoded):
        path, encoded = path.name, path.data
      else:
        with open(path, "rb") as f:
          encoded = f.read()
      image = self.shape(decode_rgb(encoded, path, self.resize if self.draft else None))
      ok = True
    except (DataError, OSError) as e:
      if not self.skip_unreadable:
        what = str(e) if isinstance(e, DataError) else f"unreadable image {path}: {e}"
        raise DataError(f"{what}; replace or remove the file, or pass {self.switch} to store "
                        "such images as zeros (ok=False, counted in the summary) and go on") from e
      image, ok = np.zeros((self.crop, self.crop, 3), np.uint8), False
    return {
        "image": image,
        "label": np.int32(label),
        "index": np.int64(index),
        "position": np.int64(position),
        "ok": np.bool_(ok)
    }

  def shape(self, image: Any) -> np.ndarray:
    """Resize + centre crop of a PIL RGB image."""
    from PIL import Image  # pylint: disable=g-import-not-at-top

    w, h = resized_shape(*image.size, self.resize)
    if (w, h) != image.size:
      image = image.resize((w, h), Image.BILINEAR)
    top, left = int(round((h - self.crop) / 2.0)), int(round((w - self.crop) / 2.0))
    return np.asarray(image.crop((left, top, left + self.crop, top + self.crop)), np.uint8)


def batches(split: Split, transform: Any, batch_size: int, *, start: int = 0,
            stop: int | None = None, workers: int = 0, threads: int = 4,
            prefetch: int = 2) -> Iterator[dict[str, np.ndarray]]:
  """Batches of `transform(split[i])` for i in [start, stop), through grain.

  With worker processes the batches of different workers interleave: every item carries its
  `position`, by which consumers place it (`ordered`).

  Args:
    split: the split (or any random-access source).
    transform: a picklable callable (`ResizeCrop`).
    batch_size: items per batch (the last one may be smaller).
    start, stop: the range of positions.
    workers: 0 = decode in this process with `threads` threads; n >= 1 = n spawned processes
      (grain's mp_prefetch), each holding at most `prefetch` batches.
    threads: decode threads per process.
    prefetch: images in flight per thread pool, in batches (bounded host memory).

  Yields:
    {'image': uint8 [B, H, W, 3], 'label': int32 [B], 'index': int64 [B], 'position': int64
    [B], 'ok': bool [B]}.
  """
  import grain  # pylint: disable=g-import-not-at-top

  stop = len(split) if stop is None else stop
  # Threads decode single images (prefetch * batch_size of them in flight), then the images are
  # batched; worker processes each run this on their share.
  it = grain.MapDataset.source(split)[start:stop].map(transform).to_iter_dataset(
      grain.ReadOptions(num_threads=max(1, threads),
                        prefetch_buffer_size=max(1, prefetch) * batch_size)).batch(batch_size)
  if workers > 0:
    it = it.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=max(1, prefetch)))
  yield from it


def ordered(batches: Any, start: int, stop: int,
            batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """`batches` of rows [start, stop) re-cut in position order (workers interleave theirs), at
  most `batch_size` rows each.

  Raises:
    RuntimeError: a position missing or repeated (a loader bug, never bad data).
  """
  pending: dict[int, dict[str, np.ndarray]] = {}
  expected = start
  for b in batches:
    for row in range(len(b["position"])):
      pending[int(b["position"][row])] = {k: v[row] for k, v in b.items()}
    run = []
    while expected in pending:
      run.append(pending.pop(expected))
      expected += 1
    for i in range(0, len(run), batch_size):
      part = run[i:i + batch_size]
      yield {k: np.stack([r[k] for r in part]) for k in part[0]}
  if expected != stop or pending:
    raise RuntimeError(f"stream: rows {expected}..{stop} of [{start}, {stop}) never arrived "
                       f"({len(pending)} out of range)")


def read_range(split: Split, transform: Any, batch_size: int, start: int, stop: int, *,
               workers: int = 0, threads: int = 4) -> Iterator[dict[str, np.ndarray]]:
  """`batches` of rows [start, stop), `ordered` by position."""
  return ordered(
      batches(split, transform, batch_size, start=start, stop=stop, workers=workers,
              threads=threads), start, stop, batch_size)


def shard_chunks(num_rows: int, chunk_rows: int, process_index: int = 0,
                 process_count: int = 1) -> list[tuple[int, int, int]]:
  """[(chunk id, start, stop)] of this process: chunks of `chunk_rows` rows, dealt round-robin
  over the processes, so that every row belongs to exactly one chunk of one process."""
  out = []
  for j, s in enumerate(range(0, num_rows, chunk_rows)):
    if j % process_count == process_index:
      out.append((j, s, min(s + chunk_rows, num_rows)))
  return out

"""Streamed image splits: opened lazily, decoded by parallel workers, never whole in memory.

`open_split(source, split)` lists a directory tree's split (`jaxattr.folders`: ImageNet's layouts
included) as a `FileSplit`: file names, labels and indices, no pixels (ImageNet's 1.28M training
images are ~140 GB of JPEGs). `batches` reads a range of it through grain: a random-access source,
a picklable decode transform (`ResizeCrop`), batching, and either threads in this process or
`workers` spawned processes with bounded prefetch; `shard_chunks` spreads fixed chunks of rows
over processes. In-memory sources (digits, CIFAR) keep `jaxattr.data.load`.

grain's multi-process prefetch reads absl flags: parse them before the first `batches` call with
workers > 0 (the launchers do; elsewhere `absl.flags.FLAGS(sys.argv[:1])`).
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Any, Iterator

import numpy as np

from jaxattr import data as data_lib, folders
from jaxattr.folders import DataError


@dataclasses.dataclass(frozen=True, eq=False)
class FileSplit:
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

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, i: int) -> tuple[str, int, int, int]:
    """(path, label, index, position i)."""
    return (os.path.join(self.root, self.files[i]), int(self.labels[i]), int(self.index[i]), int(i))

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def images(self) -> "Thumbnails":
    """The images, decoded one at a time when indexed (grids and reports show a few)."""
    return Thumbnails(self)

  def subset(self, positions: np.ndarray) -> "FileSplit":
    """The files at `positions` (positions in this split, not `index` values)."""
    positions = np.asarray(positions, np.int64)
    return dataclasses.replace(self, files=tuple(self.files[i] for i in positions),
                               labels=self.labels[positions], index=self.index[positions])


class Thumbnails:
  """`FileSplit.images`: image i as uint8 [THUMBNAIL, THUMBNAIL, 3] (shorter side resized, centre
  cropped), read when indexed."""

  def __init__(self, split: FileSplit):
    self.split = split

  def __len__(self) -> int:
    return len(self.split)

  def __getitem__(self, i: int) -> np.ndarray:
    return ResizeCrop(THUMBNAIL, THUMBNAIL)(self.split[int(i)])["image"]


# The side of the images that grids and the report show of a streamed split.
THUMBNAIL = 96


def splits(config_data: Any) -> tuple[Any, Any]:
  """(train, test) of a config's `data` section: `FileSplit`s when `data.stream`, else the
  in-memory `jaxattr.data.load_splits`."""
  if not config_data.get("stream", False):
    return data_lib.load_splits(config_data)
  options = {k: v for k, v in dict(config_data.options).items() if v is not None}
  return (open_split(config_data.source, "train", **options),
          open_split(config_data.source, "test", **options))


def open_split(source: str, split: str, *, limit_per_class: int | None = None,
               val_labels: str | None = None, **ignored: Any) -> FileSplit:
  """Lists one split of a `folder:DIR` source without reading any image.

  Args:
    source: 'folder:DIR' with DIR a directory (archives are read whole by `jaxattr.data.load`).
    split: 'train' or 'test' (ImageNet's val/ is the test split).
    limit_per_class: keep the first n files of each class (`index` still counts all).
    val_labels: a flat validation folder's label file (`jaxattr.folders`).
    **ignored: other `config.data.options` (size, workers: the transform and loader set those).

  Raises:
    DataError: a source that is not a folder directory, a bad option, or the layout's problems.
  """
  del ignored
  if split not in folders.SPLITS:
    raise DataError(f"unknown split {split!r} for {source!r}; expected one of {folders.SPLITS}")
  kind, path = data_lib.parse_source(source)
  if kind != "folder" or not os.path.isdir(path):
    raise DataError(f"data source {source!r} cannot be streamed: streaming reads a 'folder:DIR' "
                    "directory tree (extract an archive first; digits, npz and CIFAR-sized "
                    "sources load in memory: set data.stream=False)")
  data_lib.check_options("folder", {"limit_per_class": limit_per_class, "val_labels": val_labels})
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
  """Reads, decodes and shapes one item of a `FileSplit`: torchvision's Resize(resize) then
  CenterCrop(crop) (PIL bilinear, antialiased when shrinking), uint8 RGB [crop, crop, 3].

  Attributes:
    resize: the shorter side after resizing (ImageNet evaluation: 256).
    crop: the centre crop's side (224); <= resize.
    draft: decode JPEGs at a reduced scale first (`decode_rgb`), for small sides (the resident
      copy): the result differs from a full decode by a few grey levels (see `prepare`).
    skip_unreadable: an unreadable file gives a zero image and ok=False instead of raising.
  """

  resize: int
  crop: int
  draft: bool = False
  skip_unreadable: bool = False

  def __post_init__(self):
    if not 1 <= self.crop <= self.resize:
      raise DataError(f"ResizeCrop: need 1 <= crop <= resize, got crop {self.crop} and resize "
                      f"{self.resize}")

  def __call__(self, item: tuple[str, int, int, int]) -> dict[str, np.ndarray]:

    path, label, index, position = item
    try:
      with open(path, "rb") as f:
        image = self.shape(decode_rgb(f.read(), path, self.resize if self.draft else None))
      ok = True
    except (DataError, OSError) as e:
      if not self.skip_unreadable:
        if isinstance(e, DataError):
          raise
        raise DataError(f"unreadable image {path}: {e}") from e
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


def batches(split: FileSplit, transform: Any, batch_size: int, *, start: int = 0,
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


def read_range(split: FileSplit, transform: Any, batch_size: int, start: int, stop: int, *,
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

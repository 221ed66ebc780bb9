"""Folder trees of images: their layout (which file is which class) without reading a pixel.

`layout(entries, split, where, read)` turns the entries of a directory or archive into the
split's files, labels and class names. It understands:

* class folders: ``<split>/<class>/<image>`` for ``train`` and ``test``; ImageNet's ``val``
  folder is the test split when there is no ``test`` folder;
* ImageNet's flat validation folder: ``val/ILSVRC2012_val_*.JPEG`` directly in the split folder,
  labelled by ``LOC_val_solution.csv`` (``ImageId,PredictionString``, the wnid first) or by the
  devkit's ``ILSVRC2012_validation_ground_truth.txt`` (one ILSVRC2012_ID per image, in file-name
  order) mapped to wnids through the devkit's ``meta.mat`` (``synsets``: ``ILSVRC2012_ID``,
  ``WNID``). The label files are looked for in the tree's root (or the folder above its splits)
  and in ``ILSVRC2012_devkit_t12/data/`` below it, or given by the ``val_labels`` option.

Classes are the sorted class folders of the train split (ImageNet: sorted wnids), so both splits
share label ids; within a split, images are ordered by class, then file name, as torchvision's
ImageFolder orders them (the flat validation folder too, as if it were sorted into class folders).
Every problem raises `DataError` naming the file or folder.
"""

from __future__ import annotations

import csv
import io
import os
from typing import Callable, Sequence

import numpy as np

SPLITS = ("train", "test")
# Folder names each split may have, in order of preference.
SPLIT_FOLDERS = {"train": ("train",), "test": ("test", "val")}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")

LOC_CSV = "LOC_val_solution.csv"
DEVKIT_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
DEVKIT_META = "meta.mat"
DEVKIT_DIR = "ILSVRC2012_devkit_t12/data"


class DataError(ValueError):
  """Bad or missing input data; the message names the file, key or split."""


def scan_directory(root: str) -> list[str]:
  """Every file below `root` as a '/'-separated relative path; empty folders end with '/'."""
  out = []
  for dirpath, _, filenames in os.walk(root):
    rel = os.path.relpath(dirpath, root)
    for name in filenames:
      out.append(os.path.normpath(os.path.join(rel, name)).replace(os.sep, "/"))
    if rel != "." and not filenames:
      out.append(rel.replace(os.sep, "/") + "/")  # keeps empty folders visible
  return out


def find_prefix(entries: Sequence[str], where: str) -> str:
  """'' when the split folders are at the top of `entries`, 'top/' when below one top folder."""
  names = {f for folders in SPLIT_FOLDERS.values() for f in folders}
  tops = {e.split("/")[0] for e in entries}
  if tops & names:
    return ""
  if len(tops) == 1:
    top = tops.pop()
    if {e.split("/")[1] for e in entries if e.count("/") >= 1} & names:
      return top + "/"
  raise DataError(f"folder source {where}: expected train/ and test/ (or val/) folders at the top "
                  f"(or below one top folder), found {sorted(tops)[:5]}")


def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_SUFFIXES)


def layout(entries: Sequence[str], split: str, where: str, read: Callable[[str], bytes] |
           None = None, val_labels: str | None = None) -> tuple[list[str], np.ndarray, list[str]]:
  """Splits a tree's entries into (files of `split`, int32 labels, class names).

  Args:
    entries: '/'-separated paths relative to the tree's root (`scan_directory`, archive names).
    split: 'train' or 'test'.
    where: the tree, for messages.
    read: reads an entry's bytes (needed for a flat validation folder's label files).
    val_labels: an explicit label file for a flat validation folder (a path on disk).

  Raises:
    DataError: no such split, an empty class folder, a class absent from train, an image in
      the wrong place, a flat folder without (or with mismatched) labels.
  """
  prefix = find_prefix(entries, where)
  present = {e[len(prefix):].split("/")[0] for e in entries if e.startswith(prefix)}
  folders = {s: next((f for f in SPLIT_FOLDERS[s] if f in present), None) for s in SPLITS}
  if folders[split] is None:
    found = [f for fs in SPLIT_FOLDERS.values() for f in fs if f in present]
    also = "".join(f" (nor '{prefix}{f}/')" for f in SPLIT_FOLDERS[split][1:])
    raise DataError(f"folder source {where}: no '{prefix}{split}/<class>/' folders found{also} "
                    f"for the {split} split (split folders present: {found or 'none'})")
  per_split: dict[str, dict[str, list[str]]] = {s: {} for s in SPLITS}
  flat: dict[str, list[str]] = {s: [] for s in SPLITS}
  for e in entries:
    if not e.startswith(prefix):
      continue
    parts = e[len(prefix):].split("/")
    s = next((s for s in SPLITS if folders[s] == parts[0]), None)
    if s is None or len(parts) < 2:
      continue
    if len(parts) == 2:  # directly in the split folder (folders end with '/')
      if _is_image(parts[1]):
        flat[s].append(e)
      continue
    cls = parts[1]
    bucket = per_split[s].setdefault(cls, [])
    if len(parts) > 3 and _is_image(parts[-1]):
      raise DataError(f"folder source {where}: image '{e}' lies in a subfolder of its class folder "
                      f"'{prefix}{parts[0]}/{cls}/'; images must lie directly in the class folder")
    if len(parts) == 3 and _is_image(parts[2]):
      bucket.append(e)
  for s in SPLITS:
    if flat[s] and (per_split[s] or s == "train"):
      raise DataError(
          f"folder source {where}: image '{flat[s][0]}' lies directly in "
          f"'{prefix}{folders[s]}/'" + (" beside class folders" if per_split[s] else "") +
          f"; move it into its class folder '{prefix}{folders[s]}/<class>/'" +
          ("" if s == "train" else " (a flat validation folder holds no class folders)"))
  class_names = sorted(per_split["train"] or per_split[split])
  if not class_names:
    raise DataError(f"folder source {where}: no '{prefix}train/<class>/' folders found (the "
                    "training split's class folders name the classes)")
  for s in SPLITS:
    for cls, files in per_split[s].items():
      if not files:
        raise DataError(f"folder source {where}: class folder '{prefix}{folders[s]}/{cls}/' has "
                        "no images")
      if cls not in class_names:
        raise DataError(f"folder source {where}: class '{cls}' of split '{folders[s]}' is not a "
                        f"class of the train split ({len(class_names)} classes, e.g. "
                        f"{class_names[:3]})")
  if flat[split]:
    wnids = _flat_labels(sorted(flat[split]), prefix, where, read, val_labels, entries)
    for f, w in zip(sorted(flat[split]), wnids):
      if w not in class_names:
        raise DataError(f"folder source {where}: '{f}' is labelled '{w}' by the validation labels, "
                        f"which is not a class folder of '{prefix}train/'")
      per_split[split].setdefault(w, []).append(f)
  files, labels = [], []
  for label, cls in enumerate(class_names):
    for f in sorted(per_split[split].get(cls, []), key=lambda e: e.rsplit("/", 1)[-1]):
      files.append(f)
      labels.append(label)
  return files, np.asarray(labels, np.int32), class_names


def _flat_labels(files: list[str], prefix: str, where: str, read: Callable[[str], bytes] | None,
                 val_labels: str | None, entries: Sequence[str]) -> list[str]:
  """The wnid of each file of a flat validation folder (`files` sorted by name)."""
  stems = [f.rsplit("/", 1)[-1].rsplit(".", 1)[0] for f in files]
  if val_labels is not None:
    if not os.path.isfile(val_labels):
      raise DataError(f"data.options.val_labels: no such file {val_labels}")
    with open(val_labels, "rb") as fh:
      data = fh.read()
    if os.path.basename(val_labels) == DEVKIT_TRUTH or val_labels.endswith(".txt"):
      meta = os.path.join(os.path.dirname(val_labels), DEVKIT_META)
      if not os.path.isfile(meta):
        raise DataError(
            f"data.options.val_labels={val_labels}: the devkit's {DEVKIT_META} must lie "
            f"beside it (its ILSVRC2012_IDs map to wnids), not found at {meta}")
      with open(meta, "rb") as fh:
        return _devkit_labels(data, fh.read(), stems, val_labels, meta)
    return _csv_labels(data, stems, val_labels)
  have = set(entries)
  bases = [prefix, ""] if prefix else [""]
  for base in bases:
    for d in ("", DEVKIT_DIR + "/"):
      truth, meta = base + d + DEVKIT_TRUTH, base + d + DEVKIT_META
      if truth in have and read is not None:
        if meta not in have:
          raise DataError(
              f"folder source {where}: found the devkit's {truth} but not {meta}, which "
              "maps its ILSVRC2012_IDs to wnids")
        return _devkit_labels(read(truth), read(meta), stems, f"{where}/{truth}", f"{where}/{meta}")
    if base + LOC_CSV in have and read is not None:
      return _csv_labels(read(base + LOC_CSV), stems, f"{where}/{base}{LOC_CSV}")
  raise DataError(
      f"folder source {where}: the validation images lie directly in the split folder (e.g. "
      f"'{files[0]}') and no labels for them were found: put {LOC_CSV} or the devkit's "
      f"{DEVKIT_DIR}/ ({DEVKIT_TRUTH} and {DEVKIT_META}) in the tree's root, pass "
      "data.options.val_labels=FILE, or sort the images into class folders")


def _csv_labels(data: bytes, stems: list[str], where: str) -> list[str]:
  try:
    rows = list(csv.reader(io.StringIO(data.decode("utf-8"))))
  except UnicodeDecodeError as e:
    raise DataError(f"{where}: not a UTF-8 CSV file: {e}") from e
  if not rows or [c.strip() for c in rows[0][:2]] != ["ImageId", "PredictionString"]:
    raise DataError(f"{where}: expected the header 'ImageId,PredictionString', got "
                    f"{rows[0] if rows else 'an empty file'}")
  table = {}
  for i, row in enumerate(rows[1:], start=2):
    if len(row) < 2 or not row[1].split():
      raise DataError(f"{where}: line {i} has no label: {row}")
    table[row[0].strip()] = row[1].split()[0]
  missing = [s for s in stems if s not in table]
  if missing:
    raise DataError(f"{where}: no label for {len(missing)} of the {len(stems)} validation images "
                    f"(e.g. {missing[:3]})")
  return [table[s] for s in stems]


def _devkit_labels(truth: bytes, meta: bytes, stems: list[str], truth_where: str,
                   meta_where: str) -> list[str]:
  try:
    ids = [int(line) for line in truth.decode("ascii").split()]
  except (UnicodeDecodeError, ValueError) as e:
    raise DataError(f"{truth_where}: expected one integer ILSVRC2012_ID per line: {e}") from e
  if len(ids) != len(stems):
    raise DataError(f"{truth_where}: {len(ids)} labels but the validation folder holds "
                    f"{len(stems)} images; the file labels the images in file-name order, so "
                    "their counts must match (a subset of the images needs LOC_val_solution.csv "
                    "or class folders)")
  id_to_wnid = read_meta(meta, meta_where)
  unknown = sorted({i for i in ids if i not in id_to_wnid})
  if unknown:
    raise DataError(f"{truth_where}: ILSVRC2012_IDs {unknown[:5]} are not in {meta_where}")
  return [id_to_wnid[i] for i in ids]


def read_meta(data: bytes, where: str) -> dict[int, str]:
  """{ILSVRC2012_ID: wnid} from the devkit's meta.mat (its `synsets` struct array)."""
  from scipy import io as sio  # pylint: disable=g-import-not-at-top

  try:
    mat = sio.loadmat(io.BytesIO(data), squeeze_me=True, struct_as_record=False)
  except Exception as e:  # scipy raises several types for non-.mat input
    raise DataError(f"{where}: not a readable .mat file: {e}") from e
  synsets = mat.get("synsets")
  if synsets is None:
    found = sorted(k for k in mat if not k.startswith("__"))
    raise DataError(f"{where}: no 'synsets' variable (found {found}); expected the ILSVRC2012 "
                    "devkit's meta.mat")
  out = {}
  for s in np.atleast_1d(synsets):
    try:
      out[int(s.ILSVRC2012_ID)] = str(s.WNID)
    except AttributeError as e:
      raise DataError(f"{where}: 'synsets' entries need the fields ILSVRC2012_ID and WNID: "
                      f"{e}") from e
  return out

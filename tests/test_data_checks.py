"""Bad input data: one clear `data.DataError` naming the file, key or option, before long work."""

import os
import re
import tarfile
import types

import numpy as np
import pytest
from PIL import Image

from jaxattr import data, fingerprint


def _cfg(source, **options):
  return types.SimpleNamespace(source=source, options=options)


def _npz(tmp_path, name="d.npz", **arrays):
  """An npz of `arrays` over valid defaults (2 uint8 4x4 RGB images per split, labels 0 and 1)."""
  base = {
      "x_train": np.zeros((2, 4, 4, 3), np.uint8),
      "y_train": np.array([0, 1]),
      "x_test": np.zeros((2, 4, 4, 3), np.uint8),
      "y_test": np.array([1, 0]),
  }
  base.update(arrays)
  path = tmp_path / name
  np.savez(path, **{k: v for k, v in base.items() if v is not None})
  return str(path)


def _raises(source, split, *patterns, **options):
  """Loads and checks that one DataError is raised whose message holds every pattern."""
  with pytest.raises(data.DataError) as e:
    data.load(source, split, **options)
  for p in patterns:
    assert re.search(p, str(e.value)), f"{p!r} not in {str(e.value)!r}"
  return str(e.value)


def _write_tree(root, classes=("cat", "dog"), per_class=2, size=4):
  rng = np.random.default_rng(0)
  for s in ("train", "test"):
    for c in classes:
      os.makedirs(os.path.join(root, s, c), exist_ok=True)
      for i in range(per_class):
        arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(arr).save(os.path.join(root, s, c, f"{i:04d}.png"))


# ----------------------------------------------------------------------------------------------
# 1. npz images


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_npz_non_finite_float_images_raise(tmp_path, bad):
  x = np.full((2, 4, 4, 3), 0.5, np.float32)
  x[0, 0, 0, 0] = x[1, 2, 2, 1] = x[1, 3, 3, 2] = bad
  path = _npz(tmp_path, x_test=x)
  _raises(f"npz:{path}", "test", re.escape(path), "x_test", "3 non-finite")
  data.load(f"npz:{path}", "train")  # the other split is fine
  gray = np.full((2, 4, 4), 0.5)
  gray[1, 1, 1] = bad
  path = _npz(tmp_path, "g.npz", x_train=gray)
  _raises(f"npz:{path}", "train", re.escape(path), "x_train", "1 non-finite")


@pytest.mark.parametrize("lo,hi", [(-0.5, 0.5), (-1.0, 200.0), (0.0, 256.0)])
def test_npz_float_images_outside_both_ranges_raise(tmp_path, lo, hi):
  x = np.full((2, 4, 4, 3), (lo + hi) / 2, np.float64)
  x[0, 0, 0, 0], x[1, 0, 0, 0] = lo, hi
  path = _npz(tmp_path, x_train=x)
  _raises(f"npz:{path}", "train", re.escape(path), "x_train", r"\[0, 1\]", r"\[0, 255\]")


@pytest.mark.parametrize("lo,hi", [(-1, 10), (0, 256)])
def test_npz_integer_images_outside_0_255_raise(tmp_path, lo, hi):
  x = np.zeros((2, 4, 4, 3), np.int16)
  x[0, 0, 0, 0], x[1, 0, 0, 0] = lo, hi
  path = _npz(tmp_path, x_train=x)
  _raises(f"npz:{path}", "train", re.escape(path), "x_train", rf"\[{lo}, {hi}\]", r"\[0, 255\]")


def test_npz_accepted_image_values(tmp_path):
  unit = np.linspace(0, 1, 2 * 4 * 4 * 3).reshape(2, 4, 4, 3)
  path = _npz(tmp_path, x_train=unit, x_test=(unit * 255).astype(np.int64))
  tr, te = data.load(f"npz:{path}", "train"), data.load(f"npz:{path}", "test")
  np.testing.assert_array_equal(tr.images, np.round(unit * 255).astype(np.uint8))
  np.testing.assert_array_equal(te.images, (unit * 255).astype(np.uint8))
  wide = _npz(tmp_path, "w.npz", x_train=unit * 200.0, x_test=np.zeros((2, 4, 4), np.float32))
  np.testing.assert_array_equal(
      data.load(f"npz:{wide}", "train").images,
      np.round(unit * 200).astype(np.uint8))
  assert data.load(f"npz:{wide}", "test").images.shape == (2, 4, 4, 3)


@pytest.mark.parametrize("x", [np.full((2, 4, 4, 3), "a"), np.ones((2, 4, 4, 3), bool)])
def test_npz_non_numeric_images_raise(tmp_path, x):
  path = _npz(tmp_path, x_train=x)
  _raises(f"npz:{path}", "train", re.escape(path), "x_train", "dtype")


@pytest.mark.parametrize("x", [np.zeros((0, 4, 4, 3), np.uint8), np.zeros((2, 0, 4, 3), np.uint8)])
def test_npz_split_without_pixels_raises(tmp_path, x):
  path = _npz(tmp_path, x_train=x, y_train=np.zeros(len(x), np.int64))
  _raises(f"npz:{path}", "train", re.escape(path), "x_train", "no pixels")


def test_npz_scalar_arrays_and_npy_files_raise(tmp_path):
  path = _npz(tmp_path, x_train=np.array(3.0))
  _raises(f"npz:{path}", "train", re.escape(path), "x_train", "got ()")
  path = _npz(tmp_path, "y.npz", y_train=np.array(1))
  _raises(f"npz:{path}", "train", re.escape(path), "y_train", r"shape \(\)")
  npy = tmp_path / "x.npy"
  np.save(npy, np.zeros((2, 4, 4, 3), np.uint8))
  _raises(f"npz:{npy}", "train", re.escape(str(npy)), "single array", "np.savez")


# ----------------------------------------------------------------------------------------------
# 2. npz labels and class names


def test_npz_fractional_labels_raise_and_whole_floats_load(tmp_path):
  path = _npz(tmp_path, y_train=np.array([0.0, 1.5]))
  _raises(f"npz:{path}", "train", re.escape(path), "y_train", "1 fractional", "1.5")
  path = _npz(tmp_path, "nan.npz", y_train=np.array([0.0, np.nan]))
  _raises(f"npz:{path}", "train", re.escape(path), "y_train", "non-finite")
  path = _npz(tmp_path, "ok.npz", y_train=np.array([[1.0], [0.0]]))
  ds = data.load(f"npz:{path}", "train")
  np.testing.assert_array_equal(ds.labels, [1, 0])
  assert ds.labels.dtype == np.int32


@pytest.mark.parametrize("y,what", [(np.array([True, False]), "dtype bool"),
                                    (np.array(["0", "1"]), "dtype <U1"),
                                    (np.array([0 + 0j, 1 + 0j]), "dtype complex"),
                                    (np.zeros((2, 2), np.int64), r"shape \(2, 2\)"),
                                    (np.zeros((2, 1, 1), np.int64), r"shape \(2, 1, 1\)")])
def test_npz_bad_label_types_and_shapes_raise(tmp_path, y, what):
  path = _npz(tmp_path, y_train=y)
  _raises(f"npz:{path}", "train", re.escape(path), "y_train", what)


def test_npz_label_range_errors_name_the_file_and_key(tmp_path):
  path = _npz(tmp_path, y_test=np.array([0, -1]))
  _raises(f"npz:{path}", "test", re.escape(path), "y_test", "negative")
  path = _npz(tmp_path, "n.npz", y_train=np.array([0, 3]), class_names=np.array(["a", "b", "c"]))
  _raises(f"npz:{path}", "train", re.escape(path), "y_train", "label 3", "3 names", r"\[0, 3\)")


def test_npz_class_names_checks(tmp_path):
  path = _npz(tmp_path, class_names=np.array("abc"))
  _raises(f"npz:{path}", "train", re.escape(path), "class_names", "1-D")
  obj = tmp_path / "obj.npz"
  np.savez(obj, x_train=np.zeros((2, 4, 4, 3), np.uint8), y_train=np.array([0, 1]),
           class_names=np.array(["a", None], dtype=object))
  _raises(f"npz:{obj}", "train", re.escape(str(obj)), "'class_names'", "no Python objects")
  path = _npz(tmp_path, "b.npz", class_names=np.array([b"cat", b"dog"]))
  assert data.load(f"npz:{path}", "train").class_names == ["cat", "dog"]


def test_npz_splits_share_classes_without_class_names(tmp_path):
  path = _npz(tmp_path, y_train=np.array([0, 1]), y_test=np.array([2, 0]))
  assert data.load(f"npz:{path}", "train").class_names == ["0", "1", "2"]
  assert data.load(f"npz:{path}", "test").class_names == ["0", "1", "2"]


def test_npz_one_class_is_not_rejected_here(tmp_path):
  path = _npz(tmp_path, y_train=np.array([0, 0]), y_test=np.array([0, 0]))
  assert data.load(f"npz:{path}", "train").class_names == ["0"]


# ----------------------------------------------------------------------------------------------
# 3. options


@pytest.mark.parametrize("name,value", [("limit_per_class", -1), ("limit_per_class", 0),
                                        ("limit_per_class", True), ("limit_per_class", 1.5),
                                        ("limit_per_class", "2"), ("size", 0), ("size", -3),
                                        ("size", True), ("size", 8.0)])
def test_bad_option_values_raise_before_any_decode(tmp_path, name, value):
  _write_tree(tmp_path / "t")
  (tmp_path / "t" / "train" / "cat" / "0000.png").write_bytes(b"not an image")
  src = f"folder:{tmp_path}/t"
  msg = _raises(src, "train", rf"data\.options\.{name}\b", re.escape(repr(value)), "int >= 1",
                **{name: value})
  with pytest.raises(data.DataError) as e:
    fingerprint.data_fingerprint(_cfg(src, **{name: value}))
  assert str(e.value) == msg
  _raises("digits", "train", rf"data\.options\.{name}\b", **{name: value})


def test_good_option_values_still_load(tmp_path):
  _write_tree(tmp_path / "t", per_class=3)
  ds = data.load(f"folder:{tmp_path}/t", "train", size=np.int64(2), limit_per_class=np.int32(1),
                 workers=1)
  assert ds.images.shape == (2, 2, 2, 3)
  np.testing.assert_array_equal(ds.index, [0, 3])
  path = _npz(tmp_path)
  assert len(data.load(f"npz:{path}", "train", size=None, limit_per_class=None)) == 2


@pytest.mark.parametrize("source,name,accepted", [("digits", "data_dir", "size, limit_per_class$"),
                                                  ("npz", "workers", "size, limit_per_class$"),
                                                  ("tfds", "workers", "limit_per_class, data_dir"),
                                                  ("folder", "seed", "limit_per_class, workers")])
def test_unknown_options_name_the_option_and_the_accepted_ones(tmp_path, source, name, accepted):
  if source == "npz":
    source = f"npz:{_npz(tmp_path)}"
  elif source == "folder":
    _write_tree(tmp_path / "t")
    source = f"folder:{tmp_path}/t"
  elif source == "tfds":
    source = "tfds:fake"  # rejected before tfds is asked
  msg = _raises(source, "train", rf"data\.options\.{name} is not an option", accepted, **{name: 1})
  with pytest.raises(data.DataError) as e:
    fingerprint.data_fingerprint(_cfg(source, **{name: 1}))
  assert str(e.value) == msg


def test_data_dir_must_be_a_path():
  _raises("tfds:fake", "train", r"data\.options\.data_dir", "3", data_dir=3)


# ----------------------------------------------------------------------------------------------
# 4. archives


def _archive(tmp_path, suffix, mode):
  root = tmp_path / "tree"
  _write_tree(root, per_class=3, size=16)
  arc = tmp_path / f"set{suffix}"
  with tarfile.open(arc, mode) as t:
    for s in ("train", "test"):
      t.add(root / s, arcname=s)
  return arc


def test_truncated_tar_gz_raises(tmp_path):
  arc = _archive(tmp_path, ".tar.gz", "w:gz")
  cut = tmp_path / "cut.tar.gz"
  cut.write_bytes(arc.read_bytes()[:arc.stat().st_size // 2])
  for split in ("train", "test"):
    _raises(f"folder:{cut}", split, re.escape(str(cut)), "truncated or corrupt")
  tiny = tmp_path / "tiny.tgz"
  tiny.write_bytes(arc.read_bytes()[:20])
  _raises(f"folder:{tiny}", "train", re.escape(str(tiny)), "truncated or corrupt")


def test_tar_cut_at_a_member_boundary_or_corrupted_raises(tmp_path):
  arc = _archive(tmp_path, ".tar", "w")
  with tarfile.open(arc) as t:
    last = t.getmembers()[-1]
  raw = arc.read_bytes()
  cut = tmp_path / "cut.tar"
  cut.write_bytes(raw[:last.offset])  # tarfile alone would silently drop the last image
  _raises(f"folder:{cut}", "test", re.escape(str(cut)), "truncated or corrupt")
  bad = tmp_path / "bad.tar"
  bad.write_bytes(raw[:last.offset] + b"\x01" * 512 + raw[last.offset + 512:])
  _raises(f"folder:{bad}", "test", re.escape(str(bad)), "truncated or corrupt")
  short = tmp_path / "short.tar"
  short.write_bytes(raw[:last.offset_data + 100])  # inside the last image's bytes
  _raises(f"folder:{short}", "test", re.escape(str(short)), "truncated or corrupt")
  assert len(data.load(f"folder:{arc}", "test")) == 6


# ----------------------------------------------------------------------------------------------
# 5. one source parser for load and fingerprint


def test_parse_source(tmp_path):
  _write_tree(tmp_path / "t")
  path = _npz(tmp_path)
  assert data.parse_source("digits") == ("digits", "")
  assert data.parse_source(f"folder:{tmp_path}/t") == ("folder", f"{tmp_path}/t")
  assert data.parse_source(f"npz:{path}") == ("npz", path)
  assert data.parse_source("tfds:cifar10") == ("tfds", "cifar10")
  for source, pattern in [("imagenet", "unknown data source 'imagenet'; expected 'digits', "),
                          ("tfds:", "needs an argument after the colon"),
                          ("folder", "needs an argument after the colon"),
                          (f"npz:{tmp_path}/no.npz", "file does not exist"),
                          (f"folder:{path}", "neither a directory nor"),
                          ("digits:x", "takes no argument"), (None, "must be a string")]:
    with pytest.raises(data.DataError, match=pattern):
      data.parse_source(source)
    with pytest.raises(data.DataError) as loading:
      data.load(source, "train")
    with pytest.raises(data.DataError) as fingerprinting:
      fingerprint.data_fingerprint(_cfg(source))
    assert str(loading.value) == str(fingerprinting.value)
  assert not hasattr(data, "_require_arg")


def test_prepared_tfds_builder(monkeypatch):
  import tensorflow_datasets as tfds

  builder = types.SimpleNamespace(is_prepared=lambda: False)
  monkeypatch.setattr(tfds, "builder", lambda name, data_dir=None: builder)
  with pytest.raises(data.DataError, match="tfds build fake --data_dir=/d"):
    data.prepared_tfds_builder("fake", "/d")
  builder.is_prepared = lambda: True
  assert data.prepared_tfds_builder("fake") is builder


# ----------------------------------------------------------------------------------------------
# 6. other unclear errors


def test_folder_layout_errors(tmp_path):
  _write_tree(tmp_path / "t")
  Image.new("RGB", (4, 4)).save(tmp_path / "t" / "train" / "stray.png")
  _raises(f"folder:{tmp_path}/t", "train", "'train/stray.png' lies directly in 'train/'",
          "class folder")
  _write_tree(tmp_path / "n")
  os.makedirs(tmp_path / "n" / "test" / "dog" / "more")
  Image.new("RGB", (4, 4)).save(tmp_path / "n" / "test" / "dog" / "more" / "x.png")
  _raises(f"folder:{tmp_path}/n", "test", "'test/dog/more/x.png' lies in a subfolder",
          "'test/dog/'")
  _write_tree(tmp_path / "r")  # a non-image file beside the class folders is not a class
  (tmp_path / "r" / "train" / "README.txt").write_text("cats and dogs")
  assert data.load(f"folder:{tmp_path}/r", "train").class_names == ["cat", "dog"]
  os.makedirs(tmp_path / "e" / "train")
  os.makedirs(tmp_path / "e" / "test")
  _raises(f"folder:{tmp_path}/e", "train", "no 'train/<class>/' folders")


class _Builder:
  """A prepared fake tfds builder of `records` in split 'train'."""

  def __init__(self, records):
    self.records = records
    self.info = types.SimpleNamespace(
        splits={"train": None}, features={
            "image": None,
            "label": types.SimpleNamespace(names=["a", "b"]),
            "id": None
        })

  def is_prepared(self):
    return True

  def as_data_source(self):
    return {"train": self.records}


def test_tfds_empty_split_and_mixed_shapes_raise(monkeypatch):
  import tensorflow_datasets as tfds

  monkeypatch.setattr(tfds, "builder", lambda name, data_dir=None: _Builder([]))
  _raises("tfds:fake", "train", "'fake'", "'train' has no examples")
  records = [{
      "image": np.zeros(shape, np.uint8),
      "label": 0,
      "id": f"train_{i}"
  } for i, shape in enumerate([(4, 4, 3), (4, 4, 3), (5, 4, 3)])]
  monkeypatch.setattr(tfds, "builder", lambda name, data_dir=None: _Builder(records))
  _raises("tfds:fake", "train", "'fake'", "mixes image shapes", r"\(5, 4, 3\) at original "
          "position 2")

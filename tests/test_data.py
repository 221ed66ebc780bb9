"""Data sources: shapes, canonical order, tfds id ordering, and clear errors on bad input."""

import os
import tarfile
import types

import numpy as np
import pytest
from PIL import Image

from jaxattr import data, fingerprint


def _write_tree(root, classes=("cat", "dog"), per_class=3, size=8, splits=("train", "test")):
  rng = np.random.default_rng(0)
  for s in splits:
    for c in classes:
      os.makedirs(os.path.join(root, s, c), exist_ok=True)
      for i in range(per_class):
        arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(arr).save(os.path.join(root, s, c, f"{i:04d}.png"))


def test_digits_split_is_fixed_and_disjoint():
  tr = data.load("digits", "train")
  te = data.load("digits", "test")
  assert tr.images.shape == (1438, 32, 32, 3) and te.images.shape == (359, 32, 32, 3)
  assert tr.images.dtype == np.uint8 and tr.labels.dtype == np.int32
  assert tr.class_names == [str(i) for i in range(10)]
  np.testing.assert_array_equal(tr.index, np.arange(1438))
  again = data.load("digits", "train")
  np.testing.assert_array_equal(tr.images, again.images)
  small = data.load("digits", "test", size=16)
  assert small.images.shape == (359, 16, 16, 3)
  # Train and test images are different digits: no test image occurs in train.
  tr_set = {im.tobytes() for im in tr.images}
  assert sum(im.tobytes() in tr_set for im in te.images) < 5  # sklearn digits has a few dupes


def test_folder_directory_and_order(tmp_path):
  _write_tree(tmp_path, classes=("b_dog", "a_cat"))
  ds = data.load(f"folder:{tmp_path}", "train")
  assert ds.class_names == ["a_cat", "b_dog"]
  np.testing.assert_array_equal(ds.labels, [0, 0, 0, 1, 1, 1])
  first = np.asarray(Image.open(tmp_path / "train" / "a_cat" / "0000.png"))
  np.testing.assert_array_equal(ds.images[0], first)
  last = np.asarray(Image.open(tmp_path / "train" / "b_dog" / "0002.png"))
  np.testing.assert_array_equal(ds.images[-1], last)
  lim = data.load(f"folder:{tmp_path}", "train", limit_per_class=2)
  np.testing.assert_array_equal(lim.index, [0, 1, 3, 4])
  # Only the kept images are decoded; they equal the same rows of the whole split.
  np.testing.assert_array_equal(lim.images, ds.images[[0, 1, 3, 4]])
  np.testing.assert_array_equal(lim.labels, ds.labels[[0, 1, 3, 4]])


@pytest.mark.parametrize("suffix,mode,top", [(".tar.gz", "w:gz", ""), (".tar", "w", "cifar/")])
def test_folder_tar_equals_directory(tmp_path, suffix, mode, top):
  root = tmp_path / "tree"
  _write_tree(root)
  arc = tmp_path / f"set{suffix}"
  with tarfile.open(arc, mode) as t:
    for s in ("train", "test"):
      t.add(root / s, arcname=top + s)
  for split in ("train", "test"):
    a = data.load(f"folder:{root}", split)
    b = data.load(f"folder:{arc}", split)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.class_names == b.class_names
    lim = data.load(f"folder:{arc}", split, limit_per_class=2)
    np.testing.assert_array_equal(lim.images, a.images[lim.index])


def test_folder_errors(tmp_path):
  with pytest.raises(data.DataError, match="does not exist"):
    data.load(f"folder:{tmp_path}/nope", "train")
  _write_tree(tmp_path / "t1", splits=("train",))
  with pytest.raises(data.DataError, match="no 'test/<class>/' folders"):
    data.load(f"folder:{tmp_path}/t1", "test")
  with pytest.raises(data.DataError, match="unknown split 'val'"):
    data.load(f"folder:{tmp_path}/t1", "val")
  _write_tree(tmp_path / "t2")
  os.makedirs(tmp_path / "t2" / "train" / "empty")
  with pytest.raises(data.DataError, match="train/empty/' has no images"):
    data.load(f"folder:{tmp_path}/t2", "train")
  _write_tree(tmp_path / "t3")
  bad = tmp_path / "t3" / "test" / "cat" / "0001.png"
  bad.write_bytes(b"not an image")
  with pytest.raises(data.DataError, match="unreadable image .*0001.png"):
    data.load(f"folder:{tmp_path}/t3", "test")
  with pytest.raises(data.DataError, match="unknown data source"):
    data.load("imagenet", "train")


def _cfg(source, **options):
  return types.SimpleNamespace(source=source, options=options)


def test_fingerprint_follows_the_files_and_options(tmp_path):
  _write_tree(tmp_path / "t")
  src = f"folder:{tmp_path}/t"
  fp = fingerprint.data_fingerprint(_cfg(src, size=8))
  assert fingerprint.data_fingerprint(_cfg(src, size=8,
                                           limit_per_class=None)) == fp  # None = not given
  assert fingerprint.data_fingerprint(_cfg(f"folder:{tmp_path}/./t", size=8)) == fp  # same tree
  assert fingerprint.data_fingerprint(_cfg(src, size=16)) != fp
  f = tmp_path / "t" / "train" / "cat" / "0001.png"
  st = f.stat()
  os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  touched = fingerprint.data_fingerprint(_cfg(src, size=8))
  assert touched != fp
  f.write_bytes(f.read_bytes() + b"\0")
  os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the size alone tells
  assert fingerprint.data_fingerprint(_cfg(src, size=8)) not in (fp, touched)
  (tmp_path / "t" / "test" / "dog" / "0009.png").write_bytes(b"x")
  added = fingerprint.data_fingerprint(_cfg(src, size=8))
  os.makedirs(tmp_path / "t" / "train" / "empty")
  assert fingerprint.data_fingerprint(_cfg(src, size=8)) != added
  # Archives and npz files: path, size and mtime.
  arc = tmp_path / "t.tar"
  with tarfile.open(arc, "w") as tar:
    tar.add(tmp_path / "t", arcname="")
  a = fingerprint.data_fingerprint(_cfg(f"folder:{arc}"))
  assert fingerprint.data_fingerprint(_cfg(f"folder:{arc}")) == a
  os.utime(arc, ns=(1, 1))
  assert fingerprint.data_fingerprint(_cfg(f"folder:{arc}")) != a
  npz = tmp_path / "d.npz"
  np.savez(npz, x_train=np.zeros((2, 4, 4, 3), np.uint8), y_train=np.zeros(2))
  n = fingerprint.data_fingerprint(_cfg(f"npz:{npz}"))
  np.savez(npz, x_train=np.ones((3, 4, 4, 3), np.uint8), y_train=np.zeros(3))
  assert fingerprint.data_fingerprint(_cfg(f"npz:{npz}")) != n
  d = fingerprint.data_fingerprint(_cfg("digits", size=16))
  assert d == fingerprint.data_fingerprint(_cfg("digits", size=16)) != fingerprint.data_fingerprint(
      _cfg("digits"))


def test_fingerprint_errors_match_load(tmp_path):
  for source in (f"folder:{tmp_path}/nope", f"npz:{tmp_path}/nope.npz", "imagenet", "npz:"):
    with pytest.raises(data.DataError) as loading:
      data.load(source, "train")
    with pytest.raises(data.DataError) as fingerprinting:
      fingerprint.data_fingerprint(_cfg(source))
    assert str(fingerprinting.value) == str(loading.value)


def test_npz_source_and_errors(tmp_path):
  rng = np.random.default_rng(1)
  p = tmp_path / "d.npz"
  np.savez(p, x_train=rng.integers(0, 256, (5, 4, 4, 3), dtype=np.uint8), y_train=np.array([
      0, 1, 2, 1, 0
  ]), x_test=rng.random((2, 4, 4)), y_test=np.array([2, 0]), class_names=np.array(["a", "b", "c"]))
  tr = data.load(f"npz:{p}", "train")
  te = data.load(f"npz:{p}", "test")
  assert tr.images.shape == (5, 4, 4, 3) and te.images.shape == (2, 4, 4, 3)
  assert te.images.dtype == np.uint8 and tr.class_names == ["a", "b", "c"]
  bad = tmp_path / "bad.npz"
  np.savez(bad, x_train=np.zeros((3, 4, 4, 3), np.uint8), y_train=np.zeros(2))
  with pytest.raises(data.DataError, match="x_train has 3 images but y_train has 2"):
    data.load(f"npz:{bad}", "train")
  with pytest.raises(data.DataError, match="missing key 'x_test'"):
    data.load(f"npz:{bad}", "test")
  with pytest.raises(data.DataError, match="does not exist"):
    data.load(f"npz:{tmp_path}/missing.npz", "train")


def test_order_from_ids():
  ids = [b"train_00002", b"train_00000", "train_00001"]
  np.testing.assert_array_equal(data.order_from_ids(ids), [2, 0, 1])
  with pytest.raises(data.DataError, match="no trailing number"):
    data.order_from_ids([b"abc"])
  with pytest.raises(data.DataError, match="not a permutation"):
    data.order_from_ids([b"x_1", b"x_1"])


class _FakeFeature(dict):
  pass


def test_tfds_recovers_original_order(monkeypatch):
  """A fake prepared builder whose records are shuffled; load() must undo the shuffle."""
  import tensorflow_datasets as tfds

  rng = np.random.default_rng(0)
  n = 7
  images = rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
  labels = rng.integers(0, 3, n)
  stored = rng.permutation(n)  # storage order != original order
  records = [{
      "image": images[i],
      "label": labels[i],
      "id": f"train_{i:05d}".encode()
  } for i in stored]
  label_feature = types.SimpleNamespace(names=["x", "y", "z"])
  info = types.SimpleNamespace(splits={"train": None}, features={
      "image": None,
      "label": label_feature,
      "id": None
  })

  class Builder:

    def __init__(self, prepared):
      self.prepared, self.info = prepared, info

    def is_prepared(self):
      return self.prepared

    def as_data_source(self):
      return {"train": records}

  monkeypatch.setattr(tfds, "builder", lambda name, data_dir=None: Builder(True))
  ds = data.load("tfds:fake", "train")
  np.testing.assert_array_equal(ds.images, images)
  np.testing.assert_array_equal(ds.labels, labels)
  np.testing.assert_array_equal(ds.index, np.arange(n))
  assert ds.class_names == ["x", "y", "z"]
  with pytest.raises(data.DataError, match="no split 'test'"):
    data.load("tfds:fake", "test")
  monkeypatch.setattr(tfds, "builder", lambda name, data_dir=None: Builder(False))
  with pytest.raises(data.DataError, match="tfds build fake"):
    data.load("tfds:fake", "train", data_dir="/some/dir")
  with pytest.raises(data.DataError, match="tfds build fake"):
    fingerprint.data_fingerprint(_cfg("tfds:fake", data_dir="/some/dir"))


def test_tfds_fingerprint_lists_the_prepared_files(monkeypatch, tmp_path):
  import tensorflow_datasets as tfds

  (tmp_path / "fake-train.array_record-00000-of-00001").write_bytes(b"abc")
  builder = types.SimpleNamespace(is_prepared=lambda: True, data_dir=str(tmp_path))
  monkeypatch.setattr(tfds, "builder", lambda name, data_dir=None: builder)
  fp = fingerprint.data_fingerprint(_cfg("tfds:fake"))
  assert fingerprint.data_fingerprint(_cfg("tfds:fake")) == fp
  (tmp_path / "dataset_info.json").write_text("{}")
  assert fingerprint.data_fingerprint(_cfg("tfds:fake")) != fp


def test_real_cifar10_archive(cifar_tar):
  tr = data.load(f"folder:{cifar_tar}", "train")
  te = data.load(f"folder:{cifar_tar}", "test")
  assert tr.images.shape == (50000, 32, 32, 3) and te.images.shape == (10000, 32, 32, 3)
  assert tr.class_names[0] == "airplane" and len(tr.class_names) == 10
  np.testing.assert_array_equal(np.bincount(tr.labels), [5000] * 10)
  np.testing.assert_array_equal(np.bincount(te.labels), [1000] * 10)


def test_arrays_fingerprint_hashes_memory_maps_in_blocks(tmp_path, monkeypatch):
  # The attribution chunks' key hashes the features; ImageNet's are a 5-10 GB memory map, hashed a
  # block at a time (never copied whole), with the hash of the whole array.
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1000, 37)).astype(np.float16)
  path = str(tmp_path / "x.npy")
  np.save(path, x)
  whole = fingerprint.arrays_fingerprint(x, np.arange(5))
  monkeypatch.setattr(fingerprint, "HASH_BLOCK_BYTES", 1000)  # 13 rows a block
  assert fingerprint.arrays_fingerprint(np.load(path, mmap_mode="r"), np.arange(5)) == whole
  assert fingerprint.arrays_fingerprint(x[:, ::2]) == fingerprint.arrays_fingerprint(
      np.ascontiguousarray(x[:, ::2]))
  y = x.copy()
  y[-1, -1] += 1
  assert fingerprint.arrays_fingerprint(y, np.arange(5)) != whole

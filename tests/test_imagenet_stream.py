"""ImageNet's layouts, lazy splits, the decode transform and grain streaming (issue #16), on a tree
the tests generate (`benchmarks/imagenet_tree.py`)."""

import os
import shutil
import sys

import numpy as np
import pytest
from absl import flags

from benchmarks import imagenet_tree as tree
from jaxattr import data, stream
from jaxattr.folders import DataError
from tests.conftest import load_config, save_tiny_encoder


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("imagenet"))
  return root, tree.make_tree(root)


def _listing(split):
  return [f for f, _ in split], [lab for _, lab in split]


def test_train_order_and_labels_match_an_independent_listing(imagenet):
  root, listing = imagenet
  fs = stream.open_split(f"folder:{root}", "train")
  files, labels = _listing(listing["train"])
  assert list(fs.files) == files and fs.labels.tolist() == labels
  assert fs.class_names == tree.WNIDS and fs.index.tolist() == list(range(len(files)))


@pytest.mark.parametrize("labels_from", ["csv", "devkit", "class_folders"])
def test_validation_split_in_every_layout(tmp_path, labels_from):
  root = str(tmp_path / "t")
  listing = tree.make_tree(root, flat_val=labels_from != "class_folders", csv=labels_from == "csv",
                           devkit=labels_from == "devkit")
  fs = stream.open_split(f"folder:{root}", "test")  # val/ is the test split
  files, labels = _listing(listing["val"])
  assert list(fs.files) == files and fs.labels.tolist() == labels


def test_explicit_label_file_option(tmp_path):
  root = str(tmp_path / "t")
  tree.make_tree(root, csv=False, devkit=True)
  truth = os.path.join(root, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt")
  moved = str(tmp_path / "devkit")
  shutil.move(os.path.dirname(truth), moved)
  with pytest.raises(DataError, match="LOC_val_solution.csv"):
    stream.open_split(f"folder:{root}", "test")
  fs = stream.open_split(f"folder:{root}", "test", val_labels=os.path.join(
      moved, "ILSVRC2012_validation_ground_truth.txt"))
  assert len(fs) == len(tree.VAL)
  # The same from a config, as `--config.data.options.val_labels=FILE` sets it: streamed and in
  # memory, with the option validated beside the others.
  config = load_config("imagenet", "tiny")
  config.data.source = f"folder:{root}"
  config.data.options.val_labels = os.path.join(moved, "ILSVRC2012_validation_ground_truth.txt")
  for streamed in (True, False):
    config.data.stream = streamed
    config.data.options.size = None if streamed else 16  # in memory: one size for the array
    _, test = stream.splits(config.data)
    assert len(test) == len(tree.VAL)
  from jaxattr import validate  # pylint: disable=import-outside-toplevel
  assert validate.problems(config, stages=()) == []
  config.data.options.data_dir = str(tmp_path)
  assert validate.problems(config, stages=()) == [
      "data.options.data_dir: not an option of 'folder' sources (they take size, limit_per_class, "
      "workers, val_labels); unset it or use another source"
  ]


def test_in_memory_load_reads_the_same_layout(imagenet):
  root, listing = imagenet
  ds = data.load(f"folder:{root}", "test", size=16)
  assert ds.labels.tolist() == _listing(listing["val"])[1] and ds.images.shape == (6, 16, 16, 3)


def test_every_image_kind_decodes_to_rgb(imagenet):
  root, _ = imagenet
  fs = stream.open_split(f"folder:{root}", "train")
  shaper = stream.ResizeCrop(resize=20, crop=16)
  for i in range(len(fs)):  # CMYK, grayscale, a PNG named .JPEG among them
    out = shaper(fs[i])
    assert out["image"].shape == (16, 16, 3) and out["image"].dtype == np.uint8 and out["ok"]


def test_resize_crop_equals_torchvision(imagenet):
  torchvision = pytest.importorskip("torchvision")
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from torchvision import transforms  # pylint: disable=g-import-not-at-top

  del torchvision
  root, _ = imagenet
  fs = stream.open_split(f"folder:{root}", "train")
  ref = transforms.Compose([transforms.Resize(24), transforms.CenterCrop(20)])
  shaper = stream.ResizeCrop(resize=24, crop=20)
  for i in range(len(fs)):
    with Image.open(fs[i][0]) as im:
      want = np.asarray(ref(im.convert("RGB")))
    np.testing.assert_array_equal(shaper(fs[i])["image"], want)


def test_draft_decode_stays_close_to_a_full_decode(tmp_path):
  # The resident copy's shortcut: JPEGs decoded at a reduced DCT scale, then resized.
  rng = np.random.default_rng(0)
  path = tmp_path / "big.JPEG"
  path.write_bytes(tree._jpeg(tree._image(rng, 500, 375)))  # pylint: disable=protected-access
  item = (str(path), 0, 0, 0)
  full = stream.ResizeCrop(resize=64, crop=64)(item)["image"].astype(np.int16)
  draft = stream.ResizeCrop(resize=64, crop=64, draft=True)(item)["image"].astype(np.int16)
  diff = np.abs(full - draft)
  assert diff.mean() < 3.0 and np.percentile(diff, 99) < 16, (diff.mean(), diff.max())


def test_batches_in_order_threads_and_workers(imagenet):
  flags.FLAGS(sys.argv[:1], known_only=True)  # grain's worker processes read absl flags
  root, _ = imagenet
  fs = stream.open_split(f"folder:{root}", "train")
  shaper = stream.ResizeCrop(resize=20, crop=16)
  want = np.stack([shaper(fs[i])["image"] for i in range(len(fs))])
  for workers in (0, 1, 2):
    raw = list(stream.batches(fs, shaper, 2, start=2, stop=len(fs), workers=workers))
    assert sorted(np.concatenate([b["position"] for b in raw]).tolist()) == list(range(2, len(fs)))
    got = list(stream.ordered(iter(raw), 2, len(fs), 2))
    assert all(len(b["image"]) <= 2 for b in got)
    np.testing.assert_array_equal(np.concatenate([b["image"] for b in got]), want[2:])
    assert np.concatenate([b["index"] for b in got]).tolist() == list(range(2, len(fs)))
  with pytest.raises(RuntimeError, match="never arrived"):
    list(stream.ordered(iter(raw[1:]), 2, len(fs), 2))


def test_shard_chunks_cover_every_row_once():
  parts = [stream.shard_chunks(23, 5, p, 3) for p in range(3)]
  rows = sorted(r for part in parts for _, s, e in part for r in range(s, e))
  assert rows == list(range(23)) and [j for j, _, _ in parts[1]] == [1, 4]


# --- bad input ---------------------------------------------------------------------------------


def test_ground_truth_of_another_length_is_named(tmp_path):
  root = str(tmp_path / "t")
  tree.make_tree(root, csv=False)
  truth = os.path.join(root, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt")
  with open(truth, "a") as f:
    f.write("1\n")
  with pytest.raises(DataError, match="ILSVRC2012_validation_ground_truth.txt: 7 labels but .* 6"):
    stream.open_split(f"folder:{root}", "test")


def test_meta_without_synsets_is_named(tmp_path):
  root = str(tmp_path / "t")
  tree.make_tree(root, csv=False)
  meta = os.path.join(root, "ILSVRC2012_devkit_t12/data/meta.mat")
  tree.write_meta_mat(meta, tree.DEVKIT_IDS, field="classes")
  with pytest.raises(DataError, match="meta.mat: no 'synsets' variable"):
    stream.open_split(f"folder:{root}", "test")


def test_missing_split_empty_class_and_misplaced_images(tmp_path):
  root = str(tmp_path / "t")
  tree.make_tree(root)
  shutil.rmtree(os.path.join(root, "val"))
  with pytest.raises(DataError, match=r"no 'test/<class>/' folders found \(nor 'val/'\)"):
    stream.open_split(f"folder:{root}", "test")
  os.makedirs(os.path.join(root, "train", "n09999999"))
  with pytest.raises(DataError, match="'train/n09999999/' has no images"):
    stream.open_split(f"folder:{root}", "train")


def test_unreadable_image_named_or_skipped(tmp_path):
  root = str(tmp_path / "t")
  tree.make_tree(root)
  bad = os.path.join(root, "train", tree.WNIDS[0], f"{tree.WNIDS[0]}_00001.JPEG")
  with open(bad, "wb") as f:
    f.write(b"\xff\xd8 not really a jpeg")
  fs = stream.open_split(f"folder:{root}", "train")
  with pytest.raises(
      DataError, match=f"unreadable image .*{os.path.basename(bad)}.*replace or "
      "remove the file, or pass skip_unreadable=True to store such images as zeros"):
    stream.ResizeCrop(resize=20, crop=16)(fs[0])
  out = stream.ResizeCrop(resize=20, crop=16, skip_unreadable=True)(fs[0])
  assert not out["ok"] and not out["image"].any()

  # The stages name their own config switch; the prepare stage with it on counts the image.
  from jaxattr import features, resident  # pylint: disable=g-import-not-at-top
  c = load_config("imagenet", "tiny")
  c.data.source = f"folder:{root}"
  c.encoder.checkpoint = str(tmp_path / "encoder")
  save_tiny_encoder(c.encoder.checkpoint)
  workdir = str(tmp_path / "w")
  for run, switch in ((features.run, "--config.features.skip_unreadable=True"),
                      (resident.run, "--config.resident.skip_unreadable=True")):
    with pytest.raises(DataError, match=f"_00001.JPEG.*or pass {switch} to store"):
      run(c, workdir)
  c.resident.skip_unreadable = True
  summary = resident.run(c, workdir)
  assert summary["train"]["unreadable"] == 1 and summary["test"]["unreadable"] == 0, summary
  # Skipped, it keeps its position but is no attribution candidate and in no training set.
  train, test = resident.datasets(c, workdir, *stream.splits(c.data))
  assert np.flatnonzero(~train.ok).tolist() == [0] and test.ok is None  # _00001: the first
  c.features.skip_unreadable = True
  assert features.run(c, workdir)["train"]["unreadable_skipped"] == 1
  from jaxattr.attribute import attribution  # pylint: disable=g-import-not-at-top
  # The bad image's class has one candidate fewer; k = the readable rest takes all but it.
  c.attribution.targets, c.attribution.k = "all", int(np.sum(train.labels == 0))
  with pytest.raises(
      attribution.AttributionError,
      match=f"class 0, which has {c.attribution.k - 1} training candidates "
      r"\(1 unreadable"):
    attribution.run(c, workdir)
  c.attribution.k -= 1
  res = attribution.run(c, workdir)
  for method in ("esvm", "l2"):
    top = res[method].indices
    assert len(top) == len(test) and not (top == train.index[0]).any(), (method, top)


def test_archives_and_other_sources_are_not_streamed(tmp_path):
  with pytest.raises(DataError, match="cannot be streamed"):
    stream.open_split("digits", "train")
  # launch/prepare.py on an in-memory source says that it needs no resident copy.
  from jaxattr import resident  # pylint: disable=g-import-not-at-top
  c = load_config("digits", "quick")
  with pytest.raises(DataError, match="data.source='digits' is held in memory.*need none"):
    resident.run(c, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


# --- streamed features ---------------------------------------------------------------------------


def _encoder():
  import jax  # pylint: disable=g-import-not-at-top

  from jaxattr import features  # pylint: disable=g-import-not-at-top
  from jaxattr.models import get_encoder  # pylint: disable=g-import-not-at-top

  model = get_encoder("lightly_resnet18", width=0.0625, stage_sizes=(1,))
  v = model.init(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32), train=False)
  step, batch = features.make_batch_extractor(model, v, (0.5,) * 3, (0.25,) * 3, batch_size=4)
  return features, step, batch


def test_streamed_features_equal_in_memory_and_resume_after_a_kill(imagenet, tmp_path, monkeypatch):
  from jaxattr import chunkstore  # pylint: disable=g-import-not-at-top

  features, step, batch = _encoder()
  root, _ = imagenet
  fs = stream.open_split(f"folder:{root}", "train")
  shaper = stream.ResizeCrop(resize=20, crop=16)
  images = np.stack([shaper(fs[i])["image"] for i in range(len(fs))])
  want = np.concatenate([
      np.asarray(step(images[s:s + batch]))[:len(images[s:s + batch])]
      for s in range(0, len(images), batch)
  ])
  kwargs = dict(resize=20, crop=16, key="k", chunk_rows=3, feature_dim=want.shape[1])
  path = str(tmp_path / "train.features.npy")
  got, ok = features.extract_stream(fs, step, batch, path, **kwargs)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)
  assert ok.all() and isinstance(got, np.memmap)

  # Killed while writing the second of three chunks: the rerun writes only what is missing.
  path2 = str(tmp_path / "again.features.npy")
  real_write = chunkstore.ChunkStore.write
  written, die = [], [True]

  def dying_write(self, j, rows, **extras):
    if j == 1 and die[0]:
      die[0] = False
      raise KeyboardInterrupt
    written.append(j)
    return real_write(self, j, rows, **extras)

  monkeypatch.setattr(chunkstore.ChunkStore, "write", dying_write)
  with pytest.raises(KeyboardInterrupt):
    features.extract_stream(fs, step, batch, path2, **kwargs)
  assert written == [0] and not os.path.exists(path2) and os.path.exists(path2 + ".partial")
  written.append("resumed")
  got2, _ = features.extract_stream(fs, step, batch, path2, **kwargs)
  assert written == [0, "resumed", 1, 2]  # chunk 0 was not redone
  np.testing.assert_array_equal(np.asarray(got2), np.asarray(got))
  # Another key (config or data) never resumes a partial store.
  monkeypatch.setattr(chunkstore.ChunkStore, "write", real_write)
  store = chunkstore.ChunkStore(str(tmp_path / "x.npy"), (7, 3), "float32", 3, "a")
  store.write(0, np.ones((3, 3)), ok=np.ones(3, bool))
  assert chunkstore.ChunkStore(str(tmp_path / "x.npy"), (7, 3), "float32", 3, "b").done() == set()


def test_features_stage_streams_a_tree_with_the_encoders_size(imagenet, tmp_path):

  from jaxattr import config as config_lib, features  # pylint: disable=g-import-not-at-top
  from jaxattr.attribute import attribution  # pylint: disable=g-import-not-at-top

  root, listing = imagenet
  ckpt = str(tmp_path / "encoder")
  model, v = save_tiny_encoder(ckpt)
  c = config_lib.base_config()
  c.data.source = f"folder:{root}"
  c.data.stream = True
  c.encoder.checkpoint = ckpt
  c.features.batch_size = 4
  c.features.chunk_rows = 5
  c.features.store_dtype = "float16"
  workdir = str(tmp_path / "w")
  summary = features.run(c, workdir)
  assert summary["resize_crop"] == [18, 16] or summary["resize_crop"] == (18, 16)
  train = attribution.load_features(workdir, "train")
  test = attribution.load_features(workdir, "test")
  assert train["features"].dtype == np.float16 and isinstance(train["features"], np.memmap)
  assert train["labels"].tolist() == [lab for _, lab in listing["train"]]
  assert test["labels"].tolist() == [lab for _, lab in listing["val"]]
  # The same images through the in-memory path of the same transform.
  fs = stream.open_split(f"folder:{root}", "test")
  shaper = stream.ResizeCrop(resize=18, crop=16)
  images = np.stack([shaper(fs[i])["image"] for i in range(len(fs))])
  step, _ = features.make_batch_extractor(model, v, (0.5,) * 3, (0.25,) * 3, batch_size=8)
  want = np.asarray(step(images))[:len(images)]
  np.testing.assert_allclose(np.asarray(test["features"], np.float32), want, rtol=2e-3, atol=2e-3)
  # A rerun of the same config skips the stage.
  assert features.run(c, workdir)["fingerprint"] == summary["fingerprint"]


_STREAM_SCRIPT = r"""
import json, sys
import jax, numpy as np
from jaxattr import config as config_lib, features
from jaxattr.attribute import attribution
from tests.conftest import save_tiny_encoder
root, workdir = sys.argv[1:3]
ckpt = workdir + "_encoder"
save_tiny_encoder(ckpt)
c = config_lib.base_config()
c.data.source = "folder:" + root
c.data.stream = True
c.encoder.checkpoint = ckpt
c.features.batch_size = 6
c.features.chunk_rows = 5
features.run(c, workdir)
for split in ("train", "test"):
  f = attribution.load_features(workdir, split)
  np.save(workdir + "_" + split + ".npy", np.asarray(f["features"]))
  np.save(workdir + "_" + split + "_index.npy", np.asarray(f["index"]))
print(json.dumps({"devices": jax.device_count()}))
"""


def test_streamed_features_on_four_fake_devices_equal_one(imagenet, tmp_path):
  # The features stage shards each streamed batch over all local devices (padded to a multiple
  # of them): 4 fake CPU devices give one device's features, rows and order.
  import json  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top

  from tests.conftest import REPO, repo_env  # pylint: disable=g-import-not-at-top

  root, _ = imagenet
  out = {}
  for devices in (1, 4):
    env = dict(repo_env(), JAX_NUM_CPU_DEVICES=str(devices), JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    workdir = str(tmp_path / f"w{devices}")
    res = subprocess.run([sys.executable, "-c", _STREAM_SCRIPT, root, workdir], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1])["devices"] == devices
    out[devices] = {
        split: (np.load(f"{workdir}_{split}.npy"), np.load(f"{workdir}_{split}_index.npy"))
        for split in ("train", "test")
    }
  for split in ("train", "test"):
    (f1, i1), (f4, i4) = out[1][split], out[4][split]
    np.testing.assert_array_equal(i1, i4)
    assert f1.shape == f4.shape and np.isfinite(f1).all()
    np.testing.assert_allclose(f4, f1, rtol=1e-5, atol=1e-5)


def test_resident_copy_resumes_and_matches_the_transform(imagenet, tmp_path, monkeypatch):
  from jaxattr import chunkstore, resident  # pylint: disable=g-import-not-at-top

  root, listing = imagenet
  fs = stream.open_split(f"folder:{root}", "train")
  out = str(tmp_path / "resident")
  real_write = chunkstore.ChunkStore.write
  calls = []

  def dying_write(self, j, rows, **extras):
    calls.append(j)
    if j == 1 and calls.count(1) == 1:
      raise KeyboardInterrupt
    return real_write(self, j, rows, **extras)

  monkeypatch.setattr(chunkstore.ChunkStore, "write", dying_write)
  with pytest.raises(KeyboardInterrupt):
    resident.prepare(fs, out, 32, key="k", chunk_rows=4, batch_size=2)
  summary = resident.prepare(fs, out, 32, key="k", chunk_rows=4, batch_size=2)
  assert calls == [0, 1, 1, 2] and summary["images"] == len(fs)
  copy = resident.load(out, "train", 32)
  assert copy["images"].shape == (len(fs), 32, 32, 3) and copy["ok"].all()
  assert copy["labels"].tolist() == [lab for _, lab in listing["train"]]
  draft = stream.ResizeCrop(32, 32, draft=True)
  for i in range(len(fs)):
    np.testing.assert_array_equal(copy["images"][i], draft(fs[i])["image"])
  with pytest.raises(ValueError, match="one of"):
    resident.prepare(fs, out, 48, key="k")


def test_tiny_imagenet_config_end_to_end(imagenet, tmp_path):
  """configs/imagenet.py:tiny through the main job on the generated tree, with a converted
  random-init torchvision ResNet-18: streamed features, ESVM and l2 top-k, the resident copy,
  removal and mislabel support with ResNet-18 ensembles, the report; a rerun skips every stage,
  and a resident copy of other data is refused before training."""
  torch = pytest.importorskip("torch")
  torchvision = pytest.importorskip("torchvision")
  from jaxattr import convert, pipeline  # pylint: disable=g-import-not-at-top
  from jaxattr.attribute import attribution  # pylint: disable=g-import-not-at-top

  root, listing = imagenet
  torch.manual_seed(0)
  pth = str(tmp_path / "rn18.pth")
  torch.save(torchvision.models.resnet18().state_dict(), pth)
  convert.convert(pth, str(tmp_path / "rn18"))
  c = load_config("imagenet", "tiny")
  c.data.source = f"folder:{root}"
  c.encoder.checkpoint = str(tmp_path / "rn18")
  workdir = str(tmp_path / "w")
  summary = pipeline.run(c, workdir)
  assert summary["features"]["resize_crop"] in ([256, 224], (256, 224))
  for method in ("esvm", "l2"):
    res = attribution._read(os.path.join(workdir, "attribution", method))  # pylint: disable=protected-access
    assert res.indices.shape == (len(listing["val"]), 2)
  assert os.path.exists(os.path.join(workdir, "report.html"))
  assert os.path.exists(os.path.join(workdir, "resident", "train_32.npy"))
  for metric in ("removal", "mislabel"):
    for method in ("esvm", "l2"):
      s = summary["support"][metric][method]
      assert s["targets"] == 2 and s["trainings"] >= 2, s
  # Every stage up to date (the report is always rendered anew).
  again = pipeline.run(c, workdir)["timings"]
  assert {
      k: v for k, v in again.items() if k != "report"
  } == {
      k: v for k, v in summary["timings"].items() if k != "report"
  }
  assert {"prepare", "support"} <= set(again)

  # A resident copy that is not this data's: refused by name before any training.
  from jaxattr import resident, stream  # pylint: disable=g-import-not-at-top
  from jaxattr.counterfactual import support  # pylint: disable=g-import-not-at-top
  train, test = stream.splits(c.data)
  meta = os.path.join(workdir, "resident", "train_32.npz")
  with np.load(meta) as z:
    saved = {k: z[k] for k in z.files}
  np.savez(meta, **{**saved, "index": saved["index"][::-1].copy()})
  with pytest.raises(resident.ResidentMismatchError, match="another index"):
    support.run(c, workdir, train=train, test=test)
  np.savez(meta, **{**saved, "class_names": saved["class_names"][:2]})
  with pytest.raises(resident.ResidentMismatchError, match="2 classes, the data 3"):
    support.run(c, workdir, train=train, test=test)
  c2 = c.copy_and_resolve_references()
  c2.resident.side = 64
  with pytest.raises(FileNotFoundError, match="launch/prepare.py"):
    support.run(c2, workdir, train=train, test=test)


def _fake_tfds(monkeypatch, root, features=("image", "label", "file_name")):
  # A prepared tfds dataset of the tree's images, as imagenet2012 holds them (records shuffled,
  # 'validation' for the test split), behind a fake builder (preparing a real one needs TF).
  import types  # pylint: disable=g-import-not-at-top

  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  splits = {}
  for ours, theirs in (("train", "train"), ("test", "validation")):
    fs = stream.open_split(f"folder:{root}", ours)
    records = []
    for i in np.random.default_rng(0).permutation(len(fs)):
      path, label, _, _ = fs[i]
      with open(path, "rb") as f:
        record = {"image": f.read(), "label": label, "file_name": os.path.basename(path).encode()}
      records.append({k: v for k, v in record.items() if k in features})
    splits[theirs] = records
  names = stream.open_split(f"folder:{root}", "train").class_names
  info = types.SimpleNamespace(
      splits={s: None for s in splits},
      features={k: types.SimpleNamespace(names=list(names)) for k in features})

  class Builder:

    def __init__(self):
      self.info = info

    def is_prepared(self):
      return True

    def as_data_source(self, split, decoders=None):
      assert decoders is not None and "image" in decoders  # images stay encoded
      return splits[split]

  monkeypatch.setattr(tfds, "builder", lambda name, data_dir=None: Builder())
  stream._tfds_source.cache_clear()  # pylint: disable=protected-access


def test_tfds_imagenet_streams_in_the_trees_order(imagenet, monkeypatch):
  root, _ = imagenet
  _fake_tfds(monkeypatch, root)
  shaper = stream.ResizeCrop(resize=20, crop=16)
  for split in ("train", "test"):
    folder = stream.open_split(f"folder:{root}", split)
    ts = stream.open_split("tfds:imagenet2012", split)
    assert ts.tfds_split == ("train" if split == "train" else "validation")
    assert list(ts.files) == [os.path.basename(f) for f in folder.files]
    np.testing.assert_array_equal(ts.labels, folder.labels)
    np.testing.assert_array_equal(ts.index, folder.index)
    assert ts.class_names == folder.class_names
    got = list(stream.read_range(ts, shaper, 4, 0, len(ts)))
    want = list(stream.read_range(folder, shaper, 4, 0, len(folder)))
    for a, b in zip(got, want):
      np.testing.assert_array_equal(a["image"], b["image"])
      np.testing.assert_array_equal(a["index"], b["index"])
  limited = stream.open_split("tfds:imagenet2012", "train", limit_per_class=2)
  assert np.bincount(limited.labels).max() == 2
  stream._tfds_source.cache_clear()  # pylint: disable=protected-access


def test_tfds_without_file_names_or_with_folder_options_is_refused(imagenet, monkeypatch):
  root, _ = imagenet
  _fake_tfds(monkeypatch, root, features=("image", "label"))
  with pytest.raises(DataError, match=r"no \['file_name'\] feature"):
    stream.open_split("tfds:imagenet2012", "train")
  with pytest.raises(DataError, match="data.options.val_labels is not an option of 'tfds'"):
    stream.open_split("tfds:imagenet2012", "test", val_labels=__file__)
  stream._tfds_source.cache_clear()  # pylint: disable=protected-access

"""Tests of jaxattr.attribute: the ESVM solver against sklearn's LinearSVC itself, l2/cosine
against NumPy, chunking, fake multi-device sharding, resume after a kill, bad inputs, the stage
and its launcher, retracing.
"""

import json
import os
import subprocess
import sys

import chex
import numpy as np
import pytest
from sklearn.svm import LinearSVC

from jaxattr import attribute, config as config_lib, data as data_lib, ownership, viz

# The module, which the package's `topk` (the function) hides from `from ... import`.
from jaxattr.attribute import attribution, esvm, linalg, ranking as topk_lib, selection
from jaxattr.attribute.options import SolverOptions
from jaxattr.attribute.solver import PCG

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL = 1e-4  # the bound on decision values relative to sklearn
TIE = 1e-6  # reference scores closer than this may swap places in a ranking


def sklearn_decision(target: np.ndarray, candidates: np.ndarray, C: float = 0.1) -> np.ndarray:
  """The reference: the decision values of sklearn's LinearSVC as the paper's code fits it."""
  x = np.vstack([target[None], candidates]).astype(np.float64)
  y = np.r_[1, np.zeros(len(candidates))]
  clf = LinearSVC(C=C, class_weight="balanced", tol=1e-6, max_iter=10000).fit(x, y)
  return clf.decision_function(candidates.astype(np.float64))


def assert_same_ranking(ours: np.ndarray, ref_scores: np.ndarray, k: int, descending=True):
  """Top-k of `ours` (positions) equals the reference's, except among reference ties."""
  ref = ref_scores if descending else -ref_scores
  order = np.argsort(-ref, kind="stable")[:k]
  ours = np.asarray(ours)[:k]
  # Position by position, our pick must score within TIE of the reference's pick.
  np.testing.assert_allclose(ref[ours], ref[order], rtol=0, atol=TIE)
  assert len(set(ours.tolist())) == k


def feature_sets(rng: np.random.Generator, n: int = 240, d: int = 24) -> dict[str, np.ndarray]:
  base = rng.normal(size=(n // 3, d))
  return {
      "gaussian":
          rng.normal(size=(n, d)),
      # Post-ReLU average-pooled features: non-negative with a large shared component.
      "nonnegative":
          np.abs(rng.normal(size=(n, d)) + 1.5),
      "near_duplicates":
          np.concatenate([
              base, base + 1e-4 * rng.normal(size=base.shape),
              base + 1e-3 * rng.normal(size=base.shape)
          ]),
      "scaled_offset":
          rng.normal(size=(n, d)) * 30.0 + 5.0,
  }


@pytest.mark.parametrize("name", ["gaussian", "nonnegative", "near_duplicates", "scaled_offset"])
def test_esvm_matches_sklearn(name):
  rng = np.random.default_rng(0)
  x = feature_sets(rng)[name].astype(np.float32)
  # Targets: two candidates themselves (a target identical to a candidate) and two new points.
  new = rng.normal(size=(2, x.shape[1])) * x.std() + x.mean()
  targets = np.concatenate([x[:2], new]).astype(np.float32)
  scores, stats = attribute.esvm_scores(targets, x, return_stats=True)  # C = 0.1
  scores = np.asarray(scores)
  assert np.asarray(stats.converged).all(), stats
  for i, t in enumerate(targets):
    ref = sklearn_decision(t, x)
    np.testing.assert_allclose(scores[i], ref, rtol=RTOL, atol=1e-6, err_msg=f"{name} {i}")
    assert_same_ranking(np.argsort(-scores[i], kind="stable"), ref, k=50)
  if name != "near_duplicates":  # there a 1e-4 perturbation of the target may outrank it
    # A candidate identical to its target ranks first.
    assert np.argmax(scores[0]) == 0 and np.argmax(scores[1]) == 1


def test_esvm_other_C_and_stats():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(150, 12)).astype(np.float32)
  t = rng.normal(size=(3, 12)).astype(np.float32)
  scores, stats = attribute.esvm_scores(t, x, SolverOptions(C=1.0), return_stats=True)
  for i in range(3):
    np.testing.assert_allclose(np.asarray(scores[i]), sklearn_decision(t[i], x, C=1.0), rtol=RTOL,
                               atol=1e-6)
  assert (np.asarray(stats.iterations) >= 1).all()
  assert (np.asarray(stats.newton_step) <= 1e-5).all()
  # Too few iterations: reported as not converged rather than passed off as a ranking.
  _, stats = attribute.esvm_scores(t, x, SolverOptions(C=1.0, max_iter=1), return_stats=True,
                                   allow_nonconverged=True)
  assert not np.asarray(stats.converged).any()


def test_esvm_deterministic():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(200, 16)).astype(np.float32)
  t = rng.normal(size=(5, 16)).astype(np.float32)
  a = np.asarray(attribute.esvm_scores(t, x))
  b = np.asarray(attribute.esvm_scores(t, x))
  np.testing.assert_array_equal(a, b)


def toy_features(seed=0, n_per_class=(120, 100, 90), n_test=24, d=16):
  rng = np.random.default_rng(seed)
  labels = np.concatenate([np.full(n, c) for c, n in enumerate(n_per_class)]).astype(np.int32)
  centers = rng.normal(size=(len(n_per_class), d)) * 2.0
  train = (centers[labels] + rng.normal(size=(len(labels), d))).astype(np.float32)
  test_labels = rng.integers(0, len(n_per_class), n_test).astype(np.int32)
  test = (centers[test_labels] + rng.normal(size=(n_test, d))).astype(np.float32)
  # Canonical train indices that are not positions, to check the index mapping.
  index = (np.arange(len(labels)) * 3 + 7).astype(np.int64)
  return train, labels, test, test_labels, index


def test_topk_esvm_same_class_and_all_candidates_match_sklearn():
  train, labels, test, test_labels, index = toy_features()
  targets = np.array([0, 5, 11])
  for same_class in (True, False):
    res = attribute.topk(train, labels, test, test_labels, method="esvm", k=40,
                         same_class=same_class, targets=targets, train_index=index, chunk_size=2)
    assert res.indices.shape == (3, 40) and res.indices.dtype == np.int64
    assert res.stats["converged"].all()
    for row, j in enumerate(targets):
      cand = np.flatnonzero(labels == test_labels[j]) if same_class else np.arange(len(labels))
      ref = sklearn_decision(test[j], train[cand])
      pos = np.searchsorted(index[cand], res.indices[row])  # back to candidate positions
      np.testing.assert_array_equal(index[cand][pos], res.indices[row])
      assert_same_ranking(pos, ref, k=40)
      np.testing.assert_allclose(res.scores[row], ref[pos], rtol=RTOL, atol=1e-6)
      if same_class:
        assert (labels[(res.indices[row] - 7) // 3] == test_labels[j]).all()


@pytest.mark.parametrize("method", ["l2", "cosine"])
def test_l2_and_cosine_match_numpy(method):
  train, labels, test, test_labels, index = toy_features(seed=3)
  res = attribute.topk(train, labels, test, test_labels, method=method, k=30, same_class=False,
                       train_index=index, chunk_size=8)
  t64, x64 = test.astype(np.float64), train.astype(np.float64)
  if method == "l2":
    ref = np.linalg.norm(t64[:, None] - x64[None], axis=-1)
    rank = ref  # ascending
  else:
    ref = (t64 / np.linalg.norm(t64, axis=1, keepdims=True)) @ (
        x64 / np.linalg.norm(x64, axis=1, keepdims=True)).T
    rank = -ref
  for i in range(len(test)):
    pos = (res.indices[i] - 7) // 3
    np.testing.assert_allclose(res.scores[i], ref[i, pos], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(rank[i, pos], np.sort(rank[i])[:30], rtol=0, atol=1e-5)


def test_chunked_equals_unchunked():
  train, labels, test, test_labels, index = toy_features(seed=4)
  kw = dict(method="esvm", k=25, train_index=index)
  one = attribute.topk(train, labels, test, test_labels, chunk_size=64, **kw)
  many = attribute.topk(train, labels, test, test_labels, chunk_size=3, **kw)
  np.testing.assert_allclose(many.scores, one.scores, rtol=1e-5, atol=1e-6)
  # Identical lists, except where two candidates tie to float32 precision and swap.
  differ = one.indices != many.indices
  assert np.all(np.abs(one.scores[differ] - many.scores[differ]) <= 1e-5)
  assert differ.mean() < 0.02


def test_unreadable_rows_are_never_candidates_nor_targets(tmp_path):
  """Rows the features stage skipped (ok False) are ranked as if absent from the split, and
  test rows so marked are no targets; with every row readable nothing changes."""
  train, labels, test, test_labels, index = toy_features(seed=5)
  ok = np.ones(len(train), bool)
  ok[[0, 4, 9, 30]] = False
  kept = np.flatnonzero(ok)
  for method in ("esvm", "l2"):
    kw = dict(method=method, k=20, targets=np.array([0, 3, 8]), chunk_size=2)
    got = attribute.topk(train, labels, test, test_labels, train_index=index, train_ok=ok,
                         chunk_dir=str(tmp_path / method), **kw)
    want = attribute.topk(train[kept], labels[kept], test, test_labels, train_index=index[kept],
                          **kw)
    np.testing.assert_array_equal(got.indices, want.indices)
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-6, atol=1e-7)
    assert not np.isin(got.indices, index[~ok]).any()
    # The same chunks are reused by a rerun only with the same exclusions.
    again = attribute.topk(train, labels, test, test_labels, train_index=index, train_ok=ok,
                           chunk_dir=str(tmp_path / method), **kw)
    assert again.computed_targets == 0
    other = ok.copy()
    other[1] = False
    redo = attribute.topk(train, labels, test, test_labels, train_index=index, train_ok=other,
                          chunk_dir=str(tmp_path / method), **kw)
    assert redo.computed_targets == 3 and not np.isin(redo.indices, index[1]).any()
  # All readable: the same as no mask at all.
  plain = attribute.topk(train, labels, test, test_labels, method="l2", k=20, train_index=index)
  every = attribute.topk(train, labels, test, test_labels, method="l2", k=20, train_index=index,
                         train_ok=np.ones(len(train), bool))
  np.testing.assert_array_equal(plain.indices, every.indices)
  # k beyond a class's readable images, and a mask of the wrong shape, are clear errors.
  c = int(labels[0])
  n_ok = int((ok & (labels == c)).sum())
  with pytest.raises(
      topk_lib.AttributionError,
      match=f"k={n_ok + 1} is larger than class {c}, which has {n_ok} training "
      "candidates \\(4 unreadable training images"):
    attribute.topk(train, labels, test, test_labels, k=n_ok + 1,
                   targets=np.flatnonzero(test_labels == c)[:1], train_ok=ok)
  with pytest.raises(topk_lib.AttributionError, match="train_ok must be bool"):
    attribute.topk(train, labels, test, test_labels, k=5, train_ok=ok[:-1])

  # Targets: unreadable test images are left out of 'all' and 'random', refused in a 'list'.
  test_ok = np.ones(50, bool)
  test_ok[[2, 7]] = False
  assert 2 not in attribution.select_targets("all", 50, 0, (), 0, test_ok)
  assert len(attribution.select_targets("all", 50, 0, (), 0, test_ok)) == 48
  for seed in range(5):
    drawn = attribution.select_targets("random", 50, 48, (), seed, test_ok)
    np.testing.assert_array_equal(drawn, np.flatnonzero(test_ok))
    np.testing.assert_array_equal(  # all readable: the draw is the one without the mask
        attribution.select_targets("random", 50, 10, (), seed, np.ones(50, bool)),
        attribution.select_targets("random", 50, 10, (), seed))
  with pytest.raises(topk_lib.AttributionError, match=r"must lie in \[1, 48\] \(the test images "
                     "readable"):
    attribution.select_targets("random", 50, 49, (), 0, test_ok)
  with pytest.raises(topk_lib.AttributionError, match=r"unreadable .*positions \[7\]"):
    attribution.select_targets("list", 50, 0, (1, 7), 0, test_ok)
  # A features file whose 'ok' does not fit its rows is named.
  np.savez(tmp_path / "features.npz", features=train, labels=labels, ok=ok[:-1])
  os.makedirs(tmp_path / "w" / "features")
  os.replace(tmp_path / "features.npz", tmp_path / "w" / "features" / "train.npz")
  with pytest.raises(topk_lib.AttributionError, match=r"train.npz: 'ok' must be bool \[310\]"):
    attribution.load_features(str(tmp_path / "w"), "train")


def test_sliced_scoring_program_equals_whole(monkeypatch):
  # On CPU the ESVM scoring program runs a chunk in slices of CPU_FINISH_SLICE targets.
  train, labels, test, test_labels, index = toy_features(seed=5)
  kw = dict(method="esvm", k=25, train_index=index, chunk_size=8)
  topk_lib._sharded_fn.cache_clear()
  whole = attribute.topk(train, labels, test, test_labels, **kw)  # 8 % 128: one slice
  monkeypatch.setattr(topk_lib, "CPU_FINISH_SLICE", 4)
  topk_lib._sharded_fn.cache_clear()
  sliced = attribute.topk(train, labels, test, test_labels, **kw)
  topk_lib._sharded_fn.cache_clear()
  # The same computation per target; only the products' blocking may round differently.
  np.testing.assert_allclose(sliced.scores, whole.scores, rtol=1e-6, atol=1e-7)
  assert (sliced.indices != whole.indices).mean() < 0.02
  np.testing.assert_array_equal(sliced.stats["iterations"], whole.stats["iterations"])
  np.testing.assert_allclose(sliced.stats["grad_norm"], whole.stats["grad_norm"], rtol=1e-4)


@pytest.mark.parametrize("method", ["esvm", "l2"])
def test_device_and_host_top_k_agree(method):
  # Accelerators pick the top k on the device (jax.lax.top_k), CPUs on the host: same lists.
  train, labels, test, test_labels, index = toy_features(seed=6)
  kw = dict(method=method, k=25, train_index=index, chunk_size=16)
  host = attribute.topk(train, labels, test, test_labels, select_on_host=True, **kw)
  device = attribute.topk(train, labels, test, test_labels, select_on_host=False, **kw)
  np.testing.assert_array_equal(host.indices, device.indices)
  np.testing.assert_array_equal(host.scores, device.scores)


def test_resume_after_kill(tmp_path, monkeypatch):
  train, labels, test, test_labels, index = toy_features(seed=5)
  kw = dict(method="esvm", k=20, train_index=index, chunk_size=4)
  full = attribute.topk(train, labels, test, test_labels, **kw)
  chunk_dir = str(tmp_path / "chunks")
  real_call = topk_lib._ChunkRunner.__call__
  calls = {"n": 0}

  def dying(self, *args):
    if calls["n"] == 2:
      raise KeyboardInterrupt("simulated kill")
    calls["n"] += 1
    return real_call(self, *args)

  monkeypatch.setattr(topk_lib._ChunkRunner, "__call__", dying)
  with pytest.raises(KeyboardInterrupt):
    attribute.topk(train, labels, test, test_labels, chunk_dir=chunk_dir, **kw)
  assert len([f for f in os.listdir(chunk_dir) if f.startswith("chunk_")]) == 2
  monkeypatch.setattr(topk_lib._ChunkRunner, "__call__", real_call)
  resumed = attribute.topk(train, labels, test, test_labels, chunk_dir=chunk_dir, **kw)
  n_chunks = len(attribute.plan_chunks(test_labels, np.arange(len(test)), True, 4))
  assert len([f for f in os.listdir(chunk_dir) if f.startswith("chunk_")]) == n_chunks
  assert resumed.computed_targets < len(test)  # the first two chunks came from disk
  np.testing.assert_array_equal(resumed.indices, full.indices)
  np.testing.assert_array_equal(resumed.scores, full.scores)
  # Different settings do not reuse those chunks.
  other = attribute.topk(train, labels, test, test_labels, chunk_dir=chunk_dir, **{**kw, "k": 10})
  assert other.computed_targets == len(test)


def _bad_inputs():
  train, labels, test, test_labels, _ = toy_features(seed=6)
  nan = train.copy()
  nan[3, 2] = np.nan
  inf = test.copy()
  inf[1, 0] = np.inf
  no_class = test_labels.copy()
  no_class[0] = 7
  return {
      "labels": (dict(train_labels=labels[:-1]), "labels"),
      "nan": (dict(train_features=nan), "NaN"),
      "inf": (dict(test_features=inf), "NaN/inf"),
      "dims": (dict(test_features=test[:, :8]), "feature dims"),
      "k": (dict(k=95), "larger than class"),
      "k_all": (dict(k=400, same_class=False), "larger than"),
      "target": (dict(targets=[0, len(test)]), "out of range"),
      "no_class": (dict(test_labels=no_class, targets=[0]), "no training candidates"),
      "method": (dict(method="svm"), "unknown attribution method"),
      "chunk_size": (dict(chunk_size=0), "chunk_size must be positive"),
      "negative_label":
          (dict(train_labels=np.where(np.arange(len(labels)) == 5, -1, labels)), "non-negative"),
      "float_labels": (dict(test_labels=test_labels + 0.5), "integer class ids"),
  }, (train, labels, test, test_labels)


@pytest.mark.parametrize("case", [
    "labels", "nan", "inf", "dims", "k", "k_all", "target", "no_class", "method", "chunk_size",
    "negative_label", "float_labels"
])
def test_bad_input_is_a_clear_error(case, monkeypatch):
  cases, (train, labels, test, test_labels) = _bad_inputs()
  overrides, message = cases[case]
  args = dict(train_features=train, train_labels=labels, test_features=test,
              test_labels=test_labels, k=20)
  args.update(overrides)

  def no_solve(*a, **kw):
    raise AssertionError("solver started on bad input")

  monkeypatch.setattr(topk_lib, "_ChunkRunner", no_solve)
  with pytest.raises(attribute.AttributionError, match=message):
    attribute.topk(**args)


def test_solver_options_one_default_each_and_checked():
  # The config's defaults are the options' defaults (one source of truth each side).
  assert SolverOptions.from_config(config_lib.attribution_section()) == SolverOptions()
  assert hash(SolverOptions(C=1.0)) == hash(SolverOptions(C=1.0))  # a static jit argument
  for field, value in (("tol", -1e-5), ("C", 0.0), ("max_rows", 0), ("max_iter", float("nan")),
                       ("max_batch", 0)):
    with pytest.raises(ValueError, match=f"{field} must be positive"):
      SolverOptions(**{field: value})


def _write_features(workdir, train, labels, test, test_labels, index, test_offset=100):
  os.makedirs(os.path.join(workdir, "features"), exist_ok=True)
  np.savez(os.path.join(workdir, "features", "train.npz"), features=train, labels=labels,
           index=index, class_names=np.array(["a", "b", "c"]))
  np.savez(os.path.join(workdir, "features", "test.npz"), features=test, labels=test_labels,
           index=np.arange(len(test), dtype=np.int64) + test_offset, class_names=np.array([
               "a", "b", "c"
           ]))


def _own_features(config, workdir):
  """Records the hand-written features as those of `config` (`jaxattr.ownership`), with a
  stand-in encoder checkpoint file."""
  path = config.encoder.checkpoint or os.path.join(workdir, "encoder.bin")
  if not os.path.exists(path):
    with open(path, "wb") as f:
      f.write(b"stand-in encoder")
  config.encoder.checkpoint = path
  ownership.record(workdir, "features", ownership.features_fields(config, workdir))


def _datasets(labels, test_labels, train_index, size=4):
  # The images the features stand for (what the grids show), with the features' index values.
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (len(labels) + len(test_labels), size, size, 3), np.uint8)
  return (data_lib.Dataset(images[:len(labels)], labels, ["a", "b", "c"], train_index),
          data_lib.Dataset(images[len(labels):], test_labels, ["a", "b", "c"],
                           np.arange(len(test_labels), dtype=np.int64) + 100))


def test_run_writes_outputs_and_reports_nonconvergence(tmp_path):
  train, labels, test, test_labels, index = toy_features(seed=7)
  workdir = str(tmp_path)
  _write_features(workdir, train, labels, test, test_labels, index)
  train_ds, test_ds = _datasets(labels, test_labels, index)
  config = _config(methods="esvm,l2", k=16, targets="random", num_targets=10)
  config.viz.num_targets, config.viz.top = 3, 5
  _own_features(config, workdir)
  # Features of other images than the config's data: a clear error before any solve.
  with pytest.raises(attribute.AttributionError, match="another data config"):
    attribution.run(config, workdir, train=train_ds, test=_datasets(labels[:5], test_labels[:5],
                                                                    index[:5])[1])
  results = attribution.run(config, workdir, train=train_ds, test=test_ds)
  out = os.path.join(workdir, "attribution", "esvm")
  topk = np.load(os.path.join(out, "topk.npy"))
  targets = np.load(os.path.join(out, "targets.npy"))
  ref = np.load(os.path.join(out, "topk_reference.npy"))
  assert topk.shape == (10, 16) and topk.dtype == np.int64
  assert np.load(os.path.join(out, "scores.npy")).dtype == np.float32
  np.testing.assert_array_equal(
      targets, np.sort(np.random.default_rng(0).choice(len(test), 10, replace=False)))
  assert ref.shape == (100 + len(test), 16)
  np.testing.assert_array_equal(ref[targets + 100], topk)
  assert (np.delete(ref, targets + 100, axis=0) == 0).all()
  np.testing.assert_array_equal(topk, results["esvm"].indices)
  summary = json.load(open(os.path.join(out, "attribution.json")))
  assert summary["solver"]["nonconverged_count"] == 0
  assert os.path.exists(os.path.join(workdir, "attribution", "l2", "topk.npy"))
  assert not os.path.exists(os.path.join(out, "chunks"))
  # grid.png: the first 3 targets and their top 5 training images, upscaled 3x.
  from PIL import Image  # pylint: disable=g-import-not-at-top

  pos = {int(i): p for p, i in enumerate(index)}
  expected = viz.grid_array([test_ds.images[t] for t in targets[:3]],
                            [[train_ds.images[pos[int(i)]] for i in row[:5]] for row in topk[:3]])
  with Image.open(os.path.join(out, "grid.png")) as im:
    np.testing.assert_array_equal(np.asarray(im), expected.repeat(3, 0).repeat(3, 1))
  # One Newton iteration cannot converge: the run says which targets failed.
  config = _config(k=16, targets="list", target_list=(1, 2), max_iter=1)
  _own_features(config, workdir)
  with pytest.raises(RuntimeError, match="did not converge"):
    attribution.run(config, workdir, train=train_ds, test=test_ds)
  summary = json.load(open(os.path.join(out, "attribution.json")))
  assert summary["solver"]["nonconverged_targets"] == [1, 2]


def _config(**overrides):
  config = config_lib.base_config()
  # The defaults these tests assume: every target, ESVM only.
  config.attribution.update({"methods": "esvm", "targets": "all", **overrides})
  return config


CONFIG_FILE = """
from jaxattr import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.data.source = "npz:{data}"
  c.attribution.methods = "esvm"
  c.attribution.targets = "all"
  c.encoder.checkpoint = "{encoder}"
  return c
"""


def test_launcher_on_four_fake_devices_equals_one_device(tmp_path):
  train, labels, test, test_labels, _ = toy_features(seed=8)
  index = np.arange(len(labels), dtype=np.int64)  # the npz data source's index
  workdir = str(tmp_path / "run")
  _write_features(workdir, train, labels, test, test_labels, index, test_offset=0)
  rng = np.random.default_rng(0)
  np.savez(tmp_path / "data.npz", x_train=rng.integers(0, 256, (len(labels), 4, 4, 3), np.uint8),
           y_train=labels, x_test=rng.integers(0, 256, (len(test), 4, 4, 3),
                                               np.uint8), y_test=test_labels)
  (tmp_path / "encoder.bin").write_bytes(b"stand-in encoder")
  (tmp_path / "config.py").write_text(
      CONFIG_FILE.format(data=tmp_path / "data.npz", encoder=tmp_path / "encoder.bin"))
  config = {}
  exec(CONFIG_FILE.format(data=tmp_path / "data.npz", encoder=tmp_path / "encoder.bin"), config)
  _own_features(config["get_config"](), workdir)
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="4", JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  code = ("import jax; assert jax.device_count() == 4, jax.devices(); import runpy, sys; "
          "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
  proc = subprocess.run([
      sys.executable, "-c", code,
      os.path.join(REPO, "launch", "attribute.py"), f"--config={tmp_path / 'config.py'}",
      f"--workdir={workdir}", "--config.attribution.k=20", "--config.attribution.chunk_size=6"
  ], env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert os.path.exists(os.path.join(workdir, "attribution", "esvm", "grid.png"))
  four = np.load(os.path.join(workdir, "attribution", "esvm", "topk.npy"))
  four_scores = np.load(os.path.join(workdir, "attribution", "esvm", "scores.npy"))
  one = attribute.topk(train, labels, test, test_labels, k=20, train_index=index, chunk_size=8)
  np.testing.assert_allclose(four_scores, one.scores, rtol=1e-5, atol=1e-6)
  assert (four != one.indices).mean() < 0.02


def test_esvm_gram_paths_agree_and_few_rows_still_converge():
  rng = np.random.default_rng(9)
  x = np.abs(rng.normal(size=(260, 20)) + 1.0).astype(np.float32)
  t = (x[:3] + 0.1 * rng.normal(size=(3, 20))).astype(np.float32)
  # The Gram of row blocks (large candidate sets): its upper triangle is x x^T's.
  upper = np.asarray(esvm._upper_gram(x[:50], block=8))  # 7 blocks, the last one ragged
  np.testing.assert_allclose(np.triu(upper), np.triu(x[:50] @ x[:50].T), rtol=1e-5)
  _, shared, st1 = attribute.solve(t, x, SolverOptions(shared_gram_max=10_000))
  _, rows, st2 = attribute.solve(t, x, SolverOptions(shared_gram_max=0))
  np.testing.assert_allclose(np.asarray(shared), np.asarray(rows), rtol=1e-5, atol=1e-6)
  # Fewer exact-Newton rows than violators: approximate steps, but the same optimum.
  _, few, st3 = attribute.solve(t, x, SolverOptions(max_rows=8, max_iter=200))
  assert np.asarray(st3.converged).all() and (np.asarray(st3.num_violators) > 8).all()
  np.testing.assert_allclose(np.asarray(few), np.asarray(rows), rtol=1e-4, atol=1e-5)


def test_solver_batch_caps_split_groups_without_changing_results():
  solver = attribute.Solver()
  assert solver.on_cpu
  # CPU default: B r <= 2^14 and B n <= 2^20, rounded down to a power of two.
  assert solver._batch_cap(64, 5000) == 128 and solver._batch_cap(224, 5000) == 64
  assert solver._batch_cap(128, 1300) == 128 and solver._batch_cap(512, 100_000) == 16
  assert [len(p) for p in solver._split(np.arange(300), 128)] == [128, 128, 32, 12]
  assert attribute.Solver(SolverOptions(max_batch=100))._batch_cap(64, 5000) == 64
  # The same targets in batches of 16 and in one batch: the same optimum.
  rng = np.random.default_rng(4)
  x = np.abs(rng.normal(size=(300, 20)) + 1.0).astype(np.float32)
  t = (x[:40] + 0.3 * rng.normal(size=(40, 20))).astype(np.float32)
  results = []
  for cap in (16, 1024):
    s = attribute.Solver(SolverOptions(max_batch=cap, min_batch=16))
    w, it, step = s(t, s.prepare(x))
    assert (step <= s.options.tol).all()
    results.append(w)
  np.testing.assert_allclose(results[0], results[1], rtol=1e-4, atol=1e-5)
  # The device-resident state (weights, decision values carried from step to step, padded
  # batches writing nowhere) gives the optimum of the one-program solve, target by target.
  w_ref, _, st = attribute.solve(t, x, SolverOptions(tol=1e-6))
  assert np.asarray(st.converged).all()
  x_aug = np.c_[x, np.ones(len(x), np.float32)]
  np.testing.assert_allclose(results[0] @ x_aug.T,
                             np.asarray(w_ref) @ x_aug.T, rtol=1e-4, atol=2e-5)


def test_solver_packs_small_batches_into_padding_of_larger_active_sets():
  solver = attribute.Solver()  # min_batch 16; CPU caps: 128 targets at r = 128, 64 at r = 160
  active = np.arange(300)
  sizes = np.r_[np.full(5, 64),
                np.full(130, 128),
                np.full(60, 160),
                np.full(3, 160),
                np.full(100, 192),
                np.full(2, 224)]
  coarse = np.r_[np.zeros(5, bool),
                 np.ones(130, bool),
                 np.ones(60, bool),
                 np.zeros(3, bool),
                 np.zeros(100, bool),
                 np.ones(2, bool)]
  batches = solver._batches(active, sizes, coarse, 5000)
  got = np.concatenate([sel for _, _, sel in batches])
  np.testing.assert_array_equal(np.sort(got), active)  # every target once
  for r, kind, sel in batches:
    assert (sizes[sel] <= r).all()  # a larger active set holds the violators: still exact
    assert kind <= coarse[sel].all()  # accurate targets step accurately
    assert len(sel) <= solver._batch_size(len(sel)) <= 128
  # Unpacked: 64 x 5 | 128c x 128, 2 | 160 x 3 | 160c x 60 | 192 x 64, 32, 4 | 224c x 2, 9
  # calls. The small ones chain upwards (5 at r = 64 into the 2 at 128, which then step
  # accurately, those 7 into the 3 at 160, ... into the 2 at 224): one call at r = 224 for 16.
  assert [(r, kind, len(sel)) for r, kind, sel in batches] == [(128, True, 128), (160, True, 60),
                                                               (192, False, 64), (192, False, 32),
                                                               (224, False, 16)]
  # An accurate target never joins a full-sized coarse batch, even with room in it.
  sizes, coarse = np.r_[np.full(60, 160), np.full(3, 128)], np.r_[np.ones(60, bool),
                                                                  np.zeros(3, bool)]
  assert [
      (r, kind, len(sel)) for r, kind, sel in solver._batches(np.arange(63), sizes, coarse, 5000)
  ] == [(128, False, 3), (160, True, 60)]
  # ... but a coarse one joins an accurate batch's padding.
  assert [
      (r, kind, len(sel)) for r, kind, sel in solver._batches(np.arange(63), sizes, ~coarse, 5000)
  ] == [(160, False, 63)]


def test_pure_spd_solve_matches_lapack():
  # The LAPACK-free solve of multi-device CPU meshes (linalg.cholesky pure=True) against the LAPACK
  # one, on Woodbury-like systems I + c G G^T with identity rows where the active set is padded.

  rng = np.random.default_rng(3)
  g = rng.normal(size=(5, 12, 30)).astype(np.float32)
  mask = (np.arange(12)[None, :] < np.array([12, 9, 5, 1, 12])[:, None]).astype(np.float32)
  m = np.eye(12, dtype=np.float32) + 0.3 * np.einsum("brd,bsd->brs", g,
                                                     g) * (mask[:, :, None] * mask[:, None, :])
  b = rng.normal(size=(5, 12)).astype(np.float32) * mask
  ref = np.linalg.solve(m.astype(np.float64), b.astype(np.float64)[..., None])[..., 0]
  np.testing.assert_allclose(np.asarray(linalg.spd_solve(m, b, pure=True)), ref, rtol=1e-4,
                             atol=1e-5)
  np.testing.assert_allclose(np.asarray(linalg.spd_solve(m, b)), ref, rtol=1e-4, atol=1e-5)


def test_host_topk_matches_lax_top_k_with_ties():
  # CPU runs select the top k on the host; it must give exactly jax.lax.top_k's order, including
  # ties inside the top k and at its boundary (lower position first).
  import jax  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(4)
  ranked = np.round(rng.normal(size=(6, 300)), 1).astype(np.float32)  # many ties
  ranked[2, :] = 0.0  # a row that is all one tie
  ranked[3, 50:] = -np.inf  # padding
  ranked[4, :40:2] = -0.0  # ties with 0.0
  scores = rng.normal(size=ranked.shape).astype(np.float32)
  for k in (1, 7, 50):
    pos, top = attribute.host_topk(ranked, scores, k)
    ref = np.asarray(jax.lax.top_k(ranked, k)[1])
    np.testing.assert_array_equal(pos, ref)
    np.testing.assert_array_equal(top, np.take_along_axis(scores, ref, 1))
  # Enough rows for the thread pool's row blocks: the same as one block.
  many = np.concatenate([ranked] * 60)
  many_scores = np.concatenate([scores] * 60)
  pos, top = attribute.host_topk(many, many_scores, 7)
  np.testing.assert_array_equal(pos, np.asarray(jax.lax.top_k(many, 7)[1]))
  np.testing.assert_array_equal(pos, selection._host_topk_rows(many, many_scores, 7)[0])


def test_esvm_first_violators_match_nonzero():
  # esvm._first_violators gives what jnp.nonzero(size=r) gives, and every violator's slot.
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(5)
  flags = rng.random((5, 40)) < np.array([0.0, 0.1, 0.5, 0.9, 1.0])[:, None]
  idx, pos = esvm._first_violators(jnp.asarray(flags), 8)
  idx, pos = np.asarray(idx), np.asarray(pos)
  for row, f in enumerate(flags):
    first = np.flatnonzero(f)[:8]
    np.testing.assert_array_equal(idx[row, :len(first)], first)
    assert (idx[row] < 40).all()
    np.testing.assert_array_equal(pos[row][f], np.arange(f.sum()))


def test_padded_sizes_share_buckets_without_padding_past_the_largest_set():
  sizes = [5000, 5000, 1300, 1290, 1281, 1280, 1279, 732, 7]
  got = attribute.padded_sizes(sizes)
  assert got[5000] == 5000  # CIFAR-10 classes: no padding
  assert got[1300] == got[1290] == got[1281] == 1300  # one bucket (1281..1408), one shape
  assert got[1280] == got[1279] == 1280 and got[732] == 732 and got[7] == 7


def test_solver_traces_its_newton_step_once_per_shape(monkeypatch):
  # One active-set size (max_rows = 64; targets with more violators take CG steps) and
  # min_batch above the 40 targets: every step of both solves has one shape per kind (CG, Newton
  # in either form), so one trace each in all; a retrace (a new jitted function per call, a
  # changing argument structure) would fail here.
  rng = np.random.default_rng(7)
  x = np.abs(rng.normal(size=(300, 20)) + 1.0).astype(np.float32)
  t = (x[:40] + 0.3 * rng.normal(size=(40, 20))).astype(np.float32)
  chex.clear_trace_counter()
  monkeypatch.setattr(esvm, "newton_step", chex.assert_max_traces(esvm.newton_step, n=1))
  monkeypatch.setattr(esvm, "pcg_step", chex.assert_max_traces(esvm.pcg_step, n=1))
  solver = attribute.Solver(SolverOptions(max_rows=64, min_batch=64))
  first = solver(t, solver.prepare(x))
  second = solver(t, solver.prepare(x))
  assert 64 in solver._steps and set(solver._steps) <= {64, PCG}
  assert (first[2] <= solver.options.tol).all()
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a, b)

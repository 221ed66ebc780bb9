"""LDS: subsets, Spearman, bootstrap, score checks, and margins trained one call per wave."""

import os

import numpy as np
import pytest
from scipy import stats

from jaxattr import config, data, validate
from jaxattr.counterfactual import ensemble, lds


def test_subsets_are_seeded_and_sized():
  labels = np.repeat(np.arange(4), 25)
  a = lds.draw_subsets(labels, 6, 0.5, seed=3)
  b = lds.draw_subsets(labels, 6, 0.5, seed=3)
  np.testing.assert_array_equal(a, b)
  assert a.shape == (6, 100) and np.all(a.sum(1) == 50)
  assert not np.array_equal(a, lds.draw_subsets(labels, 6, 0.5, seed=4))
  assert len({r.tobytes() for r in a}) == 6


def test_subsets_refuse_bad_alpha_and_missing_classes():
  labels = np.array([0] * 50 + [1])
  for alpha in (0.0, 1.0, -0.2, 1.5):
    with pytest.raises(lds.LdsError, match="alpha"):
      lds.draw_subsets(labels, 3, alpha, 0)
  with pytest.raises(lds.LdsError, match=r"holds no image of class\(es\) \[1\]"):
    lds.draw_subsets(labels, 20, 0.1, 0)


def test_spearman_matches_scipy():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(30, 5)), rng.normal(size=(30, 5))
  b[:, 1] = a[:, 1] * 2 + 1  # perfectly monotone
  a[:3, 2] = a[0, 2]  # ties
  got = lds.spearman_rows(a, b)
  want = [stats.spearmanr(a[:, j], b[:, j]).statistic for j in range(5)]
  np.testing.assert_allclose(got, want, rtol=1e-12)
  assert np.isnan(lds.spearman_rows(np.ones((4, 1)), np.arange(4.0)[:, None]))[0]


def test_linear_datamodel_scores_high():
  """Margins that ARE a sum of per-example effects: the true effects score LDS ~1, noise ~0."""
  rng = np.random.default_rng(1)
  labels = np.repeat(np.arange(2), 100)
  masks = lds.draw_subsets(labels, 50, 0.5, 0)
  effects = rng.normal(size=(8, 200))
  margins = masks @ effects.T + 0.01 * rng.normal(size=(50, 8))
  assert lds.lds_per_target(effects, masks, margins).mean() > 0.99
  noise = lds.lds_per_target(rng.normal(size=(8, 200)), masks, margins).mean()
  assert abs(noise) < 0.3
  lo, hi = lds.bootstrap_interval(lds.lds_per_target(effects, masks, margins), 200, 0)
  assert 0.98 < lo <= hi <= 1.0


def test_score_checks_name_the_problem(tmp_path):
  with pytest.raises(lds.LdsError, match=r"shape \(3, 9\), expected \[3 targets, 10"):
    lds.check_scores("x", np.zeros((3, 9)), 3, 10)
  bad = np.zeros((3, 10))
  bad[1, 4] = np.nan
  with pytest.raises(lds.LdsError, match="NaN or infinite.*target row 1, training position 4"):
    lds.check_scores("x", bad, 3, 10)
  path = str(tmp_path / "s.npy")
  np.save(path, np.arange(50.0).reshape(5, 10))  # one row per test image
  train_index, test_index = np.arange(10) * 3, np.arange(5) + 100
  got = lds.external_scores("ext", path, np.array([1, 3]), train_index, test_index)
  np.testing.assert_array_equal(got, np.arange(50.0).reshape(5, 10)[[1, 3]])
  with pytest.raises(lds.LdsError, match="file not found"):
    lds.external_scores("ext", str(tmp_path / "none.npy"), np.array([1]), train_index, test_index)
  with pytest.raises(
      lds.LdsError, match=r"shape \(5, 10\), expected \[2 LDS targets or 5 test "
      r"images, 11 training images\]"):
    lds.external_scores("ext", path, np.array([1, 3]), np.arange(11), test_index)
  # Files numpy cannot read as numbers: one error naming the entry and the file.
  with open(path, "w") as f:
    f.write("not an array")
  with pytest.raises(lds.LdsError, match="entry 'ext=.*s.npy': the file is not a numpy file"):
    lds.external_scores("ext", path, np.array([1, 3]), train_index, test_index)
  np.save(path, np.array([None, "a"], dtype=object), allow_pickle=True)
  with pytest.raises(lds.LdsError, match="cannot read the file as a numpy array"):
    lds.external_scores("ext", path, np.array([1, 3]), train_index, test_index)
  np.savez(path[:-1] + "z", scores=np.ones((2, 10)))
  os.replace(path[:-1] + "z", path)  # an archive under an .npy name
  with pytest.raises(lds.LdsError, match="is an .npz archive, expected one array"):
    lds.external_scores("ext", path, np.array([1, 3]), train_index, test_index)
  # .npz with the index values the columns belong to: checked against the split.
  npz = str(tmp_path / "s.npz")
  np.savez(npz, scores=np.ones((2, 10)), train_index=train_index, target_index=[101, 103])
  assert lds.external_scores("ext", npz, np.array([1, 3]), train_index, test_index).shape == (2, 10)
  np.savez(npz, scores=np.ones((2, 10)), train_index=train_index[::-1])
  with pytest.raises(lds.LdsError, match="train_index .* first difference at column 0"):
    lds.external_scores("ext", npz, np.array([1, 3]), train_index, test_index)
  np.savez(npz, scores=np.ones((2, 10)), target_index=[101, 104])
  with pytest.raises(lds.LdsError, match="target_index does not match"):
    lds.external_scores("ext", npz, np.array([1, 3]), train_index, test_index)


def test_feature_scores_own_class_only():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(40, 6)).astype(np.float32)
  y = np.repeat(np.arange(2), 20)
  t, ty = x[[0, 25]] + 0.1, np.array([0, 1])
  for method in lds.FEATURE_METHODS:
    s = lds.feature_scores(method, x, y, t, ty)
    assert s.shape == (2, 40)
    assert np.all(s[0, 20:] == 0) and np.all(s[1, :20] == 0)
    if method != "esvm":  # the nearest image scores highest
      assert np.argmax(s[0]) == 0 and np.argmax(s[1]) == 25
    assert np.all(s >= 0) and np.all(s[0, :20].min() == 0) and np.all(s[1, 20:].min() == 0)


def test_validate_names_lds_fields():
  c = config.base_config()
  c.lds.methods = "esvm,bogus,trak"
  c.lds.alpha = 1.0
  c.lds.num_subsets = 1
  c.ensemble.batch_size = 1024
  train = data.load("digits", "train", size=8)
  found = "\n".join(validate.problems(c, train, None, stages=("lds",)))
  assert "lds.methods: entry 'bogus'" in found
  assert "lds.alpha=1.0" in found
  assert "lds.num_subsets=1" in found
  c.lds.alpha = 0.3
  c.lds.methods = "esvm,x=/nowhere.npy"
  found = "\n".join(validate.problems(c, train, None, stages=("lds",)))
  assert "smaller than one batch (ensemble.batch_size=1024)" in found
  assert "'x=/nowhere.npy'" in found
  c.trak.proj_dim = 0
  c.lds.methods = "trak"
  assert "trak.proj_dim=0" in "\n".join(validate.problems(c, stages=("lds",)))


class Counting:
  """A trainer whose train_and_predict calls are counted (one per wave)."""

  def __init__(self, trainer):
    self.inner, self.calls = trainer, []
    self.config, self.num_groups = trainer.config, trainer.num_groups

  def train_and_predict(self, *args, **kwargs):
    self.calls.append(len(args[1]))
    return self.inner.train_and_predict(*args, **kwargs)


def test_margins_one_call_per_wave_and_resume(tmp_path):
  train = data.load("digits", "train", size=16).subset(np.arange(256))
  test = data.load("digits", "test", size=16)
  cfg = config.trainer_section()
  cfg.update({
      "width": 0.0625,
      "epochs": 1,
      "batch_size": 32,
      "eval_batch_size": 16,
      "models_per_wave": 3,
      "log_every_s": 1e9
  })
  trainer = Counting(ensemble.Trainer(cfg, train))
  masks = lds.draw_subsets(train.labels, 4, 0.5, 0)  # 4 subsets x 2 models = 8: waves 3, 3, 2
  path = str(tmp_path / "margins.npz")
  images, labels = test.images[:10], test.labels[:10]
  full, info = lds.train_margins(trainer, masks, 2, 0, images, labels, path, "k")
  assert trainer.calls == [3, 3, 2] and info["trainer_calls"] == 3
  assert full.shape == (4, 10) and np.all(np.isfinite(full))
  # A run killed after its first wave resumes with the other two; same margins.
  table = lds.MarginTable(path, "k", 8, 10)
  table.done[3:] = False
  table.margins[3:] = 0
  table.save()
  trainer.calls.clear()
  again, _ = lds.train_margins(trainer, masks, 2, 0, images, labels, path, "k")
  assert trainer.calls == [3, 2]
  np.testing.assert_array_equal(again, full)
  # Another key (config, data, subsets or targets) never reuses the file.
  trainer.calls.clear()
  lds.train_margins(trainer, masks, 2, 0, images, labels, path, "other")
  assert trainer.calls == [3, 3, 2]

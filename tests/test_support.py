"""The support search (bisection), its outputs (summaries) and the stage (support) without training.

Trainers are stand-ins: a threshold rule per target, or 1-nearest-neighbour on pixels.
"""

import collections
import json
import math
import os
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest

from jaxattr import config as config_lib, data
from jaxattr.counterfactual import bisection, summaries, support
from tests.conftest import REPO, repo_env

NUM_CLASSES = 10
METRICS = bisection.METRICS


class ThresholdPredictor:
  """Fake trainer: a model predicts its target's true label iff fewer than theta[target] of the
  target's top images were removed (or relabelled).

  It checks every model's inputs as a real trainer would read them: the target's own ranking, a
  size within k, and flip -1 (or flip None) for removal, the target's flip class for mislabel.
  `wrong` models of every evaluated (target, size) predict a wrong class regardless (tests the
  majority rule). `fail_on` raises on that call number (simulates a crash).
  """

  def __init__(self, metric, prefixes, positions, true, theta, flip=None, wrong=0, fail_on=None):
    self.metric, self.prefixes, self.true, self.theta = metric, prefixes, true, theta
    self.row = {int(p): i for i, p in enumerate(positions)}
    self.flip, self.wrong, self.fail_on = flip, wrong, fail_on
    self.calls = []

  def __call__(self, seeds, prefixes, sizes, flip, eval_positions):
    if self.fail_on is not None and len(self.calls) == self.fail_on:
      raise RuntimeError("simulated crash")
    m, k = prefixes.shape
    for a in (seeds, prefixes, sizes, eval_positions):
      assert a.dtype == np.int64 and len(a) == m
    assert flip is None or (flip.dtype == np.int64 and flip.shape == (m,))
    self.calls.append({
        "seeds": seeds.copy(),
        "targets": eval_positions.copy(),
        "sizes": sizes.copy(),
        "flip": None if flip is None else flip.copy()
    })
    seen = collections.Counter()
    preds = []
    for i, pos in enumerate(eval_positions):
      t, size = self.row[int(pos)], int(sizes[i])
      np.testing.assert_array_equal(prefixes[i], self.prefixes[t, :k])
      assert 0 <= size <= k
      if self.metric == "removal":
        assert flip is None or flip[i] == bisection.REMOVE
      else:
        assert flip is not None and flip[i] == self.flip[t]
      seen[(t, size)] += 1
      right = size < self.theta[t] and seen[(t, size)] > self.wrong
      preds.append(self.true[t] if right else (self.true[t] + 1) % NUM_CLASSES)
    return np.array(preds)


def make_problem(num_targets=30, k=1280, seed=0):
  """(num_train, true labels, flip classes, rankings, test positions, test index values)."""
  rng = np.random.default_rng(seed)
  num_train = num_targets * k + 100
  true = rng.integers(0, NUM_CLASSES, num_targets)
  flip = (true + 1 + rng.integers(0, NUM_CLASSES - 1, num_targets)) % NUM_CLASSES
  prefixes = rng.permutation(num_train)[:num_targets * k].reshape(num_targets, k)
  positions = rng.permutation(200)[:num_targets]
  ids = positions + 1000  # test `index` values differ from positions on purpose
  return num_train, true, flip, prefixes, positions, ids


def problem(metric, prefixes, positions, ids, true, flip=None, state_path=None, fingerprint=""):
  return bisection.SearchProblem(metric, prefixes, positions, ids, true,
                                 flip if metric == "mislabel" else None, state_path, fingerprint)


def config(**kw):
  c = config_lib.support_section()
  c.update(kw)
  return c


def read_json(path):
  with open(path) as f:
    return json.load(f)


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def brute_force(theta, k=1280, step=10):
  """Smallest multiple of k / 2**budget at or above theta (the bisection's resolution), -1 above k.
  """
  if theta > k:
    return -1
  return max(step, math.ceil(theta / step) * step)


@pytest.mark.parametrize("metric", METRICS)
def test_bisection_matches_brute_force_oracle(metric):
  num_train, true, flip, prefixes, positions, ids = make_problem()
  rng = np.random.default_rng(1)
  theta = rng.integers(1, 1500, len(ids))
  theta[:3] = [1, 10, 1280]  # the edges: flips immediately, exactly at the grid, only at k
  pred = ThresholdPredictor(metric, prefixes, positions, true, theta, flip)
  res = bisection.support_search(pred, problem(metric, prefixes, positions, ids, true, flip),
                                 num_train, config())
  expect = [brute_force(int(t)) for t in theta]
  np.testing.assert_array_equal(res.support, expect)
  assert res.support[:3].tolist() == [10, 10, 1280]
  assert all(s % 10 == 0 for s in res.support if s >= 0)
  assert (res.support == -1).any() and (res.support > 0).any()
  # Same answers as the reference's sequential per-target loop.
  seq = [bisection.oracle_support(lambda m, t=t: m >= t, 1280, 7) for t in theta]
  np.testing.assert_array_equal(res.support, seq)
  # One trainer call per round, all targets together; cost bound per target.
  assert len(pred.calls) == 1 + 7
  assert len(pred.calls[0]["seeds"]) == len(ids) * 5
  per_target = [len(e) * 5 for e in res.evals]
  assert max(per_target) <= (1 + 7) * 5
  assert res.trainings == sum(per_target) == sum(len(c["seeds"]) for c in pred.calls)
  # Removal calls carry no flip classes at all; mislabel calls the target's on every model.
  assert all((c["flip"] is None) == (metric == "removal") for c in pred.calls)
  # Every evaluation is recorded with its k and correct count.
  for i, evals in enumerate(res.evals):
    assert evals[0]["k"] == 1280
    for e in evals:
      assert e["correct"] == (5 if e["k"] < theta[i] else 0)


@pytest.mark.parametrize("k,budget", [(7, 3), (100, 4), (37, 10), (64, 0), (1, 2)])
def test_other_k_and_budget_match_sequential_reference(k, budget):
  num_train, true, _, prefixes, positions, ids = make_problem(num_targets=12, k=k)
  theta = np.random.default_rng(k).integers(0, k + 3, len(ids))
  pred = ThresholdPredictor("removal", prefixes, positions, true, theta)
  res = bisection.support_search(pred, problem("removal", prefixes, positions, ids, true),
                                 num_train, config(k=k, search_budget=budget, num_tests=3))
  seq = [bisection.oracle_support(lambda m, t=t: m >= t, k, budget) for t in theta]
  np.testing.assert_array_equal(res.support, seq)
  assert len(pred.calls) <= 1 + budget


@pytest.mark.parametrize("wrong,num_tests,expect_all_flip", [(2, 5, False), (3, 5, True),
                                                             (2, 4, True), (1, 4, False)])
def test_majority_rule(wrong, num_tests, expect_all_flip):
  """Flipped = at most floor(num_tests / 2) models correct."""
  num_train, true, _, prefixes, positions, ids = make_problem(num_targets=8)
  theta = np.full(len(ids), 300)
  theta[0] = 5000  # would never flip on its own
  pred = ThresholdPredictor("removal", prefixes, positions, true, theta, wrong=wrong)
  res = bisection.support_search(pred, problem("removal", prefixes, positions, ids, true),
                                 num_train, config(num_tests=num_tests))
  if expect_all_flip:
    # Every evaluation flips, so the bisection walks down to the smallest mid.
    assert res.support.tolist() == [10] * len(ids)
  else:
    assert res.support.tolist() == [-1] + [300] * (len(ids) - 1)


def test_not_flipped_is_minus_one_after_one_round():
  num_train, true, _, prefixes, positions, ids = make_problem(num_targets=5)
  theta = np.array([2000, 2000, 100, 1281, 5])
  pred = ThresholdPredictor("removal", prefixes, positions, true, theta)
  res = bisection.support_search(pred, problem("removal", prefixes, positions, ids, true),
                                 num_train, config())
  assert res.support.tolist() == [-1, -1, 100, -1, 10]
  for i in (0, 1, 3):
    assert len(res.evals[i]) == 1 and res.evals[i][0]["correct"] == 5
  # Unflippable targets cost num_tests trainings and take no part in later rounds.
  assert all(len(c["seeds"]) == 2 * 5 for c in pred.calls[1:])


def test_mislabel_models_get_the_targets_ranking_size_and_flip_class():
  # ThresholdPredictor asserts, for every model, its target's ranking (k columns) and flip class;
  # here also that the sizes are the bisection's mids.
  num_train, true, flip, prefixes, positions, ids = make_problem(num_targets=6)
  theta = np.array([1, 50, 333, 640, 1279, 1300])
  pred = ThresholdPredictor("mislabel", prefixes, positions, true, theta, flip)
  res = bisection.support_search(pred, problem("mislabel", prefixes, positions, ids, true, flip),
                                 num_train, config())
  assert res.support.tolist() == [10, 50, 340, 640, 1280, -1]
  assert pred.calls[0]["sizes"].tolist() == [1280] * 6 * 5
  assert sorted(set(pred.calls[1]["sizes"].tolist())) == [640]


def test_bad_inputs_are_clear_errors():
  num_train, true, flip, prefixes, positions, ids = make_problem(num_targets=4, k=16)
  pred = ThresholdPredictor("mislabel", prefixes, positions, true, np.full(4, 5), flip)
  cfg = config(k=16)

  def search(p, n=num_train, c=cfg):
    return bisection.support_search(pred, p, n, c)

  with pytest.raises(bisection.SearchError, match="flip class"):
    search(bisection.SearchProblem("mislabel", prefixes, positions, ids, true))
  bad_flip = flip.copy()
  bad_flip[1] = -1  # would read as a removal in a joint call
  with pytest.raises(bisection.SearchError, match="flip classes must be >= 0"):
    search(problem("mislabel", prefixes, positions, ids, true, bad_flip))
  with pytest.raises(bisection.SearchError, match="unknown metric"):
    search(bisection.SearchProblem("swap", prefixes, positions, ids, true))
  with pytest.raises(bisection.SearchError, match=r"prefixes must be \[4 targets, >= k=16\]"):
    search(problem("removal", prefixes[:, :8], positions, ids, true))
  with pytest.raises(bisection.SearchError, match="ids"):
    search(problem("removal", prefixes, positions, ids[:3], true))
  with pytest.raises(bisection.SearchError, match=r"prefix positions must lie in \[0, 10\)"):
    search(problem("removal", prefixes, positions, ids, true), n=10)
  with pytest.raises(bisection.SearchError, match="num_tests >= 1"):
    search(problem("removal", prefixes, positions, ids, true), c=config(k=16, num_tests=0))
  with pytest.raises(bisection.SearchError, match=r"predictor returned shape \(3,\)"):
    bisection.support_search(lambda *a: np.zeros(3),
                             problem("removal", prefixes, positions, ids, true), num_train, cfg)


def test_seeds_differ_per_round_and_target_and_are_deterministic():
  num_train, true, _, prefixes, positions, ids = make_problem(num_targets=4)
  theta = np.full(len(ids), 200)
  runs = []
  for _ in range(2):
    pred = ThresholdPredictor("removal", prefixes, positions, true, theta)
    bisection.support_search(pred, problem("removal", prefixes, positions, ids, true), num_train,
                             config(search_budget=3))
    runs.append(np.concatenate([c["seeds"] for c in pred.calls]))
  np.testing.assert_array_equal(runs[0], runs[1])
  assert len(np.unique(runs[0])) == len(runs[0])  # no two models share a seed
  other = bisection.model_seeds(1, 0, ids[0], 5)
  assert not np.array_equal(other, bisection.model_seeds(0, 0, ids[0], 5))
  assert runs[0].max() < 2**31
  # Pinned: a refactor must not change which models a search trains.
  assert bisection.model_seeds(0, 0, 1000, 3).tolist() == [
      int(s) & 0x7FFFFFFF for s in np.random.SeedSequence([0, 0, 1000]).generate_state(3)
  ]


def test_resume_after_kill_equals_uninterrupted(tmp_path):
  num_train, true, flip, prefixes, positions, ids = make_problem(num_targets=10)
  theta = np.random.default_rng(3).integers(1, 1400, len(ids))

  def fake(fail_on=None):
    return ThresholdPredictor("mislabel", prefixes, positions, true, theta, flip, fail_on=fail_on)

  def search(predict, path, fingerprint="x"):
    p = problem("mislabel", prefixes, positions, ids, true, flip, str(tmp_path / path), fingerprint)
    return bisection.support_search(predict, p, num_train, config())

  full = search(fake(), "a.json")
  for crash_round in (0, 3, 7):
    crashing = fake(fail_on=crash_round)
    with pytest.raises(RuntimeError, match="simulated crash"):
      search(crashing, f"b{crash_round}.json")
    assert len(crashing.calls) == crash_round
    again = fake()
    resumed = search(again, f"b{crash_round}.json")
    assert len(again.calls) == 8 - crash_round  # only the unfinished rounds are retrained
    np.testing.assert_array_equal(resumed.support, full.support)
    assert resumed.evals == full.evals
    assert [r["models"] for r in resumed.rounds] == [r["models"] for r in full.rounds]
  # A state written for other inputs is not reused.
  again = fake()
  search(again, "a.json", fingerprint="other")
  assert len(again.calls) == 8


def test_joint_searches_resumed_at_different_rounds_equal_separate_runs(tmp_path):
  num_train, true, flip, prefixes, positions, ids = make_problem(num_targets=8)
  theta = np.random.default_rng(4).integers(1, 1400, len(ids))

  def make(metric, rows, name):
    return problem(metric, prefixes[rows], positions[rows], ids[rows], true[rows], flip[rows],
                   str(tmp_path / name), "fp")

  def fake(metric):
    return ThresholdPredictor(metric, prefixes, positions, true, theta, flip)

  a_rows, b_rows = np.arange(5), np.arange(3, 8)
  ref_a = bisection.support_search_many(fake("removal"), [make("removal", a_rows, "ra")], num_train,
                                        config())[0]
  ref_b = bisection.support_search_many(fake("mislabel"), [make("mislabel", b_rows, "rb")],
                                        num_train, config())[0]
  crashing = fake("removal")
  crashing.fail_on = 2
  with pytest.raises(RuntimeError):
    bisection.support_search_many(crashing, [make("removal", a_rows, "a")], num_train, config())

  calls = []

  def both(seeds, prefixes_, sizes, flip_, eval_positions):
    # One call mixes the searches: flip -1 marks a removal model, a class a mislabel one.
    calls.append(len(seeds))
    assert flip_ is not None
    out = np.zeros(len(seeds), np.int64)
    for mask, metric in ((flip_ == bisection.REMOVE, "removal"), (flip_
                                                                  != bisection.REMOVE, "mislabel")):
      if mask.any():
        out[mask] = fake(metric)(seeds[mask], prefixes_[mask], sizes[mask], flip_[mask],
                                 eval_positions[mask])
    return out

  res_a, res_b = bisection.support_search_many(both, [
      make("removal", a_rows, "a"), make("mislabel", b_rows, "b")
  ], num_train, config())
  assert len(calls) == 8  # rounds 0-1 for b alone, then 2-7 together
  assert calls[0] == len(b_rows) * 5  # round 0: every target of b, none of a
  np.testing.assert_array_equal(res_a.support, ref_a.support)
  np.testing.assert_array_equal(res_b.support, ref_b.support)
  assert res_a.evals == ref_a.evals and res_b.evals == ref_b.evals


def test_exhaustive_mode_one_round():
  num_train, true, _, prefixes, positions, ids = make_problem(num_targets=7)
  theta = np.array([1, 15, 40, 41, 700, 1280, 1281])
  pred = ThresholdPredictor("removal", prefixes, positions, true, theta)
  cfg = config(exhaustive=True, num_tests=3)
  res = bisection.support_search(pred, problem("removal", prefixes, positions, ids, true),
                                 num_train, cfg)
  assert len(pred.calls) == 1
  grid = bisection.grid_sizes(cfg)
  assert grid.tolist() == [10, 20, 40, 80, 160, 320, 640, 1280]
  assert len(pred.calls[0]["seeds"]) == len(ids) * len(grid) * 3
  assert len(np.unique(pred.calls[0]["seeds"])) == len(pred.calls[0]["seeds"])
  assert res.support.tolist() == [10, 20, 40, 80, 1280, 1280, -1]
  assert all(len(e) == len(grid) for e in res.evals)
  assert bisection.grid_sizes(config(k=100, grid=(10, 50, 200))).tolist() == [10, 50, 100]


def test_support_stats_treat_minus_one_as_infinity():
  s = summaries.support_stats(np.array([10, 20, -1, 40, -1]), 1280)
  assert s["median_support"] == 40 and s["not_flipped"] == 2
  assert s["median_support_flipped_only"] == 20
  assert s["fraction_flipped"]["10"] == pytest.approx(0.2)
  assert s["fraction_flipped"]["40"] == pytest.approx(0.6)
  assert s["fraction_flipped"]["1280"] == pytest.approx(0.6)
  assert summaries.support_stats(np.array([10, -1, -1]), 1280)["median_support"] is None
  assert list(summaries.support_stats(np.array([5]),
                                      100)["fraction_flipped"]) == ["10", "20", "40", "80", "100"]
  xs, ys = summaries.cumulative_curve(np.array([10, -1, 3, 100]), 100)
  assert ys[xs == 2][0] == 0 and ys[xs == 3][0] == 0.25 and ys[-1] == 0.75


def _dataset(n, labels, index, split):
  images = np.random.default_rng(n).integers(0, 255, (n, 8, 8, 3), dtype=np.uint8)
  return data.Dataset(images=images, labels=labels.astype(np.int32), class_names=[
      str(c) for c in range(NUM_CLASSES)
  ], index=index.astype(np.int64), source="synthetic", split=split)


def test_run_writes_outputs_resumes_skips_and_reads_reference_layout(tmp_path, monkeypatch):
  # Synthetic top-k files stand for an attribution stage: no ownership record to check.
  monkeypatch.setattr(support, "require_attribution", lambda *a: None)
  k, n_train, n_test = 64, 400, 50
  rng = np.random.default_rng(0)
  train = _dataset(n_train, np.zeros(n_train), np.arange(n_train) + 7, "train")
  test = _dataset(n_test, rng.integers(1, 7, n_test), np.arange(n_test), "test")
  targets = np.array([3, 11, 25, 40])
  theta = {3: 5, 11: 30, 25: 100, 40: 64}  # by test index; 100 > k never flips
  wd = str(tmp_path)
  topk_esvm = np.stack([rng.permutation(train.index)[:k] for _ in targets])
  os.makedirs(f"{wd}/attribution/esvm")
  np.save(f"{wd}/attribution/esvm/topk.npy", topk_esvm)
  np.save(f"{wd}/attribution/esvm/targets.npy", targets)
  # A reference-layout matrix for another method: row = test index, index 0 is a legal entry.
  ref = np.zeros((n_test, 100), np.int64)
  ref[targets] = np.stack([rng.permutation(train.index)[:100] for _ in targets])
  row = ref[targets[0]]
  ref[targets[0]] = np.concatenate([[7], row[row != 7][:99]])  # train index 7 = position 0
  np.save(f"{wd}/ref_topk.npy", ref)

  calls = []

  def predictor(seeds, prefixes, sizes, flip, eval_positions):
    calls.append(len(seeds))
    out = []
    for m, pos in enumerate(eval_positions):
      t = int(test.index[pos])
      out.append(test.labels[pos] if sizes[m] < theta[t] else (test.labels[pos] + 1) % NUM_CLASSES)
    return np.array(out)

  flip_calls = []

  def flip_fn(images, labels):
    flip_calls.append(len(images))
    return (labels + 3) % NUM_CLASSES

  full = config_lib.base_config()
  cfg = full.support
  cfg.update({
      "k": k,
      "search_budget": 3,
      "num_tests": 3,
      "methods": f"esvm,ref={wd}/ref_topk.npy",
      "targets": ",".join(map(str, targets))
  })

  def run(workdir):
    return support.run(full, workdir, train=train, test=test, predictor=predictor, flip_fn=flip_fn)

  out = run(wd)
  assert flip_calls == [len(targets)]  # flip classes once for all methods
  assert set(out) == {"removal", "mislabel"} and set(out["removal"]) == {"esvm", "ref"}
  for metric in METRICS:
    for method in ("esvm", "ref"):
      d = f"{wd}/support/{metric}/{method}"
      rows = read_jsonl(f"{d}/results.jsonl")
      assert [r["target"] for r in rows] == targets.tolist()
      # theta 5 -> smallest mid of a 64/8 grid; 100 > k -> -1; theta = k -> k.
      assert [r["support"] for r in rows] == [8, 32, -1, 64]
      assert rows[0]["evaluated"][0] == {
          "k": 64,
          "correct": 0,
          "num_tests": 3,
          "flipped": True,
          "round": 0
      }
      if metric == "mislabel":
        assert [r["flip_class"] for r in rows] == [
            int((test.labels[t] + 3) % NUM_CLASSES) for t in targets
        ]
      summary = read_json(f"{d}/summary.json")
      assert summary == out[metric][method]
      assert summary["not_flipped"] == 1 and summary["median_support"] == 48
      assert summary["trainings_per_target_max"] <= (1 + 3) * 3
      assert summary["trainings"] == sum(r["models"] for r in summary["rounds"])
      assert os.path.getsize(f"{d}/curve.png") > 1000
      assert read_json(f"{d}/state.json")["next_round"] == 1 + 3
      assert summaries.load_results(d)[0].tolist() == [8, 32, -1, 64]
    assert os.path.getsize(f"{wd}/support/{metric}/curves.png") > 1000
  assert os.path.exists(f"{wd}/support/flip_classes.npz")
  # Joint: 2 metrics x 2 methods share each round's call: 1 + budget calls, 4 x 4 x 3 at first.
  assert len(calls) == 1 + 3 and calls[0] == 2 * 2 * len(targets) * 3
  n_calls = len(calls)
  # Same config again: every (metric, method) is skipped, nothing retrained.
  run(wd)
  assert len(calls) == n_calls and flip_calls == [len(targets)]
  # One search after the other gives identical results with 4 times the calls.
  separate = str(tmp_path / "separate")
  os.makedirs(separate)
  os.symlink(f"{wd}/attribution", f"{separate}/attribution")
  cfg.joint = False
  calls.clear()
  run(separate)
  assert len(calls) == 4 * (1 + 3)
  for metric in METRICS:
    for method in ("esvm", "ref"):
      name = f"support/{metric}/{method}/results.jsonl"
      assert (tmp_path / name).read_text() == (tmp_path / "separate" / name).read_text()
  # A reference-layout matrix without explicit targets is refused with a clear message.
  cfg.targets = ""
  with pytest.raises(bisection.SearchError, match="explicit targets"):
    run(wd)
  cfg.methods = "missing"
  with pytest.raises(bisection.SearchError, match="attribution/missing/topk.npy"):
    run(wd)
  cfg.methods = ""
  with pytest.raises(bisection.SearchError, match="support.methods is empty"):
    run(wd)
  cfg.methods, cfg.metrics = "esvm", "swap"
  with pytest.raises(bisection.SearchError, match="unknown metric 'swap'"):
    run(wd)


class FakeTrainer:
  """Stand-in `ensemble.Trainer`: 'training' = 1-nearest-neighbour on pixels over the model's
  counterfactual training set (its prefix removed, or relabelled to flip[m])."""

  def __init__(self, config, train):
    self.config, self.train, self.calls = config, train, []
    print("stand-in Trainer built", flush=True)

  def counterfactual(self, prefixes, sizes, flip):
    """keep bool [M, N] and labels int32 [M, N]: what the API's index arguments mean."""
    m, n = len(prefixes), len(self.train)
    keep = np.ones((m, n), bool)
    labels = np.tile(self.train.labels, (m, 1))
    for i in range(m):
      chosen = prefixes[i, :sizes[i]]
      if flip is None or flip[i] < 0:
        keep[i, chosen] = False
      else:
        labels[i, chosen] = flip[i]
    return keep, labels

  def distances(self, eval_images):
    a = eval_images.reshape(len(eval_images), -1).astype(np.float32)
    b = self.train.images.reshape(len(self.train), -1).astype(np.float32)
    return (a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None]  # [E, N]

  def train_and_predict(self, eval_images, seeds, prefixes=None, sizes=None, flip=None):
    self.calls.append({
        "eval_images": eval_images,
        "seeds": seeds,
        "prefixes": prefixes,
        "sizes": sizes,
        "flip": flip
    })
    m = len(seeds)
    if prefixes is None:
      prefixes, sizes = np.zeros((m, 0), np.int64), np.zeros(m, np.int64)
    keep, labels = self.counterfactual(prefixes, sizes, flip)
    d = self.distances(eval_images)
    logits = np.zeros((m, len(eval_images), self.train.num_classes), np.float32)
    for i in range(m):
      nearest = np.where(keep[i][None], d, np.inf).argmin(1)
      logits[i, np.arange(len(eval_images)), labels[i][nearest]] = 1.0
    return logits, {}


def _flip_classes(trainer, eval_images, eval_labels, num_models, seed):
  """Stand-in `flip.flip_classes`: class histogram of the 5 nearest images, top wrong class."""
  near = np.argsort(trainer.distances(eval_images), 1)[:, :5]
  probs = np.stack([
      np.bincount(trainer.train.labels[r], minlength=trainer.train.num_classes) / 5 for r in near
  ])
  masked = probs.copy()
  masked[np.arange(len(probs)), eval_labels] = -1
  return probs, masked.argmax(1).astype(np.int32)


def install_stand_in_trainer():
  """Replaces jaxattr.counterfactual.{ensemble, flip} by the stand-ins (before support.run)."""
  import jaxattr.counterfactual as cf
  modules = {
      "ensemble": types.SimpleNamespace(Trainer=FakeTrainer),
      "flip": types.SimpleNamespace(flip_classes=_flip_classes)
  }
  for name, module in modules.items():
    sys.modules[f"jaxattr.counterfactual.{name}"] = module
    setattr(cf, name, module)
  # The tests' top-k files are written by hand: no attribution stage's record to check.
  support.require_attribution = lambda *a: None


def test_trainer_predictor_picks_each_models_own_target():
  train = _dataset(5, np.arange(5) % NUM_CLASSES, np.arange(5), "train")
  trainer = FakeTrainer(None, train)

  def train_and_predict(eval_images, seeds, prefixes=None, sizes=None, flip=None):
    trainer.calls.append({
        "eval_images": eval_images,
        "prefixes": prefixes,
        "sizes": sizes,
        "flip": flip
    })
    logits = np.zeros((len(seeds), len(eval_images), NUM_CLASSES), np.float32)
    for i in range(len(seeds)):
      for j in range(len(eval_images)):
        logits[i, j, (int(eval_images[j, 0, 0, 0]) + i) % NUM_CLASSES] = 1.0
    return logits, {}

  trainer.train_and_predict = train_and_predict
  test_images = np.zeros((6, 4, 4, 3), np.uint8)
  test_images[:, 0, 0, 0] = np.arange(6)
  predict = support.trainer_predictor(trainer, test_images)
  eval_pos = np.array([5, 2, 5, 0])
  prefixes = np.arange(8).reshape(4, 2)
  sizes, flip = np.array([1, 2, 0, 1]), np.array([3, -1, 3, 4])
  out = predict(np.arange(4), prefixes, sizes, flip, eval_pos)
  (call,) = trainer.calls
  assert len(call["eval_images"]) == 3  # each distinct target image evaluated once
  np.testing.assert_array_equal(out, (eval_pos + np.arange(4)) % NUM_CLASSES)
  # The index arguments reach the trainer as they are: no [M, N] masks in between.
  np.testing.assert_array_equal(call["prefixes"], prefixes)
  np.testing.assert_array_equal(call["sizes"], sizes)
  np.testing.assert_array_equal(call["flip"], flip)
  predict(np.arange(4), prefixes, sizes, None, eval_pos)
  assert trainer.calls[-1]["flip"] is None
  # What the indices mean: removal drops the prefix, a flip class relabels it in place.
  keep, labels = FakeTrainer(None, train).counterfactual(np.array([[4, 1, 2]] * 2), np.array([2,
                                                                                              2]),
                                                         np.array([-1, 7]))
  assert keep[0].tolist() == [True, False, True, True, False] and keep[1].all()
  assert labels[1].tolist() == [0, 7, 2, 3, 7] and labels[0].tolist() == [0, 1, 2, 3, 4]


def test_launcher_end_to_end_with_a_stand_in_trainer(tmp_path):
  """launch/support.py on digits with the default trainer adapter and a 1-NN stand-in trainer,
  with both documented ways of naming methods: a workdir method and a reference-layout file."""
  train = data.load("digits", "train", size=16)
  test = data.load("digits", "test", size=16)
  targets = test.index[:6]
  # l2-in-pixel-space attribution restricted to the target's class, best first.
  a = test.images[:6].reshape(6, -1).astype(np.float32)
  b = train.images.reshape(len(train), -1).astype(np.float32)
  d = ((a[:, None] - b[None])**2).sum(-1)
  d[test.labels[:6, None] != train.labels[None]] = np.inf
  topk = train.index[np.argsort(d, 1)[:, :64]]
  os.makedirs(tmp_path / "attribution" / "l2")
  np.save(tmp_path / "attribution" / "l2" / "topk.npy", topk)
  np.save(tmp_path / "attribution" / "l2" / "targets.npy", targets)
  ref = np.zeros((len(test), 64), np.int64)
  ref[targets] = topk[:, ::-1]  # the same images, worst first
  np.save(tmp_path / "ref.npy", ref)

  code = textwrap.dedent(f"""
      import runpy, sys
      from tests import test_support
      test_support.install_stand_in_trainer()
      sys.argv = ["launch/support.py", "--config=configs/digits.py", "--workdir={tmp_path}",
                  "--compilation_cache=",
                  "--config.support.methods=l2,ref={tmp_path}/ref.npy",
                  "--config.support.targets={','.join(map(str, targets))}",
                  "--config.support.k=64", "--config.support.search_budget=3",
                  "--config.support.num_targets=0"]
      runpy.run_path("launch/support.py", run_name="__main__")
      """)
  out = subprocess.run([sys.executable, "-c", code], env=repo_env(), cwd=REPO, check=False,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.count("stand-in Trainer built") == 1  # one trainer for the whole stage
  supports = {}
  for metric in METRICS:
    for method in ("l2", "ref"):
      d = tmp_path / "support" / metric / method
      rows = read_jsonl(d / "results.jsonl")
      assert [r["target"] for r in rows] == targets.tolist()
      supports[metric, method] = [r["support"] for r in rows]
      assert (d / "summary.json").exists() and (d / "curve.png").exists()
    assert (tmp_path / "support" / metric / "curves.png").exists()
  # 1-NN flips once its same-class neighbours are gone or relabelled; both must happen for some
  # target within 64 images, and the answers lie on the 64 / 2**3 grid. Removing the nearest
  # images first flips no later than removing the farthest first.
  for s in supports.values():
    assert all(x == -1 or x % 8 == 0 for x in s)
  assert any(x > 0 for x in supports["removal", "l2"] + supports["mislabel", "l2"])
  inf = 10**9
  assert all((x if x >= 0 else inf) <= (y if y >= 0 else inf)
             for x, y in zip(supports["removal", "l2"], supports["removal", "ref"]))
  assert (tmp_path / "support" / "flip_classes.npz").exists()


def test_parse_targets_positions_and_method_names(tmp_path):
  assert support.parse_targets("") is None
  assert support.parse_targets("3, 17,42").tolist() == [3, 17, 42]
  np.save(tmp_path / "t.npy", np.array([[5], [0]]))
  assert support.parse_targets(str(tmp_path / "t.npy")).tolist() == [5, 0]
  (tmp_path / "t.txt").write_text("9\n0,4\n")
  assert support.parse_targets(str(tmp_path / "t.txt")).tolist() == [9, 0, 4]
  with pytest.raises(bisection.SearchError, match="neither a file"):
    support.parse_targets("nope.txt")
  index = np.array([10, 0, 7, 3])
  assert support.positions_of(index, np.array([[0, 3], [10, 7]]), "x").tolist() == [[1, 3], [0, 2]]
  with pytest.raises(bisection.SearchError, match=r"train split: index values \[5\]"):
    support.positions_of(index, np.array([3, 5]), "train split")
  # `--config.support.methods=esvm,trak=PATH` is one string; sequences of such strings also work.
  assert config_lib.names("esvm, trak=/p/t.npy,") == ("esvm", "trak=/p/t.npy")
  assert config_lib.names(("esvm,l2", "trak=/p/t.npy")) == ("esvm", "l2", "trak=/p/t.npy")

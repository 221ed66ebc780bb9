"""The library entry points check their inputs and results ("a workdir you can trust"): the ESVM
solver (`esvm_scores`, `solve`, `SolverOptions`), `topk` (inputs, non-finite scores,
non-convergence, the chunk-resume key), the counterfactual `Trainer` (config and arguments) and
the ESVM benchmark's feature cache. Every error is a ValueError naming what to change.
"""

import types

import jax
import ml_collections
import numpy as np
import pytest

from jaxattr import attribute, config as config_lib, data as data_lib
from jaxattr.attribute import esvm, ranking
from jaxattr.attribute.options import AttributionError, NotConvergedError, SolverOptions
from jaxattr.counterfactual import ensemble


def toy(seed=0, n_per_class=(70, 60), n_test=10, d=8):
  """(train, labels, test, test_labels): two Gaussian classes of float32 features."""
  rng = np.random.default_rng(seed)
  labels = np.concatenate([np.full(n, c) for c, n in enumerate(n_per_class)]).astype(np.int32)
  centers = rng.normal(size=(len(n_per_class), d)) * 2.0
  train = (centers[labels] + rng.normal(size=(len(labels), d))).astype(np.float32)
  test_labels = (np.arange(n_test) % len(n_per_class)).astype(np.int32)
  test = (centers[test_labels] + rng.normal(size=(n_test, d))).astype(np.float32)
  return train, labels, test, test_labels


# --- esvm_scores / solve: inputs --------------------------------------------------------------


def _esvm_cases():
  train, _, test, _ = toy()
  nan, inf = train.copy(), test.copy()
  nan[3, 1] = np.nan
  inf[2, 0] = np.inf
  return {
      # Before: a [T, d] x [N] product that either failed with a TypeError or, for d = 1,
      # broadcast into a constant matrix.
      "candidates_1d": ((test, train[:, 0]), "candidates must be a 2-D float array"),
      "targets_1d": ((test[0], train), "targets must be a 2-D float array"),
      "int_targets": ((test.astype(np.int64), train), r"targets .* got shape \(10, 8\) int64"),
      "dims": ((test, train[:, :4]), "targets have 8 feature columns but candidates 4"),
      "no_candidates": ((test, train[:0]), "at least one row"),
      "nan": ((test, nan), r"candidates .* NaN/inf .* in 1 of 130 rows .*\[3\]"),
      "inf": ((inf, train), r"targets .* NaN/inf .* \[2\]"),
      "beyond_float32": ((test.astype(np.float64) * 1e38, train), "beyond float32"),
  }


@pytest.mark.parametrize("case", sorted(_esvm_cases()))
def test_esvm_scores_rejects_bad_inputs(case):
  args, message = _esvm_cases()[case]
  with pytest.raises(AttributionError, match=message):
    esvm.esvm_scores(*args)


def test_esvm_solve_and_options_argument_are_checked():
  train, _, test, _ = toy()
  with pytest.raises(AttributionError, match="esvm.solve: candidates must be a 2-D"):
    esvm.solve(test, train[:, 0])
  with pytest.raises(AttributionError, match=r"valid must be bool \[130\]"):
    esvm.solve(test, train, SolverOptions(), valid=np.ones(129, bool))
  with pytest.raises(AttributionError, match="options must be a SolverOptions"):
    esvm.esvm_scores(test, train, {"C": 0.1})
  solver = attribute.Solver()
  with pytest.raises(AttributionError, match=r"Solver.prepare: candidates must be a 2-D float"):
    solver.prepare(train[:, 0])
  with pytest.raises(AttributionError,
                     match=r"Solver: targets must be a 2-D float array \[T, d=8\]"):
    solver(test[:, :4], solver.prepare(train))


def test_esvm_scores_under_jit_checks_shapes_only():
  # Inside a caller's jit the arrays are tracers: shapes and dtypes are still checked, values
  # (NaN inputs, convergence) are not, so the function stays traceable.
  train, _, test, _ = toy()
  with pytest.raises(AttributionError, match="candidates must be a 2-D"):
    jax.jit(esvm.esvm_scores)(test, train[:, 0])
  fn = jax.jit(lambda t, x: esvm.esvm_scores(t, x, SolverOptions(max_iter=1)))
  assert fn(test, train).shape == (10, 130)
  # Concrete jax arrays are checked like numpy ones.
  with pytest.raises(AttributionError, match="NaN/inf"):
    esvm.esvm_scores(jax.numpy.asarray(test), jax.numpy.full((5, 8), np.nan))


# --- esvm_scores / topk: results --------------------------------------------------------------


def test_esvm_scores_nonfinite_result_raises_naming_C():
  # Before: C = 1e12 returned all-NaN decision values without a word.
  train, _, test, _ = toy()
  with pytest.raises(AttributionError, match=r"non-finite .* 10 of 10 targets .*attribution\.C"):
    esvm.esvm_scores(test, train, SolverOptions(C=1e12, fallback64=False))
  # Not even allow_nonconverged lets NaN through.
  with pytest.raises(AttributionError, match="non-finite"):
    esvm.esvm_scores(test, train, SolverOptions(C=1e12, fallback64=False), allow_nonconverged=True)
  # With the float64 fallback (the default) float32's NaN never shows: converged or raised.
  try:
    scores = esvm.esvm_scores(test, train, SolverOptions(C=1e12))
    assert np.isfinite(np.asarray(scores)).all()
  except NotConvergedError:
    pass


def test_esvm_scores_nonconverged_raises_unless_allowed():
  train, _, test, _ = toy()
  options = SolverOptions(max_iter=1)
  with pytest.raises(NotConvergedError, match=r"10 of 10 targets did not converge .*rows \[0, 1"):
    esvm.esvm_scores(test, train, options)
  with pytest.raises(NotConvergedError) as err:  # return_stats alone does not allow them
    esvm.esvm_scores(test, train, options, return_stats=True)
  for setting in ("attribution.max_iter=1", "attribution.max_rows", "attribution.tol",
                  "allow_nonconverged=True"):
    assert setting in str(err.value)
  scores, stats = esvm.esvm_scores(test, train, options, return_stats=True, allow_nonconverged=True)
  assert scores.shape == (10, 130) and not np.asarray(stats.converged).any()


def test_topk_nonfinite_scores_raise_before_the_chunk_is_saved(tmp_path):
  # Before: NaN scores and arbitrary indices came back as a ranking.
  train, labels, test, test_labels = toy()
  chunk_dir = tmp_path / "chunks"
  with pytest.raises(AttributionError) as err:
    attribute.topk(train, labels, test, test_labels, k=5, targets=[1, 3], options=SolverOptions(
        C=1e12, fallback64=False), chunk_dir=str(chunk_dir))
  message = str(err.value)
  assert "topk[esvm]" in message and "non-finite" in message
  assert "2 of the 2 targets of chunk 1/1" in message and "[1, 3]" in message
  assert "attribution.C=1e+12" in message and "lower attribution.C" in message
  assert not list(chunk_dir.glob("chunk_*.npz"))


def test_topk_nonconverged_raises_unless_allowed():
  # Before: only attribution.run raised; other callers got unconverged rankings silently.
  train, labels, test, test_labels = toy()
  kw = dict(k=5, targets=[1, 2], options=SolverOptions(max_iter=1))
  with pytest.raises(NotConvergedError) as err:
    attribute.topk(train, labels, test, test_labels, **kw)
  message = str(err.value)
  assert isinstance(err.value, AttributionError) and isinstance(err.value, ValueError)
  assert "2 of 2 targets did not converge" in message and "[1, 2]" in message
  for setting in ("attribution.max_iter=1", "attribution.max_rows", "attribution.tol",
                  "allow_nonconverged=True"):
    assert setting in message
  res = attribute.topk(train, labels, test, test_labels, allow_nonconverged=True, **kw)
  np.testing.assert_array_equal(res.nonconverged, [1, 2])


# --- SolverOptions ----------------------------------------------------------------------------


@pytest.mark.parametrize("field, value, message", [
    ("C", float("inf"), r"attribution\.C must be positive and finite"),
    ("C", -1.0, r"attribution\.C must be positive and finite"),
    ("tol", 0.0, r"attribution\.tol must be positive and finite"),
    ("max_iter", 2.5, r"attribution\.max_iter must be an integer"),
    ("max_rows", 0, r"attribution\.max_rows must be positive"),
    ("line_steps", 0, r"SolverOptions\.line_steps must be positive"),
    ("shared_gram_max", -1, r"SolverOptions\.shared_gram_max must be non-negative"),
    ("max_batch", 8.0, r"SolverOptions\.max_batch must be an integer"),
])
def test_solver_options_name_the_config_field(field, value, message):
  with pytest.raises(AttributionError, match=message):
    SolverOptions(**{field: value})


def test_solver_options_from_config():
  cfg = config_lib.attribution_section()
  cfg.max_iter = 80
  assert SolverOptions.from_config(cfg).max_iter == 80
  bad = ml_collections.ConfigDict({"C": float("inf"), "tol": 1e-5, "max_iter": 5, "max_rows": 8})
  with pytest.raises(AttributionError, match=r"attribution\.C must be positive and finite"):
    SolverOptions.from_config(bad)


# --- topk / check_inputs ----------------------------------------------------------------------


def _topk_cases():
  train, labels, test, test_labels = toy(seed=1)
  nan = train.copy()
  nan[[2, 7], 0] = np.nan
  return {
      "features_1d": (dict(train_features=train[:, 0]), r"train_features must be floating point"),
      "int_features": (dict(test_features=test.astype(np.int32)),
                       r"test_features must be floating point \[N, d\], got shape \(10, 8\) int32"),
      "nan_features": (dict(train_features=nan), r"train_features .* NaN/inf .* in 2 of 130 rows"),
      # Before: finite in float64, so accepted, and inf once cast to the solver's float32.
      "beyond_float32": (dict(test_features=test.astype(np.float64) * 1e38), "beyond float32"),
      "labels_2d": (dict(train_labels=labels[:, None]), r"train_labels must be 1-D"),
      "fractional_labels": (dict(test_labels=test_labels + 0.5), r"test_labels must be integer"),
      "label_count": (dict(train_labels=labels[:-1]), r"train_features has 130 rows but "
                      r"train_labels has 129"),
      # Before: silently truncated to positions 0 and 1.
      "float_targets": (dict(targets=[0.5, 1.7]), "targets must be integer test positions"),
      "targets_2d": (dict(targets=[[0, 1]]), "targets must be a non-empty 1-D"),
      "k_float": (dict(k=2.5), "k must be a positive integer"),
      "k_zero": (dict(k=0), "k must be a positive integer"),
      "chunk_size": (dict(chunk_size=2.5), "chunk_size must be positive"),
      "train_index": (dict(train_index=np.arange(130.0)), r"train_index must be integer \[130\]"),
      "options": (dict(options={"C": 0.1}), "options must be a SolverOptions"),
  }, (train, labels, test, test_labels)


@pytest.mark.parametrize("case", sorted(_topk_cases()[0]))
def test_topk_rejects_bad_inputs_before_any_solve(case, monkeypatch):
  cases, (train, labels, test, test_labels) = _topk_cases()
  overrides, message = cases[case]
  args = dict(train_features=train, train_labels=labels, test_features=test,
              test_labels=test_labels, k=5)
  args.update(overrides)

  def no_solve(*a, **kw):
    raise AssertionError("solver started on bad input")

  monkeypatch.setattr(ranking, "_ChunkRunner", no_solve)
  with pytest.raises(AttributionError, match=message):
    attribute.topk(**args)


def test_check_inputs_takes_raw_targets():
  train, labels, test, test_labels = toy()
  attribute.check_inputs(train, labels, test, test_labels, [0, 3], "esvm", 5, True)
  with pytest.raises(AttributionError, match="targets must be integer"):
    attribute.check_inputs(train, labels, test, test_labels, [0.0, 3.0], "esvm", 5, True)
  with pytest.raises(AttributionError, match="non-empty"):
    attribute.check_inputs(train, labels, test, test_labels, [], "esvm", 5, True)


# --- the chunk-resume key ---------------------------------------------------------------------


def test_chunk_resume_key_is_exact_content_and_every_setting(tmp_path):
  train, labels, test, test_labels = toy(seed=2)
  chunk_dir = str(tmp_path / "chunks")
  kw = dict(k=5, chunk_size=4, chunk_dir=chunk_dir)
  first = attribute.topk(train, labels, test, test_labels, **kw)
  assert first.computed_targets == 10
  assert attribute.topk(train, labels, test, test_labels, **kw).computed_targets == 0  # resumed
  # One value changed in a row the old sampled hash skipped (a stride of len // 64 = 2 rows)
  # and the sums kept: before, these features resumed the old chunks.
  other = train.copy()
  other[1, 0] += 1.0
  other[1, 1] -= 1.0
  res = attribute.topk(other, labels, test, test_labels, **kw)
  assert res.computed_targets == 10
  for change in (dict(options=SolverOptions(line_steps=11)), dict(k=4), dict(targets=np.arange(9)),
                 dict(same_class=False), dict(method="l2")):
    attribute.topk(train, labels, test, test_labels, **kw)  # the base run's chunks
    again = attribute.topk(train, labels, test, test_labels, **{**kw, **change})
    assert again.computed_targets == len(again.targets), change


# --- the counterfactual Trainer ---------------------------------------------------------------


@pytest.fixture(scope="module")
def small_train():
  """128 16x16 digits."""
  return data_lib.load("digits", "train", size=16).subset(np.arange(128))


def _trainer_config(**overrides):
  cfg = config_lib.trainer_section()
  cfg.update({"width": 0.0625, "epochs": 1, "batch_size": 32, "eval_batch_size": 16})
  cfg.update(overrides)
  return cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        # Before: built, then every model's epoch had zero steps of drop_last batches.
        ({
            "batch_size": 256
        }, r"ensemble\.batch_size=256 exceeds the 128 training images"),
        ({
            "batch_size": 0
        }, r"ensemble\.batch_size must be an integer >= 1"),
        ({
            "epochs": 0
        }, r"ensemble\.epochs must be an integer >= 1, got 0"),
        ({
            "peak_lr": 0.0
        }, r"ensemble\.peak_lr must be a positive number"),
        ({
            "peak_epoch": -1.0
        }, r"ensemble\.peak_epoch must be a number >= 0"),
        ({
            "width": 0.0
        }, r"ensemble\.width must be a positive number"),
        ({
            "eval_batch_size": 0
        }, r"ensemble\.eval_batch_size must be an integer >= 1"),
        ({
            "models_per_wave": -1
        }, r"ensemble\.models_per_wave must be an integer >= 0"),
        ({
            "momentum": 1.0
        }, r"ensemble\.momentum must be in \[0, 1\)"),
        ({
            "label_smoothing": 1.0
        }, r"ensemble\.label_smoothing must be in \[0, 1\)"),
        ({
            "cutout": -1
        }, r"ensemble\.cutout must be an integer >= 0"),
        ({
            "compute_dtype": "float16"
        }, r"ensemble\.compute_dtype must be 'auto'"),
        ({
            "model": "vgg"
        }, r"ensemble\.model must be 'resnet9', 'mobilenetv2' or 'resnet18', got 'vgg'"),
        ({
            "cpu_ops": "fast"
        }, r"ensemble\.cpu_ops must be"),
        ({
            "formulation": "pmap"
        }, r"ensemble\.formulation must be"),
        ({
            "log_every_s": 0.0
        }, r"ensemble\.log_every_s must be a positive number"),
    ])
def test_trainer_rejects_bad_config_on_construction(small_train, overrides, message):
  with pytest.raises(ValueError, match=message):
    ensemble.Trainer(_trainer_config(**overrides), small_train)


def test_trainer_rejects_a_bad_training_set():
  images = np.zeros((4, 8, 8, 3), np.uint8)
  bad_labels = types.SimpleNamespace(images=images, labels=np.array([0, 1, 2, 9]), num_classes=3)
  with pytest.raises(ValueError, match=r"training labels must be int \[N=4\] in \[0, 3\)"):
    ensemble.Trainer(_trainer_config(batch_size=2), bad_labels)
  floats = types.SimpleNamespace(images=images.astype(np.float32), labels=np.zeros(4, np.int32),
                                 num_classes=3)
  with pytest.raises(ValueError, match=r"training images must be uint8"):
    ensemble.Trainer(_trainer_config(batch_size=2), floats)


def test_trainer_check_arguments(small_train):
  trainer = ensemble.Trainer(_trainer_config(), small_train)
  ev = small_train.images[:3]
  seeds, *_ = trainer.check_arguments(ev, [0, 1], None, None, None)
  assert seeds.tolist() == [0, 1]
  cases = [
      # Before: a list (no dtype) failed with an AttributeError.
      (dict(eval_images=ev.tolist()), r"eval_images must be uint8 \[E, 16, 16, 3\], got int64"),
      (dict(eval_images=ev.astype(np.float32)), r"eval_images must be uint8 \[E, 16, 16, 3\]"),
      (dict(eval_images=ev[:, :8]), r"eval_images must be uint8 \[E, 16, 16, 3\]"),
      (dict(seeds=[0.5, 1.0]), r"seeds must be a non-empty int \[M\]"),
      (dict(prefixes=[[0, 1], [2, 128]]), r"prefixes \[M=2, K=2\] must hold training positions"),
      (dict(prefixes=[[0, 1], [2, 3]], sizes=[3, 0]), r"sizes must be int \[M=2\] in \[0, K=2\]"),
      (dict(flip=[0, 10]), r"flip must be int \[M=2\] in \[-1, 10\)"),
  ]
  for kwargs, message in cases:
    args = dict(eval_images=ev, seeds=[0, 1], prefixes=None, sizes=None, flip=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
      trainer.check_arguments(**args)


# --- benchmarks/benchmark_esvm.py's feature cache ---------------------------------------------


def _npz_data(path, seed, n_train=6):
  rng = np.random.default_rng(seed)
  np.savez(path, x_train=rng.integers(0, 256, (n_train, 32, 32, 3), np.uint8),
           y_train=np.arange(n_train) % 2, x_test=rng.integers(0, 256, (4, 32, 32, 3),
                                                               np.uint8), y_test=np.arange(4) % 2)


def test_benchmark_feature_cache_is_keyed_by_the_data(tmp_path, monkeypatch):
  """Before: the cache was named by width and seed only, so a run with another --data read the
  first run's features (under the new name)."""
  from benchmarks import benchmark_esvm as bench  # pylint: disable=g-import-not-at-top

  a, b = tmp_path / "a.npz", tmp_path / "b.npz"
  _npz_data(a, 0)
  _npz_data(b, 1)
  kw = dict(width=0.125, seed=0, extract_batch=8)
  key_a, key_b = (bench.cache_key(f"npz:{p}", **kw) for p in (a, b))
  assert bench.default_cache_path(key_a) != bench.default_cache_path(key_b)
  assert key_a != bench.cache_key(f"npz:{a}", **{**kw, "seed": 1})
  cache = str(tmp_path / "features.npz")  # one --cache path for both datasets
  train_a, test_a, info = bench.load_or_extract(data=f"npz:{a}", cache=cache, **kw)
  assert not info["cache_reused"] and train_a["features"].shape == (6, 64)
  train_b, test_b, info = bench.load_or_extract(data=f"npz:{b}", cache=cache, **kw)
  assert not info["cache_reused"]  # re-extracted: the cache held a's features
  assert not np.allclose(train_a["features"], train_b["features"])

  def no_extract(*args):
    raise AssertionError("extracted again")

  monkeypatch.setattr(bench, "_extract", no_extract)
  again, _, info = bench.load_or_extract(data=f"npz:{b}", cache=cache, **kw)
  assert info["cache_reused"]
  np.testing.assert_array_equal(again["features"], train_b["features"])
  # The same file name with other content (another size and mtime) is another key.
  _npz_data(b, 2, n_train=8)
  with pytest.raises(AssertionError, match="extracted again"):
    bench.load_or_extract(data=f"npz:{b}", cache=cache, **kw)

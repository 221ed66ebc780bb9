"""benchmarks/benchmark_esvm.py end to end on small synthetic features, and its flag checks."""

import json
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=300):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env["JAX_PLATFORMS"] = "cpu"
  return subprocess.run([sys.executable, "-m", "benchmarks.benchmark_esvm", *args], env=env,
                        cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _features(path, rng, per_class, classes=2, dim=16):
  # Non-negative, shared-mean features like a ReLU encoder's, one cluster per class.
  labels = np.repeat(np.arange(classes), per_class)
  centers = np.abs(rng.normal(size=(classes, dim))) + 1.0
  feats = np.abs(centers[labels] + 0.5 * rng.normal(size=(len(labels), dim)))
  np.savez(path, features=feats.astype(np.float32), labels=labels, index=np.arange(
      len(labels), dtype=np.int64))


def _feature_dir(tmp_path, seed, targets_per_class):
  """train.npz (1,300 candidates per class: the top-1280 needs that many) and test.npz."""
  rng = np.random.default_rng(seed)
  feat_dir = tmp_path / "features"
  feat_dir.mkdir()
  _features(feat_dir / "train.npz", rng, 1300)
  _features(feat_dir / "test.npz", rng, targets_per_class)
  return feat_dir


def test_benchmark_esvm_compare_and_all(tmp_path):
  """Both modes on 1,300 candidates per class (the top-1280 needs that many): the table, the
  agreement with sklearn and the JSON."""
  feat_dir, out = _feature_dir(tmp_path, seed=0, targets_per_class=6), tmp_path / "esvm.json"
  res = _run(f"--features_dir={feat_dir}", "--mode=both", "--num_targets_jax=6",
             "--num_targets_sklearn=4", "--num_targets_dual=1", "--repeats=2", f"--out={out}")
  assert res.returncode == 0, res.stderr[-3000:]
  for row in ("jaxattr ESVM (topk, k=1280)", "jaxattr ESVM decision values",
              "sklearn LinearSVC primal", "sklearn LinearSVC dual=True",
              "jaxattr ESVM, all 12 test targets"):
    assert row in res.stdout, res.stdout
  assert "stopped at max_iter=10000" in res.stdout
  result = json.loads(out.read_text())
  settings = result["settings"]
  assert settings["vs_primal"]["overlap@100"] == 1.0
  assert settings["vs_primal"]["max_abs_diff"] < 1e-4
  assert settings["sklearn_primal_unconverged"] == 0
  assert settings["all_nonconverged"] == 0 and len(settings["sklearn_primal_s"]) == 4
  assert settings["flags"]["max_rows"] == 224  # SolverOptions' default
  # One paired ratio per round: the round's sklearn seconds per target over jaxattr's.
  sk = np.asarray(settings["sklearn_primal_s"]).reshape(2, 2).mean(1)
  for name, timing in (("topk", "jax_timing"), ("values", "values_timing")):
    ratios = settings[f"paired_round_ratios_{name}"]
    np.testing.assert_allclose(ratios, sk * 6 / np.asarray(settings[timing]["times_s"]), rtol=1e-9)
  assert "paired rounds" in res.stdout


def test_benchmark_esvm_compare_without_dual(tmp_path):
  """--num_targets_dual=0 skips scikit-learn's dual fits (minutes a target on some families):
  no dual row, no dual agreement, the rest as usual."""
  feat_dir, out = _feature_dir(tmp_path, seed=2, targets_per_class=3), tmp_path / "esvm.json"
  res = _run(f"--features_dir={feat_dir}", "--mode=compare", "--num_targets_jax=3",
             "--num_targets_sklearn=1", "--num_targets_dual=0", "--repeats=1", f"--out={out}")
  assert res.returncode == 0, res.stderr[-3000:]
  assert "sklearn LinearSVC primal" in res.stdout
  assert "dual=True" not in res.stdout and "vs_dual" not in res.stdout
  settings = json.loads(out.read_text())["settings"]
  assert settings["vs_dual"] is None and settings["sklearn_dual_s"] == []
  assert settings["vs_primal"]["overlap@100"] == 1.0


def test_benchmark_esvm_rejects_bad_flags(tmp_path):
  """Bad counts fail at flag parsing; a class without examples names --class_id."""
  res = _run("--num_targets_dual=-1", timeout=120)
  assert res.returncode != 0 and "--num_targets_dual" in res.stderr
  res = _run("--repeats=0", timeout=120)
  assert res.returncode != 0 and "--repeats" in res.stderr
  rng = np.random.default_rng(1)
  feat_dir = tmp_path / "features"
  feat_dir.mkdir()
  _features(feat_dir / "train.npz", rng, 10)
  _features(feat_dir / "test.npz", rng, 2)
  res = _run(f"--features_dir={feat_dir}", "--mode=compare", "--class_id=5",
             f"--out={tmp_path / 'x.json'}", timeout=120)
  assert res.returncode != 0 and "--class_id=5" in res.stderr
  assert not (tmp_path / "x.json").exists()


def test_imagenet_sweep_small(tmp_path):
  """benchmarks/esvm_imagenet_sweep.py on a few small classes: every target solved, compared
  with sklearn where sampled, the JSON written."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env["JAX_PLATFORMS"] = "cpu"
  out = tmp_path / "sweep.json"
  res = subprocess.run([
      sys.executable, "-m", "benchmarks.esvm_imagenet_sweep", "--classes=3", "--targets=4",
      "--candidates=40", "--dim=24", "--k=10", "--sklearn_every=2", f"--out={out}"
  ], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "jaxattr topk (per class)" in res.stdout and "sklearn LinearSVC primal" in res.stdout
  settings = json.loads(out.read_text())["settings"]
  assert settings["nonconverged"] == 0 and settings["top100_identical_share"] == 1.0
  assert settings["all_targets_seconds"] > 0 and settings["iterations_mean"] >= 1

"""benchmarks/benchmark_loader.py end to end on a tiny generated tree: the table and the JSON."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import repo_env


def test_benchmark_loader_small(tmp_path):
  pytest.importorskip("torchvision")
  env = repo_env()
  out = tmp_path / "loader.json"
  res = subprocess.run([
      sys.executable, "-m", "benchmarks.benchmark_loader", "--classes=2", "--per_class=3",
      "--batch=2", "--workers=1", "--repeats=1", "--side=32", f"--out={out}"
  ], env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "torchvision DataLoader, 1 worker(s)" in res.stdout and "draft vs full" in res.stdout
  result = json.loads(out.read_text())
  assert {r["who"] for r in result["rows"]} >= {
      "jaxattr grain, 1 process(es)", "jaxattr draft decode + resize"
  }
  assert all(r["images"] == 6 and r["images/s"] > 0 for r in result["rows"])
  assert os.path.isdir(tmp_path / "bench_results" / "imagenet_tree_2x3_500x375")


def test_benchmark_loader_refuses_a_single_batch(tmp_path):
  res = subprocess.run([
      sys.executable, "-m", "benchmarks.benchmark_loader", "--classes=2", "--per_class=8",
      "--batch=32", f"--out={tmp_path / 'loader.json'}"
  ], env=repo_env(), cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
  assert res.returncode != 0
  assert "16 images make fewer than two batches of --batch=32" in res.stderr
  assert not (tmp_path / "bench_results").exists()  # refused before generating the tree

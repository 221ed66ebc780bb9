"""benchmarks/benchmark_imagenet_train.py --mode=stages on a tiny batch: its table and JSON."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=600):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env["JAX_PLATFORMS"] = "cpu"
  return subprocess.run([sys.executable, "-m", "benchmarks.benchmark_imagenet_train", *args],
                        env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_stages_mode_times_each_stage_of_both_models(tmp_path):
  out = tmp_path / "stages.json"
  res = _run("--mode=stages", "--batch_size=2", "--crop=16", "--repeats=2", "--stage_iters=1",
             f"--out={out}")
  assert res.returncode == 0, res.stderr[-3000:]
  result = json.loads(out.read_text())
  rows = {row["stage"]: row for row in result["rows"]}
  assert list(rows) == ["stem", "layer1", "layer2", "layer3", "layer4", "sum"]
  # The stages chain as the ResNet-18 of 16 px crops does (small stem: max-pool to 8 px).
  assert [rows[s]["out_shape"] for s in list(rows)[:5]] == [
      "2x8x8x64", "2x8x8x64", "2x4x4x128", "2x2x2x256", "2x1x1x512"
  ]
  for name, row in rows.items():
    assert row["jax_fwd_ms"] > 0 and row["torch_fwd_ms"] > 0, (name, row)
  for key in ("jax_fwd_ms", "jax_bwd_ms", "torch_fwd_ms", "torch_bwd_ms"):
    assert abs(rows["sum"][key] - sum(rows[s][key] for s in list(rows)[:5])) < 1e-6
  assert result["settings"]["crop"] == 16 and result["settings"]["batch_size"] == 2
  assert "stage" in res.stdout and "bwd_torch_over_jax" in res.stdout


def test_stages_mode_refuses_a_width_the_torch_model_lacks(tmp_path):
  res = _run("--mode=stages", "--width=0.5", f"--out={tmp_path / 'x.json'}", timeout=120)
  assert res.returncode != 0
  assert "width 1 only" in res.stderr


def test_stages_mode_refuses_a_batch_of_one(tmp_path):
  res = _run("--mode=stages", "--batch_size=1", f"--out={tmp_path / 'x.json'}", timeout=120)
  assert res.returncode != 0
  assert "--batch_size >= 2" in res.stderr
  assert not (tmp_path / "x.json").exists()


def test_negative_crop_is_refused_by_flag_name(tmp_path):
  res = _run("--mode=stages", "--crop=-8", f"--out={tmp_path / 'x.json'}", timeout=120)
  assert res.returncode != 0
  assert "crop" in res.stderr and not (tmp_path / "x.json").exists()


def test_synthetic_data_is_seeded_whatever_the_threads():
  # Chunks come from their own seeded streams: the same images on 1 thread as on all cores.
  code = """
from concurrent import futures
import numpy as np
from benchmarks import benchmark_imagenet_train as b
a, la = b.synthetic(5000, 7, 16, seed=3, chunk=1000)
pool = futures.ThreadPoolExecutor
futures.ThreadPoolExecutor = lambda n: pool(1)
c, lc = b.synthetic(5000, 7, 16, seed=3, chunk=1000)
d, _ = b.synthetic(5000, 7, 16, seed=4, chunk=1000)
assert a.shape == (5000, 16, 16, 3) and a.dtype == np.uint8 and la.dtype == np.int32
assert np.array_equal(a, c) and np.array_equal(la, lc) and not np.array_equal(a, d)
assert set(np.unique(la)) == set(range(7)) and 100 < a.mean() < 155 and a.std() > 40
print("ok")
"""
  res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
  assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]

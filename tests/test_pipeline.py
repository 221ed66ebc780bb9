"""The main job end to end through its absl entry point, on the tiny digits variant."""

import json
import os
import subprocess
import sys

from tests.conftest import REPO, repo_env


def _pipeline(workdir, *extra):
  cmd = [
      sys.executable,
      os.path.join(REPO, "launch", "pipeline.py"), "--config",
      os.path.join(REPO, "configs", "digits.py") + ":quick", "--workdir",
      str(workdir), *extra
  ]
  return subprocess.run(cmd, env=repo_env(), cwd=REPO, capture_output=True, text=True, timeout=600)


def test_pipeline_quick_end_to_end_and_skips_on_rerun(tmp_path):
  res = _pipeline(tmp_path)
  assert res.returncode == 0, res.stderr[-4000:]
  for rel in ("pretrain/encoder/meta.json", "features/train.npz", "features/test.npz",
              "attribution/esvm/topk.npy", "attribution/esvm/grid.png",
              "attribution/l2/topk_reference.npy", "support/removal/esvm/summary.json",
              "support/mislabel/l2/results.jsonl", "support/removal/curves.png", "report.html",
              "summary.json", "timings.json"):
    assert os.path.exists(tmp_path / rel), rel
  with open(tmp_path / "summary.json") as f:
    summary = json.load(f)
  assert 0.0 <= summary["pretrain"]["knn_accuracy"] <= 1.0
  assert summary["attribution"]["esvm"]["num_targets"] == 3
  assert summary["attribution"]["esvm"]["solver"]["nonconverged_count"] == 0
  import numpy as np  # pylint: disable=import-outside-toplevel
  topk = np.load(tmp_path / "attribution" / "esvm" / "topk.npy")
  scores = np.load(tmp_path / "attribution" / "esvm" / "scores.npy")
  assert topk.shape == (3, 32) and np.all(np.diff(scores, axis=1) <= 0)
  for metric in ("removal", "mislabel"):
    for method in ("esvm", "l2"):
      sup = summary["support"][metric][method]
      assert sup["targets"] == 2
      # (1 + budget) x num_tests trainings per target at most.
      assert sup["trainings_per_target_max"] <= (1 + 1) * 1
  html = (tmp_path / "report.html").read_text()
  for text in ("removal", "mislabel", "esvm", "l2", "data:image/png;base64"):
    assert text in html
  # A second run with the same config skips every stage.
  res = _pipeline(tmp_path)
  assert res.returncode == 0, res.stderr[-4000:]
  assert res.stderr.count("up to date") >= 4, res.stderr[-2000:]


def test_pipeline_rejects_unknown_config_field(tmp_path):
  res = _pipeline(tmp_path, "--config.pretrain.epochz=3")
  assert res.returncode != 0
  assert "epochz" in res.stderr


def test_pipeline_checks_config_against_data_before_work(tmp_path):
  res = _pipeline(tmp_path, "--config.attribution.k=500")
  assert res.returncode != 0
  assert "attribution.k=500 exceeds the" in res.stderr
  assert not os.path.exists(tmp_path / "pretrain")  # failed before any stage ran

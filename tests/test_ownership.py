"""Results belong to the config and data that made them (`jaxattr.ownership`): records, reruns,
refusals, through the launchers on the tiny digits variant and on a folder source."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from jaxattr import config as config_lib, ownership
from tests.conftest import REPO, repo_env

QUICK = os.path.join(REPO, "configs", "digits.py") + ":quick"


def _launch(name, workdir, *extra):
  cmd = [
      sys.executable,
      os.path.join(REPO, "launch", f"{name}.py"), "--config", QUICK, "--workdir",
      str(workdir), *extra
  ]
  return subprocess.run(cmd, env=repo_env(), cwd=REPO, capture_output=True, text=True, timeout=600)


def _json(path):
  with open(path) as f:
    return json.load(f)


def _snapshot(root):
  return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns)
                for p in root.rglob("*")
                if p.is_file() and p.name not in ("error.log",))


def test_stages_rerun_exactly_when_their_config_changes_and_refuse_foreign_inputs(tmp_path):
  wd = tmp_path
  res = _launch("pipeline", wd)
  assert res.returncode == 0, res.stderr[-3000:]
  assert _json(wd / "summary.json")["support"]["removal"]["esvm"]["targets"] == 2

  # A support launcher with fewer targets writes support/ for that config ...
  res = _launch("support", wd, "--config.support.num_targets=1")
  assert res.returncode == 0, res.stderr[-3000:]
  assert _json(wd / "support/removal/esvm/summary.json")["targets"] == 1
  # ... so the main job's config (2 targets) must not count it as done (it did before).
  res = _launch("pipeline", wd)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "stage support: done" in res.stderr
  for stage in ("pretrain", "features", "attribution"):
    assert f"stage {stage}: up to date" in res.stderr, res.stderr[-3000:]
  assert _json(wd / "summary.json")["support"]["removal"]["esvm"]["targets"] == 2

  # Another C: the attribution launcher recomputes and records it; the pipeline then redoes it.
  before = _json(wd / "attribution/esvm/fingerprint.json")
  res = _launch("attribute", wd, "--config.attribution.C=0.2")
  assert res.returncode == 0, res.stderr[-3000:]
  after = _json(wd / "attribution/esvm/fingerprint.json")
  assert after["fields"]["attribution.C"] == 0.2 != before["fields"]["attribution.C"]
  assert _json(wd / "attribution/esvm/attribution.json")["config"]["C"] == 0.2
  # Support of C=0.1 must not read the C=0.2 ranking: refused, naming the field.
  res = _launch("support", wd)
  assert res.returncode == 1
  assert "attribution.C: 0.2 -> 0.1" in res.stderr and "launch/attribute.py" in res.stderr
  res = _launch("pipeline", wd)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "stage attribution: done" in res.stderr
  assert _json(wd / "attribution/esvm/fingerprint.json")["fingerprint"] == before["fingerprint"]

  # Features of another config are refused before any work, and nothing is touched.
  snap = _snapshot(wd / "attribution")
  res = _launch("attribute", wd, "--config.features.batch_size=64")
  assert res.returncode == 1
  assert "features.batch_size: 128 -> 64" in res.stderr, res.stderr[-3000:]
  assert res.stderr.strip().splitlines()[-1].startswith("error: ")
  assert _snapshot(wd / "attribution") == snap
  # The features launcher with another seed: the encoder in the workdir is not that config's.
  res = _launch("features", wd, "--config.seed=3")
  assert res.returncode == 1 and "seed: 0 -> 3" in res.stderr, res.stderr[-3000:]


def _folder(root, value=0):
  for split, n in (("train", 6), ("test", 2)):
    for cls in ("a", "b"):
      os.makedirs(root / split / cls, exist_ok=True)
      for i in range(n):
        Image.fromarray(np.full((8, 8, 3), value + i,
                                np.uint8)).save(root / split / cls / f"{i}.png")


def test_changed_images_under_the_same_path_invalidate_features(tmp_path):
  _folder(tmp_path / "data")
  ckpt = tmp_path / "encoder.bin"
  ckpt.write_bytes(b"weights")
  config = config_lib.base_config()
  config.data.source = f"folder:{tmp_path / 'data'}"
  config.encoder.checkpoint = str(ckpt)
  wd = str(tmp_path / "wd")
  fields = ownership.features_fields(config, wd)
  ownership.record(wd, "features", fields)
  assert ownership.require(wd, "features", ownership.features_fields(config, wd))
  # Same file names and paths, other pixels.
  img = tmp_path / "data" / "train" / "a" / "0.png"
  Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(img)
  os.utime(img, ns=(1, 1))
  new = ownership.features_fields(config, wd)
  assert not ownership.current(wd, "features", new)
  with pytest.raises(ownership.StageMismatchError, match="data: the files changed"):
    ownership.require(wd, "features", new)
  # So does another encoder checkpoint's content, and an attribution stage refuses them.
  ckpt.write_bytes(b"other weights")
  with pytest.raises(ownership.StageMismatchError, match="encoder.checkpoint.content"):
    ownership.attribution_fields(config, wd, "esvm")
  # Outputs without a record (an older jaxattr, or a killed stage) are never taken as done.
  os.remove(os.path.join(wd, "features", ownership.RECORD))
  with pytest.raises(ownership.StageMismatchError, match="no fingerprint.json"):
    ownership.require(wd, "features", new)

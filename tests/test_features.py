"""Feature extraction: padding of the last batch, and 4 fake CPU devices == 1 device."""

import json
import subprocess
import sys

import jax
import numpy as np

from jaxattr import features
from jaxattr.models import get_encoder
from tests.conftest import REPO, repo_env

_SCRIPT = r"""
import json, sys
import jax, numpy as np
from jaxattr import features
from jaxattr.models import get_encoder
model = get_encoder("lightly_resnet18", width=0.0625, stage_sizes=(1, 1))
images = np.random.default_rng(0).integers(0, 256, (37, 8, 8, 3), dtype=np.uint8)
v = model.init(jax.random.key(0), np.zeros((1, 8, 8, 3), np.float32), train=False)
extract, batch = features.make_extractor(model, v, (0.5,) * 3, (0.25,) * 3, batch_size=10)
f = extract(images)
np.save(sys.argv[1], f)
print(json.dumps({"devices": jax.device_count(), "batch": batch}))
"""


def _run(tmp_path, devices):
  out = tmp_path / f"f{devices}.npy"
  env = repo_env()
  env["JAX_NUM_CPU_DEVICES"] = str(devices)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  res = subprocess.run([sys.executable, "-c", _SCRIPT, str(out)], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  info = json.loads(res.stdout.strip().splitlines()[-1])
  return np.load(out), info


def test_four_fake_devices_equal_one(tmp_path):
  f1, i1 = _run(tmp_path, 1)
  f4, i4 = _run(tmp_path, 4)
  assert i1["devices"] == 1 and i4["devices"] == 4
  assert i4["batch"] == 12  # rounded up to a multiple of the device count
  assert f1.shape == f4.shape == (37, 8)
  np.testing.assert_allclose(f1, f4, rtol=1e-5, atol=1e-5)


def test_padded_last_batch_matches_direct_apply():
  model = get_encoder("lightly_resnet18", width=0.0625, stage_sizes=(1,))
  images = np.random.default_rng(1).integers(0, 256, (7, 8, 8, 3), dtype=np.uint8)
  v = model.init(jax.random.key(0), np.zeros((1, 8, 8, 3), np.float32), train=False)
  extract, _ = features.make_extractor(model, v, (0.5,) * 3, (0.25,) * 3, batch_size=4)
  got = extract(images)
  x = (images / 255.0 - 0.5) / 0.25
  want = np.asarray(model.apply(v, x.astype(np.float32), train=False)["feature"])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

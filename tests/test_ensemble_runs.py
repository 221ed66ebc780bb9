"""The ensemble trainer end to end: sharded over fake devices, learning real CIFAR-10, and the
flip launcher (a file of its own, so that the test workers split the trainer's tests evenly)."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from jaxattr import config, data
from jaxattr.counterfactual import ensemble
from tests.conftest import REPO, repo_env


@pytest.mark.slow
def test_sharded_over_four_devices_matches_one_device(tmp_path):
  """4 fake CPU devices (model axis sharded) give the same logits as one device."""
  script = textwrap.dedent("""
      import sys, numpy as np, jax
      from jaxattr import config, data
      from jaxattr.counterfactual import ensemble
      train = data.load("digits", "train", size=16).subset(np.arange(128))
      ev = data.load("digits", "test", size=16).images[:16]
      cfg = config.trainer_section()
      cfg.update(dict(width=0.0625, epochs=1, batch_size=32, eval_batch_size=16,
                      formulation="map", models_per_wave=4))
      sizes = np.array([0, 50, 0, 20, 0]); flip = np.array([-1, -1, -1, 2, -1])
      prefixes = np.arange(128)[None].repeat(5, 0)
      out, _ = ensemble.Trainer(cfg, train).train_and_predict(ev, np.arange(5), prefixes, sizes,
                                                             flip)
      np.save(sys.argv[1], out)
      print(len(jax.devices()))
  """)
  results = []
  for ndev in (4, 1):
    env = dict(repo_env(), JAX_NUM_CPU_DEVICES=str(ndev), JAX_PLATFORMS="cpu")
    path = str(tmp_path / f"out{ndev}.npy")
    proc = subprocess.run([sys.executable, "-c", script, path], env=env, capture_output=True,
                          text=True, timeout=600, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(ndev)
    # One device holds the wave's 4 models, compiled unrolled: one warning naming the way out.
    warned = proc.stderr.count("models per device in a wave; XLA:CPU compiles them unrolled")
    assert warned == (ndev == 1), proc.stderr[-3000:]
    if ndev == 1:
      assert "4 models per device" in proc.stderr and "models_per_wave=1 " in proc.stderr
    results.append(np.load(path))
  # Same models; a device holding 2 models instead of 5 may fuse differently (rounding only).
  np.testing.assert_allclose(results[0], results[1], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_cifar10_small_resnet9_learns(cifar_tar):
  """Width-1/4 ResNet-9, 5,000 CIFAR-10 images, 4 epochs on CPU: >= 40% test accuracy (chance 10%).

  Measured 46.8% (18 s of training on the 2-core CPU, ~1 s of JPEG decoding; 6 epochs gave 54.8%).
  """
  train = data.load(f"folder:{cifar_tar}", "train", limit_per_class=500)
  test = data.load(f"folder:{cifar_tar}", "test", limit_per_class=100)
  cfg = config.trainer_section()
  cfg.update({
      "width": 0.25,
      "epochs": 4,
      "batch_size": 128,
      "peak_epoch": 1.0,
      "peak_lr": 0.2,
      "eval_batch_size": 500
  })
  logits, _ = ensemble.Trainer(cfg, train).train_and_predict(test.images, [0])
  acc = float((logits[0].argmax(-1) == test.labels).mean())
  print(f"CIFAR-10 test accuracy of the small ResNet-9: {acc:.4f}")
  assert acc >= 0.40, acc


def test_flip_launcher_smoke(tmp_path):
  """launch/flip.py with configs/flip.py:digits, shrunk, writes the flip classes."""
  cmd = [
      sys.executable,
      os.path.join(REPO, "launch", "flip.py"),
      "--config",
      os.path.join(REPO, "configs", "flip.py") + ":digits",
      "--workdir",
      str(tmp_path),
      "--compilation_cache=",
      "--config.data.options.limit_per_class=13",  # 130 images a split: 4 steps of 32
      "--config.num_models=2",
      "--config.ensemble.width=0.0625",
      "--config.ensemble.epochs=1",
      "--config.ensemble.batch_size=32",
      "--config.ensemble.eval_batch_size=130"
  ]
  res = subprocess.run(cmd, env=repo_env(), cwd=REPO, capture_output=True, text=True, timeout=600,
                       check=False)
  assert res.returncode == 0, res.stderr[-3000:]
  out = np.load(tmp_path / "flip_classes.npz")
  assert out["mean_softmax"].shape == (130, 10) and out["flip_class"].shape == (130,)
  assert (out["flip_class"] != out["labels"]).all()
  assert os.path.exists(tmp_path / "flip_metrics.json")

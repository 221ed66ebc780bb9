"""MoCo pieces against NumPy, augmentation properties, kNN, and checkpoint-resume equality."""

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattr import augment, data, pretrain, ssl
from tests.conftest import load_config


def _np_info_nce(q, k, bank, t):
  q = q / np.linalg.norm(q, axis=1, keepdims=True)
  k = k / np.linalg.norm(k, axis=1, keepdims=True)
  logits = np.concatenate([(q * k).sum(1, keepdims=True), q @ bank.T], axis=1) / t
  logits = logits - logits.max(1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  return -logp[:, 0].mean()


def test_info_nce_against_numpy():
  rng = np.random.default_rng(0)
  q, k = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
  bank = rng.normal(size=(9, 5))
  bank /= np.linalg.norm(bank, axis=1, keepdims=True)
  got = float(ssl.info_nce(jnp.asarray(q), jnp.asarray(k), jnp.asarray(bank), 0.1))
  np.testing.assert_allclose(got, _np_info_nce(q, k, bank, 0.1), rtol=1e-5)


def test_memory_bank_is_fifo_and_wraps():
  bank = jnp.zeros((5, 2))
  ptr = jnp.int32(0)
  ref = np.zeros((5, 2))
  ref_ptr = 0
  rng = np.random.default_rng(0)
  for _ in range(4):
    keys = rng.normal(size=(3, 2))
    bank, ptr = ssl.bank_enqueue(bank, ptr, jnp.asarray(keys))
    for row in keys / np.linalg.norm(keys, axis=1, keepdims=True):
      ref[ref_ptr] = row
      ref_ptr = (ref_ptr + 1) % 5
    np.testing.assert_allclose(np.asarray(bank), ref, rtol=1e-6)
    assert int(ptr) == ref_ptr


def test_views_in_range_deterministic_and_varied():
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, (16, 12, 12, 3), dtype=np.uint8))
  f = jax.jit(augment.simclr_views)
  a = np.asarray(f(jax.random.key(3), images))
  b = np.asarray(f(jax.random.key(3), images))
  c = np.asarray(f(jax.random.key(4), images))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  assert a.shape == (16, 12, 12, 3) and np.isfinite(a).all()
  lo = (0 - np.array(augment.IMAGENET_MEAN)) / np.array(augment.IMAGENET_STD)
  hi = (1 - np.array(augment.IMAGENET_MEAN)) / np.array(augment.IMAGENET_STD)
  assert (a >= lo - 1e-5).all() and (a <= hi + 1e-5).all()


def test_crop_of_full_image_is_identity():
  """Bilinear resampling of the whole image at the same size reproduces it exactly."""
  rng = np.random.default_rng(0)
  img = rng.random((7, 9, 3)).astype(np.float32)
  wy = augment._interp_matrix(jnp.float32(0), jnp.float32(7), 7, 7)
  wx = augment._interp_matrix(jnp.float32(0), jnp.float32(9), 9, 9)
  out = np.asarray(jnp.einsum("oh,hwc,pw->opc", wy, img, wx))
  np.testing.assert_allclose(out, img, atol=1e-6)


def test_hsv_roundtrip_and_zero_hue_jitter_is_identity():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.random((5, 5, 3)), jnp.float32)
  np.testing.assert_allclose(np.asarray(augment._hsv_to_rgb(augment._rgb_to_hsv(x))), np.asarray(x),
                             atol=1e-5)
  y = augment.color_jitter(jax.random.key(0), x, 0.0, 0.0, 0.0, 0.0)
  np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-5)


def test_crop_params_within_bounds():
  keys = jax.random.split(jax.random.key(0), 200)
  p = np.asarray(jax.vmap(lambda k: augment._sample_crop(k, 20, 30))(keys))
  top, left, h, w = p.T
  assert (h >= 1).all() and (w >= 1).all() and (top + h <= 20).all() and (left + w <= 30).all()
  area = h * w / 600
  assert area.min() >= 0.07 and area.max() <= 1.0 and area.std() > 0.1


def test_knn_predict_simple():
  train = jnp.asarray([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
  labels = jnp.asarray([0, 0, 1, 1])
  test = jnp.asarray([[1.0, 0.05], [0.05, 1.0]])
  pred = ssl.knn_predict(train, labels, test, num_classes=2, k=3, temperature=0.1)
  np.testing.assert_array_equal(np.asarray(pred), [0, 1])


def _tiny_config():
  c = load_config("digits", "quick")
  c.data.options.limit_per_class = 8
  c.pretrain.batch_size = 16
  c.encoder.width = 0.0625
  c.encoder.num_splits = 2
  c.pretrain.memory_bank_size = 32
  c.pretrain.max_steps = 4
  c.pretrain.epochs = 2
  c.pretrain.checkpoint_every_steps = 2
  c.pretrain.knn_k = 5
  return c


def _read_state(workdir):
  from jaxattr import checkpoint  # pylint: disable=import-outside-toplevel
  v, meta = checkpoint.load_variables(f"{workdir}/pretrain/encoder")
  return v, meta


def test_resume_after_kill_equals_uninterrupted(tmp_path):
  c = _tiny_config()
  full = pretrain.run(c, str(tmp_path / "a"))
  assert full["steps"] == 4 and np.isfinite(full["final_loss"])
  # "Killed" after step 2: run to 2 steps, then resume to 4 in the same workdir.
  c2 = _tiny_config()
  c2.pretrain.max_steps = 2
  pretrain.run(c2, str(tmp_path / "b"))
  resumed = pretrain.run(_tiny_config(), str(tmp_path / "b"))
  assert resumed["resumed_from"] == 2 and resumed["steps"] == 4
  va, _ = _read_state(tmp_path / "a")
  vb, meta = _read_state(tmp_path / "b")
  assert meta["step"] == 4
  jax.tree_util.tree_map(np.testing.assert_array_equal, va, vb)
  assert full["final_loss"] == resumed["final_loss"]
  # max_steps only says where to stop: both runs carry one fingerprint.
  assert meta["fingerprint"] == _read_state(tmp_path / "a")[1]["fingerprint"] == full["fingerprint"]


def _pretrain_snapshot(workdir):
  """Every path under WORKDIR/pretrain with its size and mtime, plus meta.json's bytes."""
  root = workdir / "pretrain"
  listing = sorted(
      (str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns) for f in root.rglob("*"))
  return listing, (root / "encoder" / "meta.json").read_bytes()


def test_changed_config_refuses_to_resume_and_changes_nothing(tmp_path):
  c = _tiny_config()
  c.pretrain.max_steps = 2
  first = pretrain.run(c, str(tmp_path))
  fp = json.loads((tmp_path / "pretrain" / "fingerprint.json").read_text())
  assert fp["fingerprint"] == first["fingerprint"] == _read_state(tmp_path)[1]["fingerprint"]
  before = _pretrain_snapshot(tmp_path)
  c1 = _tiny_config()
  c1.seed = 1
  with pytest.raises(pretrain.RunMismatchError, match=r"seed: 0 -> 1\. Nothing was changed") as e:
    pretrain.run(c1, str(tmp_path))
  assert "new --workdir" in str(e.value) and f"delete {tmp_path}/pretrain" in str(e.value)
  assert _pretrain_snapshot(tmp_path) == before
  c2 = _tiny_config()
  c2.pretrain.base_lr = 0.1
  c2.encoder.width = 0.125  # another architecture: named, no orbax traceback
  with pytest.raises(pretrain.RunMismatchError,
                     match=r"encoder.width: 0.0625 -> 0.125; pretrain.base_lr: 0.06 -> 0.1\."):
    pretrain.run(c2, str(tmp_path))
  assert _pretrain_snapshot(tmp_path) == before
  # Logging, checkpointing, monitoring and where to stop do not change the trained state.
  c3 = _tiny_config()
  c3.pretrain.log_every_steps = 1
  c3.pretrain.checkpoint_every_steps = 1
  c3.pretrain.knn_every_epochs = 0
  resumed = pretrain.run(c3, str(tmp_path))
  assert resumed["resumed_from"] == 2 and resumed["steps"] == 4
  assert resumed["fingerprint"] == first["fingerprint"]
  # A run without fingerprint.json (an older jaxattr) is of unknown configuration.
  (tmp_path / "pretrain" / "fingerprint.json").unlink()
  with pytest.raises(pretrain.RunMismatchError, match="without fingerprint.json"):
    pretrain.run(_tiny_config(), str(tmp_path))


def test_changed_data_refuses_to_resume(tmp_path):
  """The same config over changed files: the data fingerprint differs, before any image is read."""
  rng = np.random.default_rng(0)
  npz = tmp_path / "d.npz"
  np.savez(npz, x_train=rng.integers(0, 256, (32, 8, 8, 3), dtype=np.uint8), y_train=np.arange(32) %
           2, x_test=rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8), y_test=np.arange(8) % 2)
  c = _tiny_config()
  c.data.source = f"npz:{npz}"
  c.data.options.limit_per_class = None
  c.pretrain.max_steps = 1
  pretrain.run(c, str(tmp_path / "w"))
  os.utime(npz, ns=(1, 1))
  with pytest.raises(pretrain.RunMismatchError, match=r"\bdata: the files changed"):
    pretrain.run(c, str(tmp_path / "w"))


def test_batch_size_must_divide_splits(tmp_path):
  c = _tiny_config()
  c.pretrain.batch_size = 15
  with pytest.raises(ValueError, match="divisible by encoder.num_splits"):
    pretrain.run(c, str(tmp_path))


def _step_setup():
  c = _tiny_config()
  train, _ = data.load_splits(c.data)
  model = ssl.moco_model(c)
  state = ssl.init_state(c, jax.random.key(0), train.images.shape[1:], len(train))
  return c, train, model, state


def test_train_step_compiles_once(monkeypatch):
  """Steps 1..3 reuse one program: the step counter and the key are arrays, not constants."""
  monkeypatch.setattr(ssl, "train_step", chex.assert_max_traces(ssl.train_step, n=1))
  c, train, model, state = _step_setup()
  step_fn = ssl.make_train_fn(c, model, len(train))
  images, key = jax.device_put(train.images), jax.random.key(1)
  for _ in range(3):
    state, metrics = step_fn(state, images, key)
  assert int(state.step) == 3 and np.isfinite(float(metrics["loss"]))


def test_train_step_moves_no_data_between_host_and_device():
  """Once state, images and key are on the device, a step transfers nothing implicitly."""
  c, train, model, state = _step_setup()
  step_fn = ssl.make_train_fn(c, model, len(train))
  images, key = jax.device_put(train.images), jax.random.key(1)
  state, _ = step_fn(state, images, key)  # compile outside the guard
  with jax.transfer_guard("disallow"):
    state, metrics = step_fn(state, images, key)
    state, metrics = step_fn(state, images, key)
  assert int(state.step) == 3 and np.isfinite(float(metrics["loss"]))


def test_blocked_groups_on_a_group_sorted_batch_equal_interleaved():
  """Data-parallel MoCo sorts each batch by SplitBatchNorm group and normalises contiguous
  blocks ('blocked'): the same groups, so the same outputs, statistics and step as lightly's
  interleaved groups."""
  from jaxattr.models import layers  # pylint: disable=g-import-not-at-top
  x = np.random.default_rng(0).normal(size=(32, 4, 4, 6)).astype(np.float32)
  order = ssl.group_order(32, 8)
  assert sorted(order.tolist()) == list(range(32)) and (order[:4] % 8 == 0).all()
  inter, blocked = layers.BatchNorm(num_splits=8), layers.BatchNorm(num_splits=8,
                                                                    split_layout="blocked")
  v = inter.init(jax.random.key(0), x, train=False)
  y1, s1 = inter.apply(v, x, train=True, mutable=["batch_stats"])
  y2, s2 = blocked.apply(v, x[order], train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(y2, np.asarray(y1)[order], rtol=1e-5, atol=1e-5)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), s1,
                         s2)
  c, train, model, state = _step_setup()
  images = jnp.asarray(train.images[:c.pretrain.batch_size])
  key = jax.random.key(2)
  _, m1 = ssl.train_step(state, images, key, model=model, config=c)
  grouped = model.clone(backbone=model.backbone.clone(split_layout="blocked"))
  _, m2 = ssl.train_step(state, images, key, model=grouped, config=c, grouped=True)
  np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-5)

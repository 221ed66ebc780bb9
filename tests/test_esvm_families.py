"""benchmarks/esvm_families: shapes, determinism and keys of the ESVM benchmark feature families."""

import numpy as np
import pytest

from benchmarks import esvm_families as families

SMALL = dict(num_candidates=60, num_targets=5)


@pytest.mark.parametrize("make, dim", [(families.hard_synthetic, 512),
                                       (families.imagenet_shaped, 2048)])
def test_synthetic_shapes_and_determinism(make, dim):
  family = make(**SMALL)
  out = family.generate()
  assert out.key == family.key()
  assert len(out.targets) == len(out.candidates) == family.num_classes == 2
  for t, x in zip(out.targets, out.candidates):
    assert t.shape == (5, dim) and x.shape == (60, dim)
    assert t.dtype == x.dtype == np.float32
    assert np.all(np.isfinite(x)) and np.all(x >= 0) and np.all(t >= 0)
  again = make(**SMALL).generate()
  for a, b in zip(out.candidates + out.targets, again.candidates + again.targets):
    np.testing.assert_array_equal(a, b)
  mean_norm = np.mean(np.concatenate([np.linalg.norm(x, axis=1) for x in out.candidates]))
  np.testing.assert_allclose(mean_norm, family.norm, rtol=1e-5)


def test_keys_differ_with_every_parameter():
  base = families.SyntheticPostReLU(**SMALL)
  keys = {base.key()}
  for name, value in [("dim", 16), ("num_candidates", 61), ("num_targets", 6), ("num_classes", 3),
                      ("norm", 3.0), ("rank", 8), ("decay", 0.5), ("spread", 0.1), ("noise", 0.5),
                      ("gain_sd", 0.0), ("class_sd", 0.0), ("mean_shape", 2.0), ("dead", 0.0),
                      ("shift", 0.0), ("seed", 1)]:
    changed = families.SyntheticPostReLU(**{**SMALL, name: value})
    assert changed.key() not in keys, name
    keys.add(changed.key())
  assert families.imagenet_shaped(norm=3.0).key() != families.imagenet_shaped(norm=1000.0).key()


def test_seed_and_norm_change_the_arrays():
  a = families.hard_synthetic(**SMALL).generate()
  b = families.hard_synthetic(seed=1, **SMALL).generate()
  assert not np.array_equal(a.candidates[0], b.candidates[0])
  c = families.hard_synthetic(norm=1.6, **SMALL).generate()
  np.testing.assert_allclose(c.candidates[0], 2.0 * a.candidates[0], rtol=1e-5, atol=1e-7)


def test_statistics_of_the_presets():
  # The calibration of the module docstring's table (ResNet-18 on CIFAR, ResNet-50 avgpool).
  hard = families.summarize(
      families.hard_synthetic(num_targets=1, num_classes=1, num_candidates=1000).generate())
  assert 0.2 < hard["zeros"] < 0.32 and 0.94 < hard["cos_to_mean"] < 0.98
  assert 0.15 < hard["norm_cv"] < 0.3
  wide = families.summarize(
      families.imagenet_shaped(num_targets=1, num_classes=1, num_candidates=400).generate())
  assert 0.02 < wide["zeros"] < 0.07 and wide["cos_to_mean"] > 0.997
  assert wide["top_pc_share"][0] > 0.9 and 0.18 < wide["norm_cv"] < 0.3


def test_cached_reuses_only_the_same_key(tmp_path):
  family = families.hard_synthetic(**SMALL)
  first = families.cached(family, str(tmp_path))
  files = list(tmp_path.iterdir())
  assert len(files) == 1
  second = families.cached(family, str(tmp_path))
  np.testing.assert_array_equal(first.candidates[1], second.candidates[1])
  other = families.cached(families.hard_synthetic(seed=2, **SMALL), str(tmp_path))
  assert other.key != first.key and len(list(tmp_path.iterdir())) == 2


def _need_torch():
  if not families.torch_available():
    pytest.skip("torch and torchvision are not installed (the (b) family's real features need "
                "them; hard_synthetic stands in)")


def test_torch_features_deterministic_and_scaled():
  _need_torch()
  images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
  family = families.TorchResNet18(batch=4)
  a = family.features(images)
  assert a.shape == (6, 512) and a.dtype == np.float32 and np.all(a >= 0)  # post-ReLU avgpool
  np.testing.assert_array_equal(a, family.features(images))
  scaled = families.hard_torch(batch=4)
  np.testing.assert_allclose(scaled.features(images), 0.04 * a, rtol=1e-5, atol=1e-7)
  assert not np.array_equal(families.TorchResNet18(seed=1).features(images), a)


def test_torch_family_on_real_cifar(cifar_tar):
  _need_torch()
  family = families.TorchResNet18(num_candidates=8, num_targets=2, batch=8)
  out = family.generate()
  assert [x.shape for x in out.candidates] == [(8, 512)] * 2
  assert [t.shape for t in out.targets] == [(2, 512)] * 2
  assert family.key() != families.hard_torch(num_candidates=8, num_targets=2).key()


def test_class_problem_one_class_at_a_time():
  family = families.imagenet_shaped(norm=5.0, dim=32, num_candidates=50, num_targets=4,
                                    num_classes=3)
  t0, x0 = family.class_problem(0)
  t2, x2 = family.class_problem(2)
  assert t0.shape == (4, 32) and x0.shape == (50, 32) and x0.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(x0, axis=1).mean(), 5.0, rtol=1e-5)
  assert not np.array_equal(x0, x2) and (x2 >= 0).all()
  np.testing.assert_array_equal(family.class_problem(2)[1], x2)  # deterministic
  with pytest.raises(ValueError, match="class 3"):
    family.class_problem(3)

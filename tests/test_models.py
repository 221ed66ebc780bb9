"""The lightly CIFAR ResNet-18 backbone and torch-semantics (Split)BatchNorm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattr.models import BatchNorm, count_params, get_encoder


def test_resnet18_parameter_count_and_shapes():
  model = get_encoder("lightly_resnet18", num_splits=8)
  x = jnp.zeros((8, 32, 32, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  # lightly's ResNet-18 backbone: conv + BN weights/biases, no linear head.
  assert count_params(variables["params"]) == 11_168_832
  assert variables["batch_stats"]["bn1"]["mean"].shape == (8 * 64,)
  out = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
  assert out["feature"].shape == (8, 512)
  assert "maxpool" not in str(jax.tree_util.tree_structure(variables))


@pytest.mark.parametrize("width,size,dim", [(0.25, 32, 128), (0.125, 33, 64)])
def test_width_and_input_size(width, size, dim):
  model = get_encoder("lightly_resnet18", width=width)
  x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
  # Jitted: one compile rather than one per op (the test pins shapes).
  v = jax.jit(lambda k, x: model.init(k, x, train=False))(jax.random.key(1), x)
  f = jax.jit(lambda v, x: model.apply(v, x, train=False)["feature"])(v, x)
  assert f.shape == (2, dim) and bool(jnp.all(jnp.isfinite(f)))


def test_no_relu_after_stem_bn():
  """With a stem BN bias of -10 and no ReLU the stem output is negative (lightly's backbone)."""
  model = get_encoder("lightly_resnet18", width=0.125, stage_sizes=(1,))
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  v = model.init(jax.random.key(1), x, train=False)
  _, inter = model.apply(v, x, train=False, capture_intermediates=True)
  stem = inter["intermediates"]["bn1"]["__call__"][0]
  v = jax.tree_util.tree_map(lambda a: a, v)
  v["params"]["bn1"]["bias"] = jnp.full_like(v["params"]["bn1"]["bias"], -10.0)
  _, inter = model.apply(v, x, train=False, capture_intermediates=True)
  stem = inter["intermediates"]["bn1"]["__call__"][0]
  assert float(stem.max()) < 0


def _np_split_bn(x, scale, bias, splits, eps=1e-5):
  n, h, w, c = x.shape
  out = np.empty_like(x)
  means, vars_unbiased = np.zeros((splits, c)), np.zeros((splits, c))
  for s in range(splits):
    g = x[s::splits]  # torch's view(-1, C * splits, H, W): sample i -> group i % splits
    m = g.mean(axis=(0, 1, 2))
    v = g.var(axis=(0, 1, 2))
    out[s::splits] = (g - m) / np.sqrt(v + eps) * scale + bias
    means[s] = m
    vars_unbiased[s] = g.var(axis=(0, 1, 2), ddof=1)
  return out, means, vars_unbiased


def test_split_batchnorm_train_and_eval_against_numpy():
  rng = np.random.default_rng(0)
  splits, c = 4, 3
  x = rng.normal(2.0, 3.0, (8, 5, 5, c)).astype(np.float32)
  bn = BatchNorm(num_splits=splits)
  v = bn.init(jax.random.key(0), jnp.asarray(x), train=False)
  scale = rng.normal(size=c).astype(np.float32)
  bias = rng.normal(size=c).astype(np.float32)
  v = {
      "params": {
          "scale": jnp.asarray(scale),
          "bias": jnp.asarray(bias)
      },
      "batch_stats": v["batch_stats"]
  }
  y, upd = bn.apply(v, jnp.asarray(x), train=True, mutable=["batch_stats"])
  ref, means, vars_u = _np_split_bn(x, scale, bias, splits)
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-4)
  # Running stats: torch momentum 0.1 from (0, 1), unbiased variance, layout [splits * C].
  np.testing.assert_allclose(np.asarray(upd["batch_stats"]["mean"]), (0.1 * means).reshape(-1),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(upd["batch_stats"]["var"]),
                             (0.9 + 0.1 * vars_u).reshape(-1), rtol=1e-5)
  # Eval: statistics averaged over the groups.
  v2 = {"params": v["params"], "batch_stats": upd["batch_stats"]}
  y_eval = bn.apply(v2, jnp.asarray(x), train=False)
  m = (0.1 * means).mean(0)
  var = (0.9 + 0.1 * vars_u).mean(0)
  np.testing.assert_allclose(np.asarray(y_eval), (x - m) / np.sqrt(var + 1e-5) * scale + bias,
                             rtol=1e-4, atol=1e-4)


def test_split_batchnorm_rejects_indivisible_batch():
  bn = BatchNorm(num_splits=8)
  x = jnp.zeros((6, 2, 2, 3))
  v = bn.init(jax.random.key(0), x, train=False)
  with pytest.raises(ValueError, match="not divisible by num_splits 8"):
    bn.apply(v, x, train=True, mutable=["batch_stats"])

"""ResNet-9 and CIFAR MobileNetV2: parameter counts, shapes, and a golden check against torch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.torch_reference import torch_resnet9
from jaxattr import config
from jaxattr.counterfactual import ensemble
from jaxattr.models.layers import count_params
from jaxattr.models.mobilenetv2 import MobileNetV2
from jaxattr.models.resnet9 import (
    ResNet9,
    max_pool_2x2,
    resnet9_macs,
    resnet9_train_flops,
    strided_conv,
)


def _variables(model, size=32):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(
      (1, size, size, 3)), train=False))


def test_resnet9_parameter_count():
  v = _variables(ResNet9())
  # conv_bn weights as listed in REFERENCE.md section 3, BN scale + bias, the bias-free linear.
  convs = 3 * 64 * 9 + 64 * 128 * 25 + 2 * 128 * 128 * 9 + 128 * 256 * 9 + 2 * 256 * 256 * 9
  convs += 256 * 128 * 9
  bn = 2 * (64 + 128 + 128 + 128 + 256 + 256 + 256 + 128)
  linear = 128 * 10
  assert count_params(v["params"]) == convs + bn + linear == 2_274_880
  # Running mean and var of the 8 BatchNorms.
  assert count_params(v["batch_stats"]) == bn


def test_resnet9_flops():
  assert resnet9_macs() == 291_308_800  # ~0.29 GMAC forward, REFERENCE.md section 3
  assert resnet9_train_flops() == pytest.approx(1.75e9, rel=0.01)


def test_mobilenetv2_parameter_count_and_width():
  assert count_params(_variables(MobileNetV2())["params"]) == 2_296_922
  small = MobileNetV2(width=0.25, num_classes=7)
  x = jnp.zeros((2, 32, 32, 3))
  # Jitted: one compile rather than one per op (the test pins shapes).
  v = jax.jit(lambda k, x: small.init(k, x, train=False))(jax.random.key(0), x)
  out, _ = jax.jit(lambda v, x: small.apply(v, x, train=True, mutable=["batch_stats"]))(v, x)
  assert out["logits"].shape == (2, 7) and out["feature"].shape == (2, 320)


def test_resnet9_width_shapes_and_bf16():
  model = ResNet9(width=0.125, num_classes=10, dtype=jnp.bfloat16)
  x = jnp.zeros((3, 32, 32, 3))
  v = jax.jit(lambda k, x: model.init(k, x, train=False))(jax.random.key(0), x)
  assert v["params"]["conv1"]["conv"]["kernel"].dtype == jnp.float32  # params stay float32
  out = jax.jit(lambda v, x: model.apply(v, x, train=False))(v, x)
  assert out["logits"].shape == (3, 10) and out["logits"].dtype == jnp.float32
  assert out["feature"].shape == (3, 16)


@pytest.mark.torch
def test_resnet9_matches_torch_reference():
  """Same weights in the torch reference ResNet-9 give the same logits (eval and train mode)."""
  torch = pytest.importorskip("torch")
  tnn = torch.nn
  width = 0.125
  torch.manual_seed(0)
  ref = torch_resnet9(width)  # the same module the training benchmark times
  convs = [m for m in ref.modules() if isinstance(m, tnn.Conv2d)]
  bns = [m for m in ref.modules() if isinstance(m, tnn.BatchNorm2d)]
  with torch.no_grad():
    for bn in bns:  # non-trivial affine and running statistics
      bn.weight.uniform_(0.5, 1.5)
      bn.bias.uniform_(-0.2, 0.2)
      bn.running_mean.uniform_(-0.1, 0.1)
      bn.running_var.uniform_(0.5, 2.0)
  names = ["conv1", "conv2", "res1a", "res1b", "conv3", "res2a", "res2b", "conv4"]
  params = {"linear": {"kernel": jnp.asarray(ref[-2].weight.detach().numpy().T)}}
  stats = {}
  for name, c, bn in zip(names, convs, bns):
    kernel = jnp.asarray(c.weight.detach().numpy().transpose(2, 3, 1, 0))
    params[name] = {
        "conv": {
            "kernel": kernel
        },
        "bn": {
            "scale": jnp.asarray(bn.weight.detach().numpy()),
            "bias": jnp.asarray(bn.bias.detach().numpy())
        }
    }
    stats[name] = {
        "bn": {
            "mean": jnp.asarray(bn.running_mean.numpy()),
            "var": jnp.asarray(bn.running_var.numpy())
        }
    }
  model = ResNet9(width=width)
  x = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2))
  ref.eval()
  want = ref(xt).detach().numpy()  # includes the 0.2 output scale
  got = model.apply({"params": params, "batch_stats": stats}, jnp.asarray(x))["logits"]
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
  ref.train()
  want = ref(xt).detach().numpy()  # includes the 0.2 output scale
  got, new = model.apply({
      "params": params,
      "batch_stats": stats
  }, jnp.asarray(x), train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(np.asarray(got["logits"]), want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(new["batch_stats"]["conv1"]["bn"]["var"]),
                             bns[0].running_var.numpy(), rtol=1e-4)


@pytest.mark.parametrize("size,kernel,stride,padding", [(16, 5, 2, 2), (15, 3, 2, 1), (17, 5, 2, 0),
                                                        (12, 4, 3, 1)])
def test_strided_conv_space_to_depth_gradient_is_exact(size, kernel, stride, padding):
  """strided_conv's values and both gradients equal XLA's strided convolution's."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, size, size, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(kernel, kernel, 4, 5)), jnp.float32)

  def lax_conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (stride,) * 2, ((padding, padding),) * 2,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  want = lax_conv(x, w)
  got = strided_conv(x, w, stride, padding)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))  # same forward op
  g = jnp.asarray(rng.normal(size=want.shape), jnp.float32)
  want_grads = jax.grad(lambda x, w: jnp.sum(lax_conv(x, w) * g), (0, 1))(x, w)
  got_grads = jax.grad(lambda x, w: jnp.sum(strided_conv(x, w, stride, padding) * g), (0, 1))(x, w)
  for a, b in zip(got_grads, want_grads):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_max_pool_2x2_matches_reduce_window():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 7, 6, 3)), jnp.float32)  # odd rows are floored, as torch
  want = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
  np.testing.assert_array_equal(np.asarray(max_pool_2x2(x)), np.asarray(want))


def test_cpu_formulations_match_plain_model():
  """s2d_grad changes neither variables nor values, gradients or running stats."""
  rng = np.random.default_rng(1)
  plain, fast = ResNet9(width=0.125), ResNet9(width=0.125, s2d_grad=True)
  x = jnp.asarray(rng.normal(size=(4, 32, 32, 3)), jnp.float32)
  v = plain.init(jax.random.key(0), x, train=False)
  v2 = fast.init(jax.random.key(0), x, train=False)
  assert jax.tree_util.tree_structure(v) == jax.tree_util.tree_structure(v2)
  assert all(
      bool((a == b).all())
      for a, b in zip(jax.tree_util.tree_leaves(v), jax.tree_util.tree_leaves(v2)))

  def loss(model, params):
    out, new = model.apply({
        "params": params,
        "batch_stats": v["batch_stats"]
    }, x, train=True, mutable=["batch_stats"])
    return jnp.sum(out["logits"]**2), new["batch_stats"]

  (la, sa), ga = jax.value_and_grad(lambda p: loss(plain, p), has_aux=True)(v["params"])
  (lb, sb), gb = jax.value_and_grad(lambda p: loss(fast, p), has_aux=True)(v["params"])
  np.testing.assert_allclose(float(lb), float(la), rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves((ga, sa)), jax.tree_util.tree_leaves((gb, sb))):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-3, atol=1e-5)
  np.testing.assert_allclose(np.asarray(fast.apply(v, x)["logits"]),
                             np.asarray(plain.apply(v, x)["logits"]), rtol=1e-5, atol=1e-6)


def test_ensemble_classifier_resolves_model_and_cpu_ops():
  """The trainer's `classifier`: config.model, width and the cpu_ops switch of ResNet-9."""
  cfg = config.trainer_section()
  cfg.update({"width": 0.125, "cpu_ops": "on"})
  model = ensemble.classifier(cfg, 7)
  assert isinstance(model, ResNet9) and model.s2d_grad and model.num_classes == 7
  cfg.cpu_ops = "off"
  assert not ensemble.classifier(cfg, 7).s2d_grad
  cfg.model = "mobilenetv2"
  assert isinstance(ensemble.classifier(cfg, 7), MobileNetV2)
  cfg.model, cfg.cpu_ops = "resnet9", "fast"
  with pytest.raises(ValueError, match="cpu_ops"):
    ensemble.classifier(cfg, 7)

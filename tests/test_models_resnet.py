"""Shapes and parameter counts of the torchvision-compatible ResNets (no PyTorch needed)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import folding
from jaxattr.models import layers, resnet
from jaxattr.models.layers import count_params


@pytest.mark.parametrize(
    "ctor, expected",
    [
        # torchvision's documented sizes with the 1000-class fc.
        (resnet.ResNet18, 11_689_512),
        (resnet.ResNet50, 25_557_032),
    ])
def test_param_counts_match_torchvision(ctor, expected):
  model = ctor(num_classes=1000)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  assert count_params(shapes["params"]) == expected
  assert model.feature_dim == (512 if ctor is resnet.ResNet18 else 2048)


@pytest.mark.parametrize("ctor", [resnet.ResNet18, resnet.ResNet50])
def test_tiny_forward_and_train_step(ctor):
  model = ctor(width=0.125, num_classes=5)
  x = jax.random.normal(jax.random.key(1), (2, 37, 37, 3))

  # Random variables of the right shapes: compiling flax's truncated-normal init of every
  # kernel shape costs more CPU time than the rest of this test.
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  rng = np.random.default_rng(0)
  variables = {
      "params":
          jax.tree_util.tree_map(lambda s: (rng.normal(size=s.shape) * 0.1).astype(np.float32),
                                 shapes["params"]),
      "batch_stats":
          jax.tree_util.tree_map(lambda s: np.full(s.shape, 0.5, np.float32),
                                 shapes["batch_stats"]),
  }

  @jax.jit  # one compilation for all three applies
  def run(variables, x):
    out = model.apply(variables, x, train=False)
    _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    bf16 = ctor(width=0.125, dtype=jnp.bfloat16).apply(variables, x)
    return out, updates, bf16

  out, updates, bf16 = run(variables, x)
  assert out["feature"].shape == (2, model.feature_dim) and out["logits"].shape == (2, 5)
  assert out["feature"].dtype == jnp.float32
  changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), variables["batch_stats"],
                                   updates["batch_stats"])
  assert all(jax.tree_util.tree_leaves(changed))
  assert bf16["feature"].dtype == jnp.float32 and "logits" not in bf16
  assert float(jnp.abs(bf16["feature"] -
                       out["feature"]).max()) < 0.1 * float(jnp.abs(out["feature"]).max())


def test_v15_stride_on_3x3_conv():
  """ResNet-50 v1.5: the downsampling Bottleneck's 1x1 conv keeps stride 1 (torchvision)."""
  model = resnet.ResNet50(width=0.125)
  x = jnp.zeros((1, 64, 64, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  _, state = jax.eval_shape(
      lambda v: model.apply(v, x, capture_intermediates=True, mutable=["intermediates"]), variables)
  inter = state["intermediates"]["layer2_0"]
  assert inter["conv1"]["__call__"][0].shape[1:3] == (16, 16)  # after stem + pool: 16x16
  assert inter["conv2"]["__call__"][0].shape[1:3] == (8, 8)


def test_fold_batchnorm_is_exact():
  """Inference with BN folded into the convs == the model's own eval apply (both families)."""
  from jaxattr.models import cifar_resnet  # pylint: disable=g-import-not-at-top

  models = [
      cifar_resnet.LightlyResNet18(width=0.125, num_splits=8),
      resnet.ResNet50(width=0.125, num_classes=3)
  ]
  x = jax.random.normal(jax.random.key(1), (2, 35, 35, 3))
  rng = np.random.default_rng(0)
  for model in models:
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    variables = jax.tree_util.tree_map(
        lambda s: (rng.normal(size=s.shape) * 0.2).astype(np.float32), shapes)
    variables["batch_stats"] = jax.tree_util.tree_map(lambda a: np.abs(a) + 0.5,
                                                      variables["batch_stats"])

    @jax.jit
    def both(variables, x, model=model):
      params, biases = folding.fold_batchnorm(variables)
      return model.apply(variables, x, train=False), folding.apply_folded(model, params, biases, x)

    ref, out = both(variables, x)
    assert set(ref) == set(out)
    for k in ref:
      err = float(jnp.abs(ref[k] - out[k]).max() / jnp.abs(ref[k]).max())
      assert err < 1e-5, (k, err)
    params, _ = folding.fold_batchnorm(variables)
    assert "bn1" not in params and "scale" not in str(jax.tree_util.tree_structure(params))


def test_stem_pool_gradient_routes_like_torch():
  """The 3x3 / 2 stem pool's custom gradient sends each window's gradient to its first maximum,
  as torch's max_pool2d does (ties included); values equal XLA's reduce_window."""
  torch = pytest.importorskip("torch")
  from jaxattr.models import layers  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 8, 10, 3)).astype(np.float32)
  x[0, 2:5, 2:5, 0] = 1.5  # a plateau: ties inside several windows
  g = rng.normal(size=(2, 4, 5, 3)).astype(np.float32)
  y, vjp = jax.vjp(lambda a: layers.max_pool(a, 3, 2, 1), jnp.asarray(x))
  (gx,) = vjp(jnp.asarray(g))
  xt = torch.tensor(x).permute(0, 3, 1, 2).requires_grad_()
  yt = torch.nn.functional.max_pool2d(xt, 3, 2, 1)
  yt.backward(torch.tensor(g).permute(0, 3, 1, 2))
  np.testing.assert_array_equal(np.asarray(y), yt.detach().permute(0, 2, 3, 1).numpy())
  np.testing.assert_allclose(np.asarray(gx), xt.grad.permute(0, 2, 3, 1).numpy(), atol=1e-6)


def test_small_stem_blurpool_resnet18_for_64px():
  """The counterfactual ResNet-18 ('small' stem, BlurPool): torchvision's parameter tree except
  conv1's 3x3 kernel; 64 px in, 2x2 at layer4."""
  model = resnet.ResNet18(num_classes=10, stem="small", blurpool=True)
  v = model.init(jax.random.key(0), jnp.zeros((2, 64, 64, 3)))
  assert v["params"]["conv1"]["kernel"].shape == (3, 3, 3, 64)
  assert count_params(v["params"]) == 11_173_962
  out = model.apply(v, jnp.ones((2, 64, 64, 3)))
  assert out["logits"].shape == (2, 10) and out["feature"].shape == (2, 512)


def test_patch_convolutions_equal_xla_convolutions():
  """patch_below routes small convs through patch matrix products: same parameters, the same
  outputs and gradients within float32 rounding (layer3 and layer4 of a 32 px input)."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32))
  plain = resnet.ResNet18(num_classes=5, stem="small", width=0.25)
  patched = resnet.ResNet18(num_classes=5, stem="small", width=0.25, patch_below=16)
  v = plain.init(jax.random.key(0), x)
  assert jax.tree_util.tree_structure(v) == jax.tree_util.tree_structure(
      patched.init(jax.random.key(0), x))

  def loss(model, p):
    out, _ = model.apply({
        "params": p,
        "batch_stats": v["batch_stats"]
    }, x, train=True, mutable=["batch_stats"])
    return jnp.sum(out["logits"]**2), out["logits"]

  (a, la), ga = jax.value_and_grad(lambda p: loss(plain, p), has_aux=True)(v["params"])
  (b, lb), gb = jax.value_and_grad(lambda p: loss(patched, p), has_aux=True)(v["params"])
  np.testing.assert_allclose(lb, la, rtol=1e-4, atol=1e-4)
  for u, w in zip(jax.tree_util.tree_leaves(ga), jax.tree_util.tree_leaves(gb)):
    np.testing.assert_allclose(w, u, rtol=1e-3, atol=1e-4 * float(jnp.abs(u).max()) + 1e-6)


def test_materialize_is_the_identity_and_a_fusion_boundary():
  """layers.materialize: the same values and gradients, for every float including non-finite
  ones, and a conditional that survives XLA:CPU's optimisations, so that
  XLA:CPU stores the value instead of recomputing it inside its consumers. Under vmap it
  stays the identity. A BlurPool ResNet-18 that stores its conv inputs has the gradients of one
  that does not (within float32 rounding)."""
  x = jnp.asarray([[np.inf, -np.inf, np.nan, 0.0, -0.0, 1e30, -1e-30, 3.0]], jnp.float32)
  np.testing.assert_array_equal(np.asarray(layers.materialize(x)), np.asarray(x))
  np.testing.assert_array_equal(np.asarray(jax.vmap(layers.materialize)(x)), np.asarray(x))
  assert np.signbit(np.asarray(layers.materialize(x))[0, 4])  # -0.0 kept

  def f(v, s):
    return jnp.sum(jnp.sin(layers.materialize(jax.nn.relu(v * s + 1.0))) * v)

  v = jnp.linspace(-2.0, 2.0, 48).reshape(2, 3, 8)
  s = jnp.linspace(0.5, 1.5, 8)
  g = jax.grad(f, argnums=(0, 1))(v, s)
  g_ref = jax.grad(lambda v, s: jnp.sum(jnp.sin(jax.nn.relu(v * s + 1.0)) * v), (0, 1))(v, s)
  for a, b in zip(g, g_ref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  if jax.default_backend() == "cpu":  # the backend it is for (the trainer's cpu_ops)
    hlo = jax.jit(jax.grad(f, argnums=(0, 1))).lower(v, s).compile().as_text()
    assert " conditional(" in hlo, "XLA removed layers.materialize's conditional"

  img = jnp.asarray(np.random.default_rng(1).normal(size=(4, 32, 32, 3)).astype(np.float32))
  plain = resnet.ResNet18(num_classes=5, stem="small", width=0.25, blurpool=True)
  stored = resnet.ResNet18(num_classes=5, stem="small", width=0.25, blurpool=True, materialize=True)
  var = plain.init(jax.random.key(0), img)

  def loss(model, p):
    out, _ = model.apply({
        "params": p,
        "batch_stats": var["batch_stats"]
    }, img, train=True, mutable=["batch_stats"])
    return jnp.sum(out["logits"]**2)

  ga = jax.jit(jax.grad(lambda p: loss(plain, p)))(var["params"])
  gb = jax.jit(jax.grad(lambda p: loss(stored, p)))(var["params"])
  for u, w in zip(jax.tree_util.tree_leaves(ga), jax.tree_util.tree_leaves(gb)):
    np.testing.assert_allclose(np.asarray(w), np.asarray(u), rtol=1e-5,
                               atol=1e-6 * float(jnp.abs(u).max()))
  with pytest.raises(ValueError, match="materialize is implemented for BasicBlock"):
    resnet.ResNet50(materialize=True).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))

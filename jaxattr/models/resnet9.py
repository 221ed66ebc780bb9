"""The ResNet-9 of the counterfactual recipe (FFCV / KakaoBrain style), REFERENCE.md section 3.

    conv_bn(3, 64, k3) ; conv_bn(64, 128, k5, stride 2, pad 2) ;
    residual(conv_bn(128, 128), conv_bn(128, 128)) ; conv_bn(128, 256, k3) ; maxpool 2 ;
    residual(conv_bn(256, 256), conv_bn(256, 256)) ; conv_bn(256, 128, k3, pad 0) ;
    global max pool ; linear(128, num_classes, no bias) ; x 0.2

conv_bn = conv (no bias) -> BatchNorm (torch semantics) -> ReLU; residual(f) = x + f(x).
At width 1 it has 2,274,880 parameters and costs about 0.29 GMAC per 32x32 image forward.
`width` scales every channel count (rounded, at least 1) so tests and the CPU can run it small.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxattr.models.layers import BatchNorm

Dtype = Any

# torch.nn.Conv2d / Linear default init (kaiming_uniform with a=sqrt(5)): U(+-1/sqrt(fan_in)).
# The reference trains from torch's default init; with BatchNorm and weight decay the weight
# scale sets the effective learning rate, so it matters for matching the recipe.
TORCH_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_conv(features: int, kernel: int, stride: int = 1, padding: int | None = None,
               dtype: Dtype = jnp.float32, name: str | None = None, groups: int = 1) -> nn.Conv:
  """`layers.conv` (torch-style symmetric padding, no bias) with torch's default init."""
  if padding is None:
    padding = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((padding, padding), (padding, padding)), use_bias=False,
                 feature_group_count=groups, dtype=dtype, name=name, kernel_init=TORCH_INIT)


def _conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
  """Cross-correlation NHWC x HWIO -> NHWC with symmetric zero padding (torch Conv2d)."""
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((padding, padding),) * 2,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _space_to_depth_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
  """`_conv` rewritten as a stride-1 convolution on a space-to-depth input (same result).

  With the kernel zero-padded to kk = ceil(k / s) * s, output pixel (y, x) reads the padded
  input block [s*y, s*y + kk) and that block is a (kk/s) x (kk/s) window of s x s cells of
  the space-to-depth image [B, Hp/s, Wp/s, s*s*C]. Its gradients are stride-1 convolutions
  and reshapes, where XLA:CPU's gradient of a strided convolution (a base-dilated convolution)
  is slow.
  """
  s, k = stride, kernel.shape[0]
  b, h, w, c = x.shape
  kk = -(-k // s) * s
  ho, wo = (h + 2 * padding - k) // s + 1, (w + 2 * padding - k) // s + 1
  hp, wp = (ho - 1) * s + kk, (wo - 1) * s + kk  # padded rows / columns that outputs read
  xp = jnp.pad(x, ((0, 0), (padding, max(0, hp - h - padding)), (padding, max(0, wp - w - padding)),
                   (0, 0)))[:, :hp, :wp]
  xs = xp.reshape(b, hp // s, s, wp // s, s, c).transpose(0, 1, 3, 2, 4, 5)
  xs = xs.reshape(b, hp // s, wp // s, s * s * c)
  kp = jnp.pad(kernel, ((0, kk - k), (0, kk - k), (0, 0), (0, 0)))
  ks = kp.reshape(kk // s, s, kk // s, s, c, -1).transpose(0, 2, 1, 3, 4, 5)
  ks = ks.reshape(kk // s, kk // s, s * s * c, -1)
  return _conv(xs, ks, 1, 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def strided_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
  """A strided `_conv` whose gradients are those of `_space_to_depth_conv`.

  The forward pass stays XLA's strided convolution (fast everywhere); only the backward pass
  takes the space-to-depth route. The two are the same linear map, so the gradients are exact.
  """
  return _conv(x, kernel, stride, padding)


def _strided_conv_fwd(x, kernel, stride, padding):
  return _conv(x, kernel, stride, padding), (x, kernel)


def _strided_conv_bwd(stride, padding, residuals, g):
  x, kernel = residuals
  # The forward value computed inside vjp is unused, so XLA drops it.
  _, vjp = jax.vjp(lambda a, b: _space_to_depth_conv(a, b, stride, padding), x, kernel)
  return vjp(g)


strided_conv.defvjp(_strided_conv_fwd, _strided_conv_bwd)


class Conv(nn.Module):
  """torch.nn.Conv2d without bias (torch init, symmetric padding), NHWC.

  Same parameter tree as `torch_conv` ({'kernel': [k, k, in, out]}). With `s2d_grad`, a
  strided convolution is differentiated through `strided_conv` (see there).
  """

  features: int
  kernel: int
  stride: int = 1
  padding: int = 0
  dtype: Dtype = jnp.float32
  s2d_grad: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", TORCH_INIT,
                        (self.kernel, self.kernel, x.shape[-1], self.features), jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if self.s2d_grad and self.stride > 1:
      return strided_conv(x, kernel, self.stride, self.padding)
    return _conv(x, kernel, self.stride, self.padding)


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """torch.nn.MaxPool2d(2) on NHWC [B, H, W, C] -> [B, H // 2, W // 2, C].

  A reshape and a max rather than reduce_window: XLA:CPU differentiates reduce_window max
  through select-and-scatter (iotas, a variadic reduce_window and a scatter), which cost as
  much as a convolution here. The gradient of the max then goes to every tied maximum split
  evenly rather than to the first; ties have measure zero except at 0 after a ReLU, where the
  ReLU's gradient is 0 anyway.
  """
  b, h, w, c = x.shape
  x = x[:, :h // 2 * 2, :w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c)
  return jnp.max(x, axis=(2, 4))


# (name, in -> out channels at width 1, kernel, stride, padding) of every conv_bn, in order.
_CONVS = (
    ("conv1", 3, 64, 3, 1, 1),
    ("conv2", 64, 128, 5, 2, 2),
    ("res1a", 128, 128, 3, 1, 1),
    ("res1b", 128, 128, 3, 1, 1),
    ("conv3", 128, 256, 3, 1, 1),
    ("res2a", 256, 256, 3, 1, 1),
    ("res2b", 256, 256, 3, 1, 1),
    ("conv4", 256, 128, 3, 1, 0),
)


def scaled(channels: int, width: float) -> int:
  """Channel count at a width multiplier (rounded, at least 1)."""
  return max(1, int(round(channels * width)))


class ConvBN(nn.Module):
  """conv (no bias) -> BatchNorm -> ReLU."""

  features: int
  kernel: int = 3
  stride: int = 1
  padding: int = 1
  dtype: Dtype = jnp.float32
  s2d_grad: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = Conv(self.features, self.kernel, self.stride, self.padding, dtype=self.dtype,
             s2d_grad=self.s2d_grad, name="conv")(x)
    x = BatchNorm(dtype=self.dtype, name="bn")(x, train)
    return nn.relu(x)


class ResNet9(nn.Module):
  """ResNet-9 classifier on normalised NHWC images.

  Attributes:
    num_classes: output classes.
    width: channel multiplier (1.0 = the reference).
    dtype: compute dtype (parameters stay float32).
    s2d_grad: differentiate the stride-2 conv through a space-to-depth stride-1 conv (same
      values and gradients; much faster backward on XLA:CPU, see `strided_conv`).
  """

  num_classes: int = 10
  width: float = 1.0
  dtype: Dtype = jnp.float32
  s2d_grad: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    """Maps images [B, H, W, 3] to {'feature': [B, 128 * width], 'logits': [B, classes]}."""
    x = x.astype(self.dtype)

    def block(name: str, h: jax.Array) -> jax.Array:
      spec = {c[0]: c for c in _CONVS}[name]
      _, _, out, k, s, p = spec
      return ConvBN(scaled(out, self.width), k, s, p, self.dtype, self.s2d_grad, name=name)(h,
                                                                                            train)

    x = block("conv1", x)
    x = block("conv2", x)
    x = x + block("res1b", block("res1a", x))
    x = block("conv3", x)
    x = max_pool_2x2(x)
    x = x + block("res2b", block("res2a", x))
    x = block("conv4", x)
    feature = jnp.max(x, axis=(1, 2))  # global max pool: [B, C]
    logits = nn.Dense(self.num_classes, use_bias=False, dtype=self.dtype, kernel_init=TORCH_INIT,
                      name="linear")(feature)
    logits = logits.astype(jnp.float32) * 0.2
    return {"feature": feature.astype(jnp.float32), "logits": logits}


def resnet9_macs(width: float = 1.0, size: int = 32, num_classes: int = 10) -> int:
  """Multiply-accumulates of one forward pass on a size x size image (convs + linear).

  BatchNorm, ReLU and pooling are ignored (a fraction of a percent).
  """
  macs = 0
  hw = size
  for name, cin, cout, k, s, p in _CONVS:
    cin = 3 if name == "conv1" else scaled(cin, width)
    cout = scaled(cout, width)
    hw = (hw + 2 * p - k) // s + 1
    macs += hw * hw * k * k * cin * cout
    if name == "conv3":
      hw //= 2  # the max pool after conv3
  return macs + scaled(128, width) * num_classes


def resnet9_train_flops(width: float = 1.0, size: int = 32, num_classes: int = 10) -> float:
  """FLOPs of one training step per image: forward + backward ~ 3 x forward, 2 FLOPs per MAC."""
  return 6.0 * resnet9_macs(width, size, num_classes)

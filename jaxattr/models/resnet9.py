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

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxattr.models.layers import BatchNorm, max_pool

Dtype = Any

# torch.nn.Conv2d / Linear default init (kaiming_uniform with a=sqrt(5)): U(+-1/sqrt(fan_in)).
# The reference trains from torch's default init; with BatchNorm and weight decay the weight
# scale sets the effective learning rate, so it matters for matching the recipe.
TORCH_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_conv(features: int, kernel: int, stride: int = 1, padding: int | None = None,
               dtype: Dtype = jnp.float32, name: str | None = None,
               groups: int = 1) -> nn.Conv:
  """`layers.conv` (torch-style symmetric padding, no bias) with torch's default init."""
  if padding is None:
    padding = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((padding, padding), (padding, padding)), use_bias=False,
                 feature_group_count=groups, dtype=dtype, name=name, kernel_init=TORCH_INIT)

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

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = torch_conv(self.features, self.kernel, self.stride, self.padding, dtype=self.dtype,
                   name="conv")(x)
    x = BatchNorm(dtype=self.dtype, name="bn")(x, train)
    return nn.relu(x)


class ResNet9(nn.Module):
  """ResNet-9 classifier on normalised NHWC images.

  Attributes:
    num_classes: output classes.
    width: channel multiplier (1.0 = the reference).
    dtype: compute dtype (parameters stay float32).
  """

  num_classes: int = 10
  width: float = 1.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    """Maps images [B, H, W, 3] to {'feature': [B, 128 * width], 'logits': [B, classes]}."""
    x = x.astype(self.dtype)

    def block(name: str, h: jax.Array) -> jax.Array:
      spec = {c[0]: c for c in _CONVS}[name]
      _, _, out, k, s, p = spec
      return ConvBN(scaled(out, self.width), k, s, p, self.dtype, name=name)(h, train)

    x = block("conv1", x)
    x = block("conv2", x)
    x = x + block("res1b", block("res1a", x))
    x = block("conv3", x)
    x = max_pool(x, 2, 2)
    x = x + block("res2b", block("res2a", x))
    x = block("conv4", x)
    feature = jnp.max(x, axis=(1, 2))  # global max pool: [B, C]
    logits = nn.Dense(self.num_classes, use_bias=False, dtype=self.dtype,
                      kernel_init=TORCH_INIT, name="linear")(feature)
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

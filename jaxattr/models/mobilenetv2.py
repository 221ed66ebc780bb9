"""MobileNetV2, CIFAR variant (the architecture-transfer ablation of REFERENCE.md section 3).

The widely used CIFAR adaptation of Sandler et al. 2018: a stride-1 3x3 stem with 32 channels,
inverted-residual blocks (1x1 expand -> BN -> ReLU -> 3x3 depthwise -> BN -> ReLU -> 1x1 project
-> BN), strides 1,1,2,2,1,2,1 per stage (the first two reductions of ImageNet's version removed
for 32x32 inputs), a 1x1 conv to 1280 channels, BN, ReLU, global average pool and a linear layer
with bias (initialised at zero; torch draws it uniformly). Convs and the linear weight use
torch's default init. A residual connection is used in every stride-1 block; when its channel
count changes the shortcut is a 1x1 conv + BN. At width 1 and 10 classes it has 2,296,922
parameters.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxattr.models.layers import BatchNorm
from jaxattr.models.resnet9 import TORCH_INIT, scaled, torch_conv as conv

Dtype = Any

# (expansion, output channels, blocks, stride of the first block) per stage.
STAGES = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
          (6, 320, 1, 1))


class InvertedResidual(nn.Module):
  """Expand (1x1) -> depthwise 3x3 -> project (1x1), with a shortcut when stride is 1."""

  in_features: int
  features: int
  expansion: int
  stride: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    hidden = self.expansion * self.in_features
    h = conv(hidden, 1, padding=0, dtype=self.dtype, name="conv1")(x)
    h = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(h, train))
    h = conv(hidden, 3, self.stride, 1, dtype=self.dtype, groups=hidden, name="conv2")(h)
    h = nn.relu(BatchNorm(dtype=self.dtype, name="bn2")(h, train))
    h = conv(self.features, 1, padding=0, dtype=self.dtype, name="conv3")(h)
    h = BatchNorm(dtype=self.dtype, name="bn3")(h, train)
    if self.stride != 1:
      return h
    if self.in_features != self.features:
      x = conv(self.features, 1, padding=0, dtype=self.dtype, name="shortcut_conv")(x)
      x = BatchNorm(dtype=self.dtype, name="shortcut_bn")(x, train)
    return h + x


class MobileNetV2(nn.Module):
  """CIFAR MobileNetV2 classifier on normalised NHWC images.

  Attributes:
    num_classes: output classes.
    width: channel multiplier applied to every layer (1.0 = the reference).
    dtype: compute dtype (parameters stay float32).
  """

  num_classes: int = 10
  width: float = 1.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    """Maps images [B, H, W, 3] to {'feature': [B, 1280 * width], 'logits': [B, classes]}."""
    x = x.astype(self.dtype)
    c = scaled(32, self.width)
    x = conv(c, 3, 1, 1, dtype=self.dtype, name="conv1")(x)
    x = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(x, train))
    for i, (expansion, out, blocks, stride) in enumerate(STAGES):
      out = scaled(out, self.width)
      for j in range(blocks):
        x = InvertedResidual(c, out, expansion, stride if j == 0 else 1, self.dtype,
                             name=f"layer{i}_{j}")(x, train)
        c = out
    x = conv(scaled(1280, self.width), 1, padding=0, dtype=self.dtype, name="conv2")(x)
    x = nn.relu(BatchNorm(dtype=self.dtype, name="bn2")(x, train))
    feature = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=TORCH_INIT,
                      name="linear")(feature)
    return {"feature": feature, "logits": logits.astype(jnp.float32)}

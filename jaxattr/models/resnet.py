"""torchvision-compatible ImageNet ResNets (ResNet-18/34 BasicBlock, ResNet-50/101/152 v1.5).

ImageNet stem: 7x7 stride-2 conv (padding 3) + BN + ReLU + 3x3 stride-2 max-pool (padding 1), all
with torch's symmetric padding (XLA's 'SAME' would pad stride-2 layers on one side only and shift
every feature map). ResNet-50 is v1.5 as in torchvision: the stride of a downsampling Bottleneck
sits on its 3x3 conv, not on the first 1x1.

Submodule names mirror torchvision's state_dict keys with '.' between a stage and its block index
replaced by '_' (`layer1.0.conv1.weight` -> `layer1_0/conv1/kernel`, `layer2.0.downsample.0` ->
`layer2_0/downsample_conv`, `downsample.1` -> `downsample_bn`, `fc` -> `fc`), so
`jaxattr.convert` only renames and transposes.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxattr.models import cifar_resnet
from jaxattr.models.layers import BatchNorm, conv, max_pool


class BasicBlock(cifar_resnet.BasicBlock):
  """torchvision's BasicBlock: lightly's (`cifar_resnet.BasicBlock`), shortcut 'downsample'."""

  shortcut: str = "downsample"


class Bottleneck(nn.Module):
  """torchvision Bottleneck (v1.5): 1x1 -> 3x3 (stride here) -> 1x1 (4x planes)."""

  planes: int
  stride: int = 1
  dtype: Any = jnp.float32
  axis_name: str | None = None
  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    bn = functools.partial(BatchNorm, dtype=self.dtype, axis_name=self.axis_name)
    out = self.planes * self.expansion
    y = conv(self.planes, 1, 1, 0, self.dtype, name="conv1")(x)
    y = nn.relu(bn(name="bn1")(y, train))
    y = conv(self.planes, 3, self.stride, 1, self.dtype, name="conv2")(y)
    y = nn.relu(bn(name="bn2")(y, train))
    y = conv(out, 1, 1, 0, self.dtype, name="conv3")(y)
    y = bn(name="bn3")(y, train)
    if self.stride != 1 or x.shape[-1] != out:
      x = conv(out, 1, self.stride, 0, self.dtype, name="downsample_conv")(x)
      x = bn(name="downsample_bn")(x, train)
    return nn.relu(y + x)


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}
# stem -> conv1's (kernel, stride, padding); the 3x3 / 2 max-pool follows either way.
# 'imagenet': torchvision's 7x7 / 2 (224 px -> 56 px into layer1).
# 'small': a 3x3 / 1 conv for 32-64 px inputs (64 px -> 32 px into layer1, 2x2 at layer4), the
#   counterfactual ResNet-18 of the resident 64 px ImageNet (README "ImageNet counterfactuals").
STEMS = {"imagenet": (7, 2, 3), "small": (3, 1, 1)}


class ResNet(nn.Module):
  """torchvision ResNet: images [B, H, W, 3] -> {'feature': [B, D]} (+ 'logits': [B, classes]).

  Attributes:
    stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18, (3, 4, 6, 3) for ResNet-50.
    block: 'basic' (expansion 1) or 'bottleneck' (expansion 4).
    num_classes: if set, a final linear layer `fc` also returns 'logits' (torchvision's head).
    width: channel multiplier on the 64 base channels; 1.0 is torchvision, smaller widths exist
      only for fast tests.
    dtype: compute dtype (params and batch statistics stay float32; the feature is float32).
    stem: 'imagenet' (torchvision's) or 'small' (`STEMS`).
    blurpool: BlurPool before the strided convs of the blocks (ffcv-imagenet's `use_blurpool`).
    axis_name: a mesh axis over which BatchNorm computes training statistics (data parallel).
    patch_below: BasicBlock convs with at most this many output pixels run as one matrix
      product of their patches (`layers.patch_conv`: same values; XLA:CPU's weight gradient of
      a 2 x 2-output convolution is pathologically slow). 0: never.
    materialize: BasicBlock conv inputs stored once (`layers.materialize`: XLA:CPU otherwise
      recomputes BatchNorm, ReLU, residual sums and BlurPool inside the weight gradients'
      transposes). Same values.
  """

  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  block: str = "basic"
  num_classes: int | None = None
  width: float = 1.0
  dtype: Any = jnp.float32
  stem: str = "imagenet"
  blurpool: bool = False
  axis_name: str | None = None
  patch_below: int = 0
  materialize: bool = False

  @property
  def feature_dim(self) -> int:
    return int(64 * self.width) * 8 * BLOCKS[self.block].expansion

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    if self.block not in BLOCKS:
      raise ValueError(f"unknown ResNet block {self.block!r}; known: {sorted(BLOCKS)}")
    block = BLOCKS[self.block]
    base = int(64 * self.width)
    if self.stem not in STEMS:
      raise ValueError(f"unknown ResNet stem {self.stem!r}; known: {sorted(STEMS)}")
    if self.blurpool and self.block != "basic":
      raise ValueError("blurpool is implemented for BasicBlock ResNets (ResNet-18/34) only")
    kernel, stride, padding = STEMS[self.stem]
    x = x.astype(self.dtype)
    x = conv(base, kernel, stride, padding, self.dtype, name="conv1")(x)
    x = nn.relu(BatchNorm(dtype=self.dtype, axis_name=self.axis_name, name="bn1")(x, train))
    x = max_pool(x, 3, 2, 1)
    extra = {"blurpool": self.blurpool} if self.blurpool else {}
    if self.patch_below:
      if self.block != "basic":
        raise ValueError("patch_below is implemented for BasicBlock ResNets (ResNet-18/34) only")
      extra["patch_below"] = self.patch_below
    if self.materialize:
      if self.block != "basic":
        raise ValueError("materialize is implemented for BasicBlock ResNets (ResNet-18/34) only")
      extra["materialize"] = True
    for i, blocks in enumerate(self.stage_sizes):
      for j in range(blocks):
        stride = 2 if (i > 0 and j == 0) else 1
        x = block(base * 2**i, stride, dtype=self.dtype, axis_name=self.axis_name,
                  name=f"layer{i + 1}_{j}", **extra)(x, train)
    feature = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    out = {"feature": feature}
    if self.num_classes is not None:
      # torch's nn.Linear default init is irrelevant here: the head only ever holds converted
      # (or freshly trained) weights; the logits are computed in float32 like the feature.
      out["logits"] = nn.Dense(self.num_classes, dtype=jnp.float32, name="fc")(feature)
    return out


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block="basic")
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block="basic")
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block="bottleneck")
ResNet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), block="bottleneck")
ResNet152 = functools.partial(ResNet, stage_sizes=(3, 8, 36, 3), block="bottleneck")

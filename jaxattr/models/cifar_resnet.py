"""lightly's CIFAR ResNet (ResNetGenerator) as the reference's MoCo backbone.

3x3 stride-1 stem conv + BN, NO max-pool, four stages of BasicBlocks (64/128/256/512 channels at
width 1, stride 2 from stage 2), a 1x1 conv + BN shortcut only where the shape changes, then global
average pooling. As the reference uses it for MoCo (the ResNet's children minus the final linear,
plus an adaptive average pool), there is no ReLU after the stem BN: lightly applies that ReLU in
`forward`, which the children-based backbone never calls.

Submodule names follow lightly's state_dict (conv1, bn1, layer1_0/conv1, ..., shortcut_conv,
shortcut_bn) so `jaxattr.convert` is a renaming.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxattr.models.layers import BatchNorm, Conv, blur, conv, materialize


class BasicBlock(nn.Module):
  """Two 3x3 conv + BN (stride on the first), a 1x1 conv + BN shortcut where the shape changes.

  The block of lightly's ResNetGenerator and of torchvision's ResNet-18/34; they differ only in
  the shortcut's name (`shortcut`: 'shortcut' here, 'downsample' in `jaxattr.models.resnet`).
  """

  planes: int
  stride: int = 1
  num_splits: int = 1
  dtype: Any = jnp.float32
  shortcut: str = "shortcut"
  split_layout: str = "interleaved"
  # BlurPool (ffcv-imagenet's): `layers.blur` before every strided conv with >= 16 inputs.
  blurpool: bool = False
  axis_name: str | None = None  # BatchNorm statistics over this mesh axis (`layers.BatchNorm`)
  patch_below: int = 0  # convs with at most this many output pixels: `layers.patch_conv`
  # Every conv input stored once (`layers.materialize`), not recomputed inside the transposes of
  # the weight gradients (XLA:CPU).
  materialize: bool = False
  expansion = 1  # output channels / planes (class constant, not a field)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    bn = functools.partial(BatchNorm, num_splits=self.num_splits, dtype=self.dtype,
                           split_layout=self.split_layout, axis_name=self.axis_name)
    blurred = blur(x) if self.blurpool and self.stride > 1 and x.shape[-1] >= 16 else x
    make = functools.partial(Conv, patch_below=self.patch_below) if self.patch_below else conv
    stored = materialize if self.materialize else lambda v: v
    blurred = stored(blurred)
    y = make(self.planes, 3, self.stride, 1, self.dtype, name="conv1")(blurred)
    y = stored(nn.relu(bn(name="bn1")(y, train)))
    y = make(self.planes, 3, 1, 1, self.dtype, name="conv2")(y)
    y = bn(name="bn2")(y, train)
    if self.stride != 1 or x.shape[-1] != self.planes:
      x = make(self.planes, 1, self.stride, 0, self.dtype, name=f"{self.shortcut}_conv")(blurred)
      x = bn(name=f"{self.shortcut}_bn")(x, train)
    return nn.relu(y + x)


class CifarResNet(nn.Module):
  """lightly ResNetGenerator backbone (no linear): images [B, H, W, 3] -> {'feature': [B, D]}.

  Attributes:
    stage_sizes: BasicBlocks per stage ((2, 2, 2, 2) = ResNet-18).
    width: channel multiplier; base channels = int(64 * width) as in lightly.
    num_splits: SplitBatchNorm groups (8 in the reference's MoCo; 1 = plain BatchNorm).
    stem_relu: apply ReLU after the stem BN (lightly's classifier `forward` does; the MoCo
      backbone built from its children does not, which is the default here).
    split_layout: how training batches form the SplitBatchNorm groups ('interleaved', lightly's;
      'blocked' for batches sorted by group, as data-parallel MoCo feeds them: `layers`).
    dtype: compute dtype (params stay float32).
  """

  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  width: float = 1.0
  num_splits: int = 1
  stem_relu: bool = False
  dtype: Any = jnp.float32
  split_layout: str = "interleaved"

  @property
  def feature_dim(self) -> int:
    return int(64 * self.width) * 8

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    base = int(64 * self.width)
    x = x.astype(self.dtype)
    x = conv(base, 3, 1, 1, self.dtype, name="conv1")(x)
    x = BatchNorm(num_splits=self.num_splits, dtype=self.dtype, split_layout=self.split_layout,
                  name="bn1")(x, train)
    if self.stem_relu:
      x = nn.relu(x)
    for i, blocks in enumerate(self.stage_sizes):
      for j in range(blocks):
        stride = 2 if (i > 0 and j == 0) else 1
        x = BasicBlock(base * 2**i, stride, self.num_splits, self.dtype,
                       split_layout=self.split_layout, name=f"layer{i + 1}_{j}")(x, train)
    feature = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return {"feature": feature}


LightlyResNet18 = functools.partial(CifarResNet, stage_sizes=(2, 2, 2, 2))

"""Flax models. Encoders map images [B, H, W, 3] (normalised float) to {'feature': [B, D], ...}."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn

from jaxattr.models.cifar_resnet import CifarResNet, LightlyResNet18
from jaxattr.models.layers import BatchNorm, conv, count_params
from jaxattr.models.mobilenetv2 import MobileNetV2
from jaxattr.models.resnet import ResNet, ResNet18, ResNet34, ResNet50, ResNet101, ResNet152
from jaxattr.models.resnet9 import ResNet9

# name -> constructor(**kwargs). The classifiers (resnet9, mobilenetv2) also return 'logits'.
ENCODERS: dict[str, Callable[..., nn.Module]] = {
    "lightly_resnet18": LightlyResNet18,
    "lightly_resnet": CifarResNet,  # lightly ResNetGenerator depths via stage_sizes
    "resnet18": ResNet18,
    "resnet34": ResNet34,
    "resnet50": ResNet50,
    "resnet101": ResNet101,
    "resnet152": ResNet152,
    "resnet9": ResNet9,
    "mobilenetv2": MobileNetV2,
}


def get_encoder(name: str, **kwargs: Any) -> nn.Module:
  """Builds a registered encoder by name."""
  if name not in ENCODERS:
    raise KeyError(f"unknown encoder {name!r}; known: {sorted(ENCODERS)}")
  return ENCODERS[name](**kwargs)


__all__ = [
    "BatchNorm", "CifarResNet", "ENCODERS", "LightlyResNet18", "MobileNetV2", "ResNet", "ResNet9",
    "ResNet18", "ResNet34", "ResNet50", "ResNet101", "ResNet152", "conv", "count_params",
    "get_encoder"
]

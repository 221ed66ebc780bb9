"""Flax models. Encoders map images [B, H, W, 3] (normalised float) to {'feature': [B, D], ...}."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn

from jaxattr.models.cifar_resnet import CifarResNet, LightlyResNet18
from jaxattr.models.layers import BatchNorm, conv, count_params
from jaxattr.models.resnet import ResNet, ResNet18, ResNet34, ResNet50, ResNet101, ResNet152

# name -> constructor(**kwargs). Later modules register more (torchvision ResNets, ResNet-9, ...).
ENCODERS: dict[str, Callable[..., nn.Module]] = {
    "lightly_resnet18": LightlyResNet18,
    "lightly_resnet": CifarResNet,  # lightly ResNetGenerator depths via stage_sizes
    "resnet18": ResNet18,
    "resnet34": ResNet34,
    "resnet50": ResNet50,
    "resnet101": ResNet101,
    "resnet152": ResNet152,
}


def get_encoder(name: str, **kwargs: Any) -> nn.Module:
  """Builds a registered encoder by name."""
  if name not in ENCODERS:
    raise KeyError(f"unknown encoder {name!r}; known: {sorted(ENCODERS)}")
  return ENCODERS[name](**kwargs)


__all__ = ["BatchNorm", "CifarResNet", "ENCODERS", "LightlyResNet18", "ResNet", "ResNet18",
           "ResNet34", "ResNet50", "ResNet101", "ResNet152", "conv", "count_params", "get_encoder"]

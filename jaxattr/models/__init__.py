"""Flax models. Encoders map images [B, H, W, 3] (normalised float) to {'feature': [B, D], ...}."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn

from jaxattr.models.cifar_resnet import CifarResNet, LightlyResNet18
from jaxattr.models.layers import BatchNorm, conv, count_params

# name -> constructor(**kwargs). Later modules register more (torchvision ResNets, ResNet-9, ...).
ENCODERS: dict[str, Callable[..., nn.Module]] = {
    "lightly_resnet18": LightlyResNet18,
}


def get_encoder(name: str, **kwargs: Any) -> nn.Module:
  """Builds a registered encoder by name."""
  if name not in ENCODERS:
    raise KeyError(f"unknown encoder {name!r}; known: {sorted(ENCODERS)}")
  return ENCODERS[name](**kwargs)


__all__ = ["BatchNorm", "CifarResNet", "ENCODERS", "LightlyResNet18", "conv", "count_params",
           "get_encoder"]

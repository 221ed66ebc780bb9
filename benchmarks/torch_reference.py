"""PyTorch versions of the reference's models, for golden tests and side-by-side benchmarks.

Imports torch lazily: jaxattr itself never needs it.
"""

from __future__ import annotations


def torch_resnet9(width: float, num_classes: int = 10):
  """The reference ResNet-9 as a torch.nn.Sequential (default torch init)."""
  import torch.nn as tnn  # pylint: disable=g-import-not-at-top

  def ch(c):
    return max(1, int(round(c * width)))

  def conv_bn(cin, cout, k=3, s=1, p=1):
    return tnn.Sequential(tnn.Conv2d(cin, cout, k, s, p, bias=False), tnn.BatchNorm2d(cout),
                          tnn.ReLU(inplace=True))

  class Residual(tnn.Module):

    def __init__(self, module):
      super().__init__()
      self.module = module

    def forward(self, x):
      return x + self.module(x)

  class Mul(tnn.Module):

    def __init__(self, weight):
      super().__init__()
      self.weight = weight

    def forward(self, x):
      return x * self.weight

  return tnn.Sequential(
      conv_bn(3, ch(64)), conv_bn(ch(64), ch(128), 5, 2, 2),
      Residual(tnn.Sequential(conv_bn(ch(128), ch(128)), conv_bn(ch(128), ch(128)))),
      conv_bn(ch(128), ch(256)), tnn.MaxPool2d(2),
      Residual(tnn.Sequential(conv_bn(ch(256), ch(256)), conv_bn(ch(256), ch(256)))),
      conv_bn(ch(256), ch(128), 3, 1, 0), tnn.AdaptiveMaxPool2d((1, 1)), tnn.Flatten(),
      tnn.Linear(ch(128), num_classes, bias=False), Mul(0.2))

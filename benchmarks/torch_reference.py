"""PyTorch versions of the reference's models, for golden tests and side-by-side benchmarks.

Imports torch lazily: jaxattr itself never needs it.
"""

from __future__ import annotations

import numpy as np


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


def resnet9_to_torch(ref, variables):
  """({torch parameter name: numpy array in torch layout}, {buffer name: array}) of Flax ResNet-9
  variables (`jaxattr.models.resnet9`) for `torch_resnet9` module `ref`: the inverse of
  tests/test_resnet9.py's mapping. Any pytree of the params' structure maps the same way (the
  TRAK golden test moves parameter positions with it)."""
  import torch.nn as tnn  # pylint: disable=g-import-not-at-top
  names = ["conv1", "conv2", "res1a", "res1b", "conv3", "res2a", "res2b", "conv4"]
  pname = {id(p): n for n, p in ref.named_parameters()}
  bname = {id(b): n for n, b in ref.named_buffers()}
  convs = [m for m in ref.modules() if isinstance(m, tnn.Conv2d)]
  bns = [m for m in ref.modules() if isinstance(m, tnn.BatchNorm2d)]
  params, stats = variables["params"], variables["batch_stats"]
  out, buffers = {}, {}
  for name, c, bn in zip(names, convs, bns):
    out[pname[id(c.weight)]] = np.asarray(params[name]["conv"]["kernel"]).transpose(3, 2, 0, 1)
    out[pname[id(bn.weight)]] = np.asarray(params[name]["bn"]["scale"])
    out[pname[id(bn.bias)]] = np.asarray(params[name]["bn"]["bias"])
    buffers[bname[id(bn.running_mean)]] = np.asarray(stats[name]["bn"]["mean"])
    buffers[bname[id(bn.running_var)]] = np.asarray(stats[name]["bn"]["var"])
  out[pname[id(ref[-2].weight)]] = np.asarray(params["linear"]["kernel"]).T
  return out, buffers

"""CIFAR-10 with the reference's settings (REFERENCE.md sections 1-4).

  python launch/pipeline.py --config configs/cifar10.py --workdir workdir/cifar10
  python launch/pipeline.py --config configs/cifar10.py:jpeg --workdir workdir/cifar10_jpeg
  python launch/pipeline.py --config configs/cifar10.py:cpu --workdir workdir/cifar10_cpu

Variants (comma-separated):
  (none)  data from a prepared `tfds:cifar10` (original CIFAR-10 order, = torchvision's).
  jpeg    data from the JPEG re-encoding of ../shared/data (`config.CIFAR10_JPEG`; its own
          canonical order, not torchvision's indices).
  cpu     shrunk to run on a CPU (implies jpeg): 500 training images per class, width-0.25
          encoder for 2 epochs, top-320 for 16 targets, support of 4 targets with 1/8-width
          ResNet-9s for 4 epochs (budget 3, 3 models); only a smoke test of the protocol.

The full setting is the paper's protocol: 100 seeded test targets, top-1280 by ESVM and l2,
removal and mislabel support with budget 7 and 5 full-width ResNet-9s (24 epochs) per test, flip
classes from 10 models. MoCo with a width-1 lightly ResNet-18, batch 512, 800 epochs (lightly
reports kNN accuracy 0.90 after 800 epochs at batch 512, about 13 h on one RTX A6000).
"""

from jaxattr import config as config_lib


def get_config(arg=None):
  variants = set(filter(None, (arg or "").split(",")))
  unknown = variants - {"jpeg", "cpu"}
  if unknown:
    raise ValueError(f"unknown variant(s) {sorted(unknown)} of configs/cifar10.py "
                     "(known: jpeg, cpu)")
  c = config_lib.base_config()
  c.data.source = "tfds:cifar10"
  c.encoder.width = 1.0
  c.encoder.num_splits = 8
  c.pretrain.epochs = 800
  c.pretrain.batch_size = 512
  c.pretrain.memory_bank_size = 4096
  c.pretrain.knn_every_epochs = 50
  c.pretrain.checkpoint_every_steps = 1000
  c.features.batch_size = 1024
  if "jpeg" in variants or "cpu" in variants:
    c.data.source = config_lib.CIFAR10_JPEG
  if "cpu" in variants:
    c.data.options.limit_per_class = 500
    c.encoder.width = 0.25
    c.pretrain.epochs = 2
    c.pretrain.batch_size = 256
    c.pretrain.knn_every_epochs = 0
    c.pretrain.log_every_steps = 10
    c.features.batch_size = 512
    c.attribution.k = 320
    c.attribution.num_targets = 16
    c.ensemble.width = 0.125
    c.ensemble.epochs = 4
    c.ensemble.peak_epoch = 1.0
    c.ensemble.batch_size = 256
    c.ensemble.models_per_wave = 1  # XLA:CPU compiles the model loop unrolled (configs/digits.py)
    c.support.k = 320
    c.support.num_targets = 4
    c.support.search_budget = 3
    c.support.num_tests = 3
    c.support.flip_models = 3
  return c

"""CIFAR-10 with the reference's settings (REFERENCE.md sections 1-4).

  python launch/pipeline.py --config configs/cifar10.py --workdir workdir/cifar10
  python launch/pipeline.py --config configs/cifar10.py:jpeg --workdir workdir/cifar10_jpeg
  python launch/pipeline.py --config configs/cifar10.py:cpu --workdir workdir/cifar10_cpu

Variants (comma-separated):
  (none)  data from a prepared `tfds:cifar10` (original CIFAR-10 order, = torchvision's).
  jpeg    data from the JPEG re-encoding `folder:../shared/data/cifar10-jpeg.tar.gz` (its own
          canonical order; not torchvision's indices).
  cpu     shrunk to run on a CPU in minutes (implies jpeg, width-0.25 encoder, 2 epochs, 1,000
          images per class); the numbers it gives are only a smoke test.

The full setting is MoCo with a width-1 lightly ResNet-18, batch 512, 800 epochs (lightly reports
kNN accuracy 0.90 after 800 epochs at batch 512, about 13 h on one RTX A6000).
"""

from jaxattr import config as config_lib

JPEG = "folder:../shared/data/cifar10-jpeg.tar.gz"


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
    c.data.source = JPEG
  if "cpu" in variants:
    c.data.options.limit_per_class = 1000
    c.encoder.width = 0.25
    c.pretrain.epochs = 2
    c.pretrain.batch_size = 256
    c.pretrain.knn_every_epochs = 0
    c.pretrain.log_every_steps = 10
    c.features.batch_size = 512
  return c

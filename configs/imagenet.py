r"""ImageNet attribution with the paper's features (REFERENCE.md): the official MoCo v2 ResNet-50,
converted once, its 2048-d features of all 1.33M images streamed to disk, then ESVM and l2 top-k.

  python launch/convert.py --src=moco_v2_800ep_pretrain.pth.tar --dst=checkpoints/moco_v2_800ep
  python launch/pipeline.py --config configs/imagenet.py --workdir workdir/imagenet
  python launch/pipeline.py --config configs/imagenet.py:tiny --workdir workdir/imagenet_tiny \
      --config.data.source=folder:/tmp/imagenet_tiny --config.encoder.checkpoint=/tmp/rn50

The data is a 'folder:DIR' tree as ImageNet is usually held: DIR/train/<wnid>/*.JPEG and DIR/val/
(class folders, or flat with LOC_val_solution.csv or the devkit's ground truth and meta.mat in DIR;
`jaxattr.folders`); data/imagenet is a symlink to it by default. The images are streamed
(`data.stream`), never held in memory; the features go to memory-mapped .npy files.

Variants:
  (none)  30 seeded validation targets (the paper's number), top-700 by ESVM and l2 (the smallest
          ImageNet class has 732 training images; the reference's 1280 is nearly a whole class
          of 1,300). --config.attribution.targets=all ranks all 50,000.
  tiny    a generated tree (`python -m benchmarks.imagenet_tree DIR`: 3 classes, 9 + 6 images)
          and any converted ResNet-50 (e.g. a random-init torchvision one), all targets, top-2:
          the tests and the README run it end to end in seconds.

Removal and mislabel support on ImageNet (the resident 64 px copy of `launch/prepare.py` and
ResNet-18 ensembles) are not part of this config yet: support.metrics is ''.
"""

from jaxattr import config as config_lib


def get_config(arg=None):
  variants = set(filter(None, (arg or "").split(",")))
  unknown = variants - {"tiny"}
  if unknown:
    raise ValueError(f"unknown variant(s) {sorted(unknown)} of configs/imagenet.py (known: tiny)")
  c = config_lib.base_config()
  c.data.source = "folder:data/imagenet"
  c.data.stream = True
  c.encoder.name = "resnet50"
  c.encoder.checkpoint = "checkpoints/moco_v2_800ep"  # launch/convert.py of the official weights
  c.features.batch_size = 256
  c.features.chunk_rows = 10000
  # Decode threads in the launcher's process: on the 2-core development machine grain's threads
  # ran 1.1x torchvision's DataLoader workers, its worker processes 0.3-0.5x (README).
  c.features.workers = 0
  c.features.threads = 16
  c.attribution.methods = "esvm,l2"
  c.attribution.k = 700
  c.attribution.targets = "random"
  c.attribution.num_targets = 30
  c.support.metrics = ""
  c.resident.side = 64
  c.resident.threads = 16
  if "tiny" in variants:
    c.data.source = "folder:/tmp/imagenet_tiny"
    c.features.batch_size = 8
    c.features.chunk_rows = 4
    c.features.workers = 0
    c.attribution.k = 2
    c.attribution.targets = "all"
    c.viz.num_targets = 3
    c.viz.top = 2
  return c

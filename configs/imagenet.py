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
          the tests and the README run it end to end in under a minute on 2 cores.

  cheap   the cheaper counterfactual recipe (`config.imagenet_recipe('rn18_8')`) instead of
          ffcv_rn18_16.

Removal and mislabel support (REFERENCE.md section 2) of the 30 targets follow: the prepare stage
decodes both splits once into the resident 64 px copy (WORKDIR/resident, `jaxattr.resident`), and
ResNet-18 ensembles (`config.imagenet_recipe`, the trainer's `models` x `data` mesh) retrain
without, or relabelling, each target's top-k: flip classes from 4 full-data models (the
reference's choice), k = 640 of the smallest class's 732 training images with a bisection budget
of 6 (every answer a multiple of 10, as the reference's 1280 / 2^7 on CIFAR-10), 5 models per
evaluated size. Cost: (1 + 6) x 5 = 35 trainings per target, metric and method, at most 30 x 35 x
2 x 2 = 4,200 ResNet-18s (README "ImageNet counterfactuals").
"""

from jaxattr import config as config_lib


def get_config(arg=None):
  variants = set(filter(None, (arg or "").split(",")))
  unknown = variants - {"tiny", "cheap"}
  if unknown:
    raise ValueError(f"unknown variant(s) {sorted(unknown)} of configs/imagenet.py (known: tiny, "
                     "cheap)")
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
  c.resident.side = 64
  c.resident.threads = 16
  c.ensemble = config_lib.imagenet_recipe("rn18_8" if "cheap" in variants else "ffcv_rn18_16")
  c.support.metrics = "removal,mislabel"
  c.support.methods = "esvm,l2"
  c.support.num_targets = 30
  c.support.k = 640
  c.support.search_budget = 6
  c.support.num_tests = 5
  c.support.flip_models = 4
  if "tiny" in variants:
    c.data.source = "folder:/tmp/imagenet_tiny"
    c.features.batch_size = 8
    c.features.chunk_rows = 4
    c.features.workers = 0
    c.attribution.k = 2
    c.attribution.targets = "all"
    c.viz.num_targets = 3
    c.viz.top = 2
    # Support on the tiny tree: 32 px resident copy, 1/16-width ResNet-18s for one epoch, top-2
    # removed or relabelled in one bisection step, 1 model per size and for the flip classes.
    c.resident.side = 32
    c.resident.chunk_rows = 4
    c.ensemble.update({
        "width": 0.0625,
        "epochs": 1,
        "batch_size": 4,
        "peak_epoch": 0.5,
        "res_min": 16,
        "res_max": 16,
        "ramp_start": 0,
        "ramp_end": 1,
        "eval_batch_size": 8,
        # One model per wave (as configs/digits.py): XLA:CPU compiles the model loop unrolled, so
        # the waves of 8 and 7 models cost 95 s of compiling each for no faster steps; results
        # are identical (2026-12-03, 2-core VM: the whole tiny run 226 s -> 37 s, no cache).
        "models_per_wave": 1
    })
    c.support.num_targets = 2
    c.support.k = 2
    c.support.search_budget = 1
    c.support.num_tests = 1
    c.support.flip_models = 1
  return c

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
          ResNet-9s for 4 epochs (budget 3, 3 models), TRAK from 1 such model (proj_dim 512),
          LDS over 8 subsets and 100 targets; only a smoke test of the protocol.
  trak1, trak10, trak100   TRAK from 1, 10 or 100 full-data ResNet-9s instead of 5 (the first
          models of the same seeds: a TRAK-100 run's first 5 models are TRAK-5's).
  lds_gpu_slice   the accelerator check's slice (launch/gpu_check.sh, implies jpeg): LDS of
          TRAK-5 only (no encoder needed) over 16 subsets and 1,000 targets with the full recipe,
          21 full-width ResNet-9s + 5 for TRAK; run with launch/lds.py.

The full setting is the paper's protocol: 100 seeded test targets, top-1280 by ESVM, l2 and TRAK
(5 full-data ResNet-9s, proj_dim 2048: the reviewer's TRAK-5), removal and mislabel support with
budget 7 and 5 full-width ResNet-9s (24 epochs) per test, flip classes from 10 models; LDS of
ESVM, l2 and TRAK over 100 random half-size subsets (1 model each) on 2,000 seeded test targets
(TRAK's and dattri's protocol). MoCo with a width-1 lightly ResNet-18, batch 512, 800 epochs
(lightly reports kNN accuracy 0.90 after 800 epochs at batch 512, about 13 h on one RTX A6000).
"""

from jaxattr import config as config_lib


def get_config(arg=None):
  variants = set(filter(None, (arg or "").split(",")))
  known = {"jpeg", "cpu", "trak1", "trak10", "trak100", "lds_gpu_slice"}
  unknown = variants - known
  if unknown:
    raise ValueError(f"unknown variant(s) {sorted(unknown)} of configs/cifar10.py "
                     f"(known: {', '.join(sorted(known))})")
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
  c.attribution.methods = "esvm,l2,trak"
  c.support.methods = "esvm,l2,trak"
  c.trak.num_models = 5
  c.trak.proj_dim = 2048
  c.trak.chunk_size = 256
  c.lds.methods = "esvm,l2,trak,class"
  c.lds.num_subsets = 100
  c.lds.alpha = 0.5
  c.lds.models_per_subset = 1
  c.lds.num_targets = 2000
  for v in ("trak1", "trak10", "trak100"):
    if v in variants:
      c.trak.num_models = int(v[4:])
  if "jpeg" in variants or "cpu" in variants or "lds_gpu_slice" in variants:
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
    c.trak.num_models = 1
    c.trak.proj_dim = 512
    c.trak.chunk_size = 128
    c.lds.num_subsets = 8
    c.lds.num_targets = 100
  if "lds_gpu_slice" in variants:
    c.lds.methods = "trak"
    c.lds.num_subsets = 16
    c.lds.num_targets = 1000
    c.ensemble.models_per_wave = 32
  return c

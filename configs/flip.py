"""Flip classes of the mislabel support (REFERENCE.md section 2): full-data models' mean softmax.

  python launch/flip.py --config configs/flip.py --workdir workdir/flip_cifar10
  python launch/flip.py --config configs/flip.py:digits --workdir workdir/flip_digits

Default: the reference's 10 full-width ResNet-9s (24 epochs, batch 512) on the CIFAR-10 JPEG set;
writes WORKDIR/flip_classes.npz (mean softmax, flip class of every test image) and
flip_metrics.json (the ensemble's test accuracy). Run time and accuracy: not measured yet (an
accelerator job; FFCV trains one such model in about 36 s on an A100).
`:digits` is the CPU size of configs/digits.py's counterfactual models (16x16 digits, 1/8-width
ResNet-9, 6 epochs, 3 models): 10 s on the 2-core CPU (5 s of it compiling); ensemble test
accuracy 0.933 on the 359 test digits (measured with jax 0.10.2).
--config.mode=train instead writes the test logits of every model (ensemble_logits.npz).
"""

import ml_collections

from jaxattr import config as config_lib


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.seed = 0  # the first model's seed (models use seed, seed + 1, ...)
  c.mode = "flip"  # 'flip': flip classes of the test split | 'train': logits of every model
  c.num_models = 10  # ensemble size (reference: 10 ResNet-9s)
  c.data = config_lib.data_section()
  c.data.source = config_lib.CIFAR10_JPEG
  c.ensemble = config_lib.trainer_section()
  if arg == "digits":
    c.num_models = 3
    c.data.source = "digits"
    c.data.options.size = 16  # the digits are 8x8 natively
    c.ensemble.width = 0.125
    c.ensemble.epochs = 6
    c.ensemble.peak_epoch = 1.5
    c.ensemble.batch_size = 128
    c.ensemble.cutout = 4  # the reference's 8x8 Cutout scaled with the 16x16 image
    # XLA:CPU unrolls a wave's model loop: one model a wave compiles fastest and trains as fast,
    # the same models bit for bit (benchmarks/benchmark_train.py).
    c.ensemble.models_per_wave = 1
  elif arg not in (None, ""):
    raise ValueError(f"unknown variant {arg!r} of configs/flip.py (known: digits)")
  return c

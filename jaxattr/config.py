"""The base experiment config: every configs/*.py starts from `base_config()` and overrides."""

import ml_collections
from ml_collections import config_dict

from jaxattr import attribute, features, ssl


def base_config() -> ml_collections.ConfigDict:
  """Seed, data, encoder, pretraining, features, attribution and visualisation sections."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.source = "digits"  # 'digits' | 'folder:PATH' | 'npz:PATH' | 'tfds:NAME'
  c.data.options = ml_collections.ConfigDict()
  c.data.options.size = config_dict.placeholder(int)  # resize to size x size (None = native)
  c.data.options.limit_per_class = config_dict.placeholder(int)  # first n per class (None = all)

  c.encoder = ml_collections.ConfigDict()
  c.encoder.name = "lightly_resnet18"
  c.encoder.width = 1.0  # channel multiplier (1.0 = 64 base channels, 512-d features)
  c.encoder.num_splits = 8  # SplitBatchNorm groups during pretraining
  c.encoder.checkpoint = ""  # variables checkpoint to use; '' = pretrain into WORKDIR/pretrain

  c.pretrain = ssl.default_config()
  c.features = features.default_config()

  c.attribution = attribute.default_config()
  c.attribution.methods = ("esvm", "l2")  # the method and the paper's main comparison
  c.attribution.targets = "random"  # seeded sample of num_targets test images
  c.attribution.num_targets = 100
  c.attribution.k = 1280

  c.viz = ml_collections.ConfigDict()
  c.viz.num_targets = 8  # targets shown per method in WORKDIR/attribution/<method>/grid.png
  c.viz.top = 16  # attributed images shown per target
  return c

"""The base experiment config: every configs/*.py starts from `base_config()` and overrides."""

import ml_collections
from ml_collections import config_dict

from jaxattr import features, ssl


def base_config() -> ml_collections.ConfigDict:
  """Seed, data, encoder, pretraining, features and nearest-neighbour sections."""
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

  # Nearest training images by cosine similarity in feature space, same class (a quick look).
  c.nearest = ml_collections.ConfigDict()
  c.nearest.num_targets = 8  # seeded random test targets
  c.nearest.k = 16  # neighbours shown per target
  return c

r"""Trains an ensemble of counterfactual-recipe models on the full data.

--config.mode=flip (default): the flip classes of the mislabel support (REFERENCE.md section 2):
10 ResNet-9 on full CIFAR-10, averaged softmax per test image, flip class per test image, written
to WORKDIR/flip_classes.npz. --config.mode=train: test logits of num_models models.

  python launch/train_ensemble.py --workdir=/tmp/flip
  python launch/train_ensemble.py --workdir=/tmp/q --config.data.source=digits \
    --config.num_models=2 --config.trainer.width=0.125 --config.trainer.epochs=2 \
    --config.trainer.batch_size=64

The config is `jaxattr.counterfactual.ensemble.run_config()`; every field is a flag. On the CPU
backend XLA_FLAGS defaults to jaxattr.xla_flags.FAST_CPU_FLAGS (~2x faster training) unless set.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jaxattr import xla_flags  # noqa: E402
from jaxattr.counterfactual import ensemble  # noqa: E402

_CONFIG = config_flags.DEFINE_config_dict("config", ensemble.run_config(), lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.", required=True)


def main(argv):
  del argv
  # Before the first JAX computation (XLA reads XLA_FLAGS when its backend starts); a no-op
  # when XLA_FLAGS is set or the backend is not the CPU.
  xla_flags.use_fast_cpu_flags()
  ensemble.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)

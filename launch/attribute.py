r"""Top-k attribution (ESVM / l2 / cosine) of test targets over training candidates.

Reads WORKDIR/features/{train,test}.npz and writes WORKDIR/attribution/<method>/ (see
`jaxattr.attribute.run`). With a config file the `attribution` section and `seed` are used:

  python launch/attribute.py --config=configs/cifar10.py --workdir=runs/cifar10

Without --config the defaults of `jaxattr.attribute.default_config()` apply, with flags for
the main knobs:

  python launch/attribute.py --workdir=runs/digits --methods=esvm,l2 --k=128 \
      --targets=random --num_targets=100 --seed=0

A killed run restarts at its first unfinished chunk when launched again with the same settings.
"""

from absl import app, flags
import ml_collections
from ml_collections import config_flags

from jaxattr import attribute, cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file with an `attribution` section and `seed`.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory holding features/.",
                               required=True)
_METHODS = flags.DEFINE_list("methods", None, "Without --config: esvm, l2 and/or cosine.")
_K = flags.DEFINE_integer("k", None, "Without --config: examples kept per target.")
_SAME_CLASS = flags.DEFINE_boolean("same_class", None, "Without --config: same-class candidates.")
_TARGETS = flags.DEFINE_enum("targets", None, ["all", "random", "list"],
                             "Without --config: which test targets.")
_NUM_TARGETS = flags.DEFINE_integer("num_targets", None, "Without --config: random sample size.")
_TARGET_LIST = flags.DEFINE_list("target_list", None, "Without --config: test positions.")
_CHUNK = flags.DEFINE_integer("chunk_size", None, "Without --config: targets per step.")
_SEED = flags.DEFINE_integer("seed", 0, "Without --config: seed of the random target sample.")
_CACHE = cli.define_compilation_cache_flag()


def _config() -> ml_collections.ConfigDict:
  if _CONFIG.value is not None:
    return _CONFIG.value
  config = ml_collections.ConfigDict({"seed": _SEED.value})
  config.attribution = attribute.default_config()
  a = config.attribution
  for name, value in (("k", _K.value), ("same_class", _SAME_CLASS.value),
                      ("targets", _TARGETS.value), ("num_targets", _NUM_TARGETS.value),
                      ("chunk_size", _CHUNK.value)):
    if value is not None:
      setattr(a, name, value)
  if _METHODS.value:
    a.methods = tuple(_METHODS.value)
  if _TARGET_LIST.value:
    a.target_list = tuple(int(i) for i in _TARGET_LIST.value)
  return config


def main(argv):
  del argv
  cli.use_compilation_cache(_CACHE.value)
  attribute.run(_config(), _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)

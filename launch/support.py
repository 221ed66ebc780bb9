r"""Removal and mislabel support of attribution methods (REFERENCE.md section 2).

With a pipeline config (sections `data`, `support`, `ensemble`):

  python launch/support.py --config=configs/digits.py --workdir=/tmp/digits \
      --config.support.num_targets=10 --config.support.search_budget=3

Without one, the config is `jaxattr.counterfactual.search.default_config()` plus the trainer's
default, shaped by the flags below, e.g. a reference-layout top-k file of another method:

  python launch/support.py --workdir=/tmp/cifar --data=folder:../shared/data/cifar10-jpeg.tar.gz \
      --methods=esvm,trak=/path/trak_topk.npy --targets=/path/targets.txt --k=1280

Reads WORKDIR/attribution/<method>/{topk,targets}.npy and writes WORKDIR/support/<metric>/<method>/
(results.jsonl, summary.json, curve.png, state.json); an interrupted run resumes where it stopped.
On the CPU backend XLA_FLAGS defaults to jaxattr.xla_flags.FAST_CPU_FLAGS (~2x faster training).
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
import ml_collections

from jaxattr import xla_flags
from jaxattr.counterfactual import search

_CONFIG = config_flags.DEFINE_config_file("config", None, "Pipeline config file (optional).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.", required=True)
_DATA = flags.DEFINE_string("data", "digits", "Data source (without --config).")
_METHODS = flags.DEFINE_list("methods", ["esvm", "l2"],
                             "Methods: names under WORKDIR/attribution or name=PATH of a "
                             "reference-layout top-k matrix (without --config).")
_METRICS = flags.DEFINE_list("metrics", list(search.METRICS), "removal and/or mislabel.")
_TARGETS = flags.DEFINE_string("targets", "", "Test index values: file or comma list.")
_NUM_TARGETS = flags.DEFINE_integer("num_targets", 0, "Use the first n targets (0 = all).")
_K = flags.DEFINE_integer("k", 1280, "Largest prefix size (images).")
_BUDGET = flags.DEFINE_integer("search_budget", 7, "Bisection steps after the k-check.")
_NUM_TESTS = flags.DEFINE_integer("num_tests", 5, "Models per evaluated prefix size.")
_EXHAUSTIVE = flags.DEFINE_bool("exhaustive", False, "Evaluate the whole grid in one round.")
_SEED = flags.DEFINE_integer("seed", 0, "Root seed of the search's trainings.")


def _config_from_flags() -> ml_collections.ConfigDict:
  support = search.default_config()
  support.update(dict(
      methods=tuple(_METHODS.value), metrics=tuple(_METRICS.value), targets=_TARGETS.value,
      num_targets=_NUM_TARGETS.value, k=_K.value, search_budget=_BUDGET.value,
      num_tests=_NUM_TESTS.value, exhaustive=_EXHAUSTIVE.value, seed=_SEED.value))
  return ml_collections.ConfigDict({"data": {"source": _DATA.value}, "support": support})


def main(argv):
  del argv
  # Before the first JAX computation; a no-op when XLA_FLAGS is set or the backend is not the CPU.
  xla_flags.use_fast_cpu_flags()
  config = _CONFIG.value if _CONFIG.value is not None else _config_from_flags()
  summaries = search.run(config, _WORKDIR.value)
  for metric, per_method in summaries.items():
    for method, s in per_method.items():
      logging.info("%s %s: median %s (unflipped = inf), %d/%d not flipped, %d trainings",
                   metric, method, s["median_support"], s["not_flipped"], s["targets"],
                   s["trainings"])


if __name__ == "__main__":
  app.run(main)

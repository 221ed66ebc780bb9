"""Pretrains the MoCo encoder of a config (resumes from WORKDIR/pretrain/checkpoints).

  python launch/pretrain.py --config configs/digits.py --workdir workdir/digits
"""

from absl import app, flags, logging
from ml_collections import config_flags

from jaxattr import utils, ssl

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (created; reused to resume).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  utils.quiet_library_logs()
  ssl.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)

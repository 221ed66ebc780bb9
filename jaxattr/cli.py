"""The shared shape of every `launch/<step>.py`: --config and --workdir, then one library call."""

from __future__ import annotations

from typing import Any, Callable

from absl import app, flags, logging
from ml_collections import config_flags

from jaxattr import utils


def launch(run: Callable[[Any, str], Any], doc: str = "") -> None:
  """Defines --config (a Python config file, locked) and --workdir, then calls run(config, workdir).

  Any config field can be overridden on the command line (`--config.pretrain.epochs=5`); a
  misspelt field is an error before anything runs.
  """
  config = config_flags.DEFINE_config_file("config", None, "Experiment config file "
                                           "(path/to/config.py[:variant]).", lock_config=True)
  workdir = flags.DEFINE_string("workdir", None, "Output directory (created; reused to resume).")
  flags.mark_flags_as_required(["config", "workdir"])

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    utils.quiet_library_logs()
    if doc:
      logging.info("%s", doc.strip().splitlines()[0])
    run(config.value, workdir.value)

  app.run(main)

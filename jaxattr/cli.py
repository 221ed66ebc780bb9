"""The shared shape of every `launch/<step>.py`: --config and --workdir, then one library call."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from absl import app, flags, logging
from ml_collections import config_flags

from jaxattr import utils, xla_flags


def launch(run: Callable[[Any, str], Any], doc: str = "",
           cpu_flags: Sequence[str] = xla_flags.FAST_CPU_FLAGS) -> None:
  """Defines --config (a Python config file, locked) and --workdir, then calls run(config, workdir).

  Any config field can be overridden on the command line (`--config.pretrain.epochs=5`); a
  misspelt field is an error before anything runs.

  On the CPU backend, XLA_FLAGS defaults to `cpu_flags` (`jaxattr.xla_flags`: about 2x faster
  convolution training on XLA:CPU) unless the user has set XLA_FLAGS, in which case those stand;
  other backends are untouched. Compiled programs are kept in --compilation_cache.
  """
  config = config_flags.DEFINE_config_file(
      "config", None, "Experiment config file "
      "(path/to/config.py[:variant]).", lock_config=True)
  workdir = flags.DEFINE_string("workdir", None, "Output directory (created; reused to resume).")
  cache = define_compilation_cache_flag()
  flags.mark_flags_as_required(["config", "workdir"])

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    utils.quiet_library_logs()
    set_flags = xla_flags.use_fast_cpu_flags(cpu_flags)
    if set_flags:
      logging.info("XLA_FLAGS=%s (CPU defaults of jaxattr.xla_flags; set XLA_FLAGS to override)",
                   set_flags)
    use_compilation_cache(cache.value)
    if doc:
      logging.info("%s", doc.strip().splitlines()[0])
    run(config.value, workdir.value)

  app.run(main)


def define_compilation_cache_flag() -> flags.FlagHolder:
  """--compilation_cache: JAX's persistent compilation cache directory ('' turns it off)."""
  return flags.DEFINE_string(
      "compilation_cache", xla_flags.DEFAULT_COMPILATION_CACHE,
      "Directory of JAX's persistent compilation cache, so that reruns skip compiling ('' = "
      "off; default from $JAXATTR_COMPILATION_CACHE, else ~/.cache/jaxattr/jax).")


def use_compilation_cache(directory: str) -> None:
  """Turns the cache on (`xla_flags.use_compilation_cache`) and logs where it is.

  Raises:
    app.UsageError: the directory cannot be created (a file there, no permission), before any
      work starts.
  """
  try:
    where = xla_flags.use_compilation_cache(directory)
  except OSError as e:
    raise app.UsageError(f"--compilation_cache={directory}: cannot use it as a directory ({e}); "
                         "pass another path or '' to turn the cache off") from e
  logging.info("JAX compilation cache: %s", where or "off")

"""The shared shape of every `launch/<step>.py`: --config and --workdir, then one library call."""

from __future__ import annotations

import _thread
import contextlib
import errno
import os
import re
import sys
import threading
import traceback
from typing import Any, Callable, NoReturn, Sequence

from absl import app, flags, logging
from ml_collections import config_flags

from jaxattr import distributed, utils, xla_flags


def launch(run: Callable[[Any, str],
                         Any], doc: str = "", cpu_flags: Sequence[str] = xla_flags.FAST_CPU_FLAGS,
           multi_process: bool = False, shard_lock: bool = False) -> None:
  """Defines --config (a Python config file, locked) and --workdir, then calls run(config, workdir).

  Any config field can be overridden on the command line (`--config.pretrain.epochs=5`); a
  misspelt field is a one-line usage error (naming the flag, and the field ml_collections
  suggests) before anything runs.

  On the CPU backend, XLA_FLAGS defaults to `cpu_flags` (`jaxattr.xla_flags`: about 2x faster
  convolution training on XLA:CPU) unless the user has set XLA_FLAGS, in which case those stand;
  other backends are untouched. Compiled programs are kept in --compilation_cache.

  The run holds WORKDIR/.lock (`utils.workdir_lock`): a second run into the same workdir stops at
  once, naming the first. A failure prints one line, `error: <message>`, and exits with status 1;
  the traceback goes to WORKDIR/error.log and to the log at DEBUG level (`--verbosity=1`). Ctrl-C
  exits with status 130 and one line saying that the same command resumes the run. Usage errors
  (flags, config fields) stay absl's usage message.

  Several processes (`jaxattr.distributed`: --coordinator_address, --num_processes,
  --process_id, or a detected TPU VM slice, SLURM or Open MPI job) join one job first; every
  process checks the config and the workdir with the others (`distributed.check_job`). Stages
  not yet written for several processes (multi_process=False) refuse to run as several. With
  shard_lock, each shard of a job array (`config.shard`) holds its own lock.
  """
  config = config_flags.DEFINE_config_file(
      "config", None, "Experiment config file "
      "(path/to/config.py[:variant]).", lock_config=True)
  workdir = flags.DEFINE_string("workdir", None, "Output directory (created; reused to resume).")
  cache = define_compilation_cache_flag()
  distributed.define_flags()
  flags.mark_flags_as_required(["config", "workdir"])

  started = []

  def main(argv):
    started.append(True)
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # -v 1 must still show the DEBUG tracebacks.
      logging.set_verbosity(logging.INFO)
    utils.quiet_library_logs()
    set_flags = xla_flags.use_fast_cpu_flags(cpu_flags)
    if set_flags:
      logging.info("XLA_FLAGS=%s (CPU defaults of jaxattr.xla_flags; set XLA_FLAGS to override)",
                   set_flags)
    use_compilation_cache(cache.value)
    f = flags.FLAGS
    try:
      info = distributed.initialize(f.coordinator_address, f.num_processes, f.process_id,
                                    f.local_device_ids, f.distributed_timeout)
      if info.process_count > 1 and not multi_process:
        raise distributed.DistributedError(
            f"{os.path.basename(sys.argv[0])} runs as one process: it is a short single-host "
            "step (merging job-array shards, preparing a resident copy); run it once, on one "
            "host, without --coordinator_address")
    except distributed.DistributedError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(1)
    if doc:
      logging.info("%s", doc.strip().splitlines()[0])
    guarded(run, _loaded_config(config), workdir.value, shard_lock=shard_lock)

  try:
    app.run(main, flags_parser=_parse_flags)
  except (AttributeError, KeyError) as e:
    if started:
      raise
    # ml_collections rejects an override of a field the config lacks with a bare KeyError /
    # AttributeError from inside absl's flag parsing: say which flag, as absl says for the rest.
    print(
        f"FATAL Flags parsing error: {_unknown_field(e, sys.argv)}\n"
        "Pass --helpshort or --helpfull to see help on flags.", file=sys.stderr)
    sys.exit(1)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, except that a config file that fails while it loads or builds its
  config (a syntax error, an unknown variant, any exception) is one usage line with the error and
  where in the file it was raised, not a traceback. A KeyError or AttributeError raised outside
  the file passes through: an override naming no field (`launch` words it)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    text = str(e)
    if "Error whilst parsing config file" not in text:
      return app.parse_flags_with_usage(argv)  # absl's own message and exit
    # ml_collections re-raises a config file's TypeError / ValueError as a flag error that holds
    # the formatted traceback: keep its last line and the last file position in it.
    flag = text.partition(": Error whilst parsing config file")[0].strip()
    last = [line.strip() for line in text.splitlines() if line.strip()][-1]
    frames = [(f, int(n)) for f, n in re.findall(r'File "([^"]+)", line (\d+)', text)]
    _config_error(f"{flag}: the config file raised {last}{_where(frames, argv)}")
  except Exception as e:  # pylint: disable=broad-except
    where = _where([(f.filename, f.lineno) for f in traceback.extract_tb(e.__traceback__)], argv)
    no_function = isinstance(e, AttributeError) and "'get_config'" in str(e)
    if isinstance(e, (KeyError, AttributeError)) and not where and not no_function:
      raise  # an override naming no field of the config
    what = ("defines no get_config() returning the config"
            if no_function else f"raised {type(e).__name__}: {' '.join(str(e).split())}{where}")
    _config_error(f"flag --config={_config_arg(argv)}: the config file {what}")


def _where(frames: Sequence[tuple[str, Any]], argv: Sequence[str]) -> str:
  """' (at FILE:LINE)' for the last of the traceback's (file, line) frames in the --config file,
  or '' when none is."""
  path = os.path.abspath(_config_arg(argv).split(":")[0]) if _config_arg(argv) else ""
  own = [(f, n) for f, n in frames if path and os.path.abspath(f) == path]
  return f" (at {own[-1][0]}:{own[-1][1]})" if own else ""


def _config_arg(argv: Sequence[str]) -> str:
  """The value given to --config on the command line ('' when absent)."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg[len("--config="):]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return ""


def _config_error(text: str) -> NoReturn:
  print(f"FATAL Flags parsing error: {text}\nPass --helpshort or --helpfull to see help on flags.",
        file=sys.stderr)
  sys.exit(1)


def _loaded_config(holder: flags.FlagHolder) -> Any:
  """--config's ConfigDict; a file that does not exist or does not load is one `error:` line
  (ml_collections defers that failure to the first access, as a multi-line OSError)."""
  try:
    value = holder.value
    getattr(value, "keys")  # a config that failed to load raises on first access
    return value
  except Exception as e:  # pylint: disable=broad-except
    spec = getattr(flags.FLAGS["config"], "config_filename", "") or ""
    path = str(spec).split(":")[0]
    if path and not os.path.isfile(path):
      reason = "no such file" if not os.path.exists(path) else "not a file"
      print(
          f"error: --config {spec}: {reason}; pass a Python config file, e.g. "
          "configs/digits.py[:variant]", file=sys.stderr)
    else:
      print(f"error: --config {spec}: cannot load it ({' '.join(str(e).split())})", file=sys.stderr)
    sys.exit(1)


def _unknown_field(e: BaseException, argv: Sequence[str]) -> str:
  """The usage line for a --config.FIELD override that names no field of the config."""
  text, seen = "", set()
  while e is not None and id(e) not in seen:  # the KeyError under ml_collections' wrapping
    seen.add(id(e))
    if not text and isinstance(e, KeyError) and e.args and isinstance(e.args[0], str):
      text = e.args[0]
    inner = e.args[0] if e.args and isinstance(e.args[0], BaseException) else None
    e = inner or e.__cause__ or e.__context__
  name, _, hint = text.partition("\n")
  name = name.strip("'\"")
  overrides = [a for a in argv[1:] if a.startswith("--config.")]
  flag = next((a for a in overrides if name and name in a.partition("=")[0].split(".")[1:]), None)
  field = flag.partition("=")[0][len("--config."):] if flag else name
  hint = hint.replace('"', "'").strip()
  return (f"flag {flag or '--config.' + field}: the config has no field {field!r}" +
          (f" ({hint[0].lower() + hint[1:]})" if hint else "") +
          "; see the config file for its fields")


def guarded(run: Callable[[Any, str], Any], config: Any, workdir: str,
            shard_lock: bool = False) -> None:
  """Calls run(config, workdir) under the workdir lock; a failure exits with one readable line.

  Exits:
    1 after printing `error: ...` for any exception (the lock held by another run, a disk full, a
    bad value found by the stage); 130 after Ctrl-C. app.UsageError passes through to absl.
  """
  _redeliver_swallowed_interrupts()
  _check_workdir(workdir)
  try:
    # One job at a time per workdir: the job's process 0 holds the lock for all its processes.
    # The shards of a job array (config.shard) write their own directories, each under its lock.
    shard = config.get("shard") if hasattr(config, "get") else None
    name = (f"{utils.LOCK_FILE}-shard-{shard.index}-of-{shard.count}"
            if shard_lock and shard is not None and int(shard.count) > 1 else utils.LOCK_FILE)
    with (utils.workdir_lock(workdir, name=name)
          if distributed.is_main() else contextlib.nullcontext()):
      distributed.check_job(config, workdir)
      run(config, workdir)
  except app.UsageError:
    raise
  except utils.WorkdirLocked as e:
    # The message says it all; the workdir belongs to the other run, so no error.log there.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  except KeyboardInterrupt:
    logging.debug("interrupted at:\n%s", traceback.format_exc())
    # Background threads (orbax's asynchronous checkpoint save) fail when the interpreter shuts
    # down under them; their tracebacks would bury the line below. The checkpoint they were
    # writing is incomplete and ignored on resume.
    threading.excepthook = lambda args: logging.debug(
        "background thread %s stopped by the interrupt: %s", args.thread, args.exc_value)
    print(
        f"interrupted: the run in {workdir} stopped before finishing; run the same command again "
        "to resume it", file=sys.stderr)
    sys.exit(130)
  except Exception as e:  # pylint: disable=broad-except
    full = _disk_full(e)
    if full is not None:
      where = full.filename or workdir
      _fail(
          f"disk full (or quota exceeded) while writing {where}: free space on that disk (or "
          "pass another --workdir), then run the same command again to resume", workdir)
    _fail(_message(e), workdir)


def _check_workdir(workdir: str) -> None:
  """--workdir must be a directory or creatable as one: else one `error:` line and exit 1."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    print(
        f"error: --workdir {workdir} is a file, not a directory: pass a directory (it is "
        "created when missing)", file=sys.stderr)
    sys.exit(1)
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    print(
        f"error: --workdir {workdir}: cannot create the directory ({e.strerror or e}); pass "
        "one this user can write", file=sys.stderr)
    sys.exit(1)


def _redeliver_swallowed_interrupts() -> None:
  """A Ctrl-C that lands in a callback Python cannot raise from (JAX's garbage-collection
  callbacks during start-up) is printed and dropped; this delivers it to the main thread again."""
  previous = sys.unraisablehook
  if getattr(previous, "redelivers_interrupts", False):
    return

  def hook(unraisable):
    if isinstance(unraisable.exc_value, KeyboardInterrupt):
      # A moment later, from another thread: raised here, in the hook, it would be dropped again.
      timer = threading.Timer(0.05, _thread.interrupt_main)
      timer.daemon = True
      timer.start()
      return
    previous(unraisable)

  hook.redelivers_interrupts = True
  sys.unraisablehook = hook


def _disk_full(e: BaseException) -> OSError | None:
  """The ENOSPC/EDQUOT OSError behind `e`, also when a library re-raised it as something else."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
      return e
    e = e.__cause__ or e.__context__
  return None


def _message(e: BaseException) -> str:
  """The exception's message; prefixed by its type unless it is a ValueError (jaxattr's errors
  are: DataError, AttributionError, ...), whose message is written for the user."""
  text = str(e) or type(e).__name__
  if isinstance(e, ValueError):
    return text
  return f"{type(e).__name__}: {text}"


def _fail(message: str, workdir: str) -> NoReturn:
  """Logs the traceback (DEBUG; also WORKDIR/error.log), prints `error: message`, exits 1."""
  tb = traceback.format_exc()
  logging.debug("%s", tb)
  where = "rerun with --verbosity=1 for the traceback"
  if os.path.isdir(workdir):
    path = os.path.join(workdir, "error.log")
    try:
      with open(path, "w") as f:
        f.write(tb)
      where = f"traceback in {path}"
    except OSError:  # A full disk or a missing workdir: the line below still says what failed.
      pass
  print(f"error: {message} ({where})", file=sys.stderr)
  sys.exit(1)


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

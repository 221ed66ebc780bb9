"""Small shared helpers: atomic writes, provenance, throughput logging, config hashing, the
workdir lock."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Iterator, Sequence

import numpy as np
from absl import logging


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yields a temporary path next to `path`; renames it onto `path` only on success.

  Readers never see a half-written file and an existing file survives a crash.
  """
  directory = os.path.dirname(os.path.abspath(path)) or "."
  os.makedirs(directory, exist_ok=True)
  base = os.path.basename(path)
  fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=directory)
  os.close(fd)
  # Keep the real suffix last so libraries that append one (np.save adds ".npy") do not.
  root, ext = os.path.splitext(base)
  if ext:
    os.remove(tmp)
    tmp = tmp[:-len(".tmp")] + ".tmp" + ext
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def save_npz(path: str, **arrays: Any) -> None:
  """Atomically writes an uncompressed .npz file."""
  with atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      np.savez(f, **arrays)


def save_npy(path: str, array: np.ndarray) -> None:
  """Atomically writes a .npy file."""
  with atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      np.save(f, array)


_SAVE_HINT = "write it with numpy.save (.npy) or numpy.savez (.npz), as numbers, not Python objects"


def _file(path: str, what: str) -> str:
  return "the file" if path in what else path


def _check_magic(path: str, what: str, error: type[Exception]) -> None:
  """Refuses a file that is neither an .npy array nor a zip (.npz) archive by its first bytes
  (numpy would take it for a pickle and talk of allow_pickle)."""
  try:
    with open(path, "rb") as f:
      head = f.read(6)
  except OSError as e:
    raise error(f"{what}: cannot open {path} ({e})") from e
  if head != b"\x93NUMPY" and not head.startswith(b"PK"):
    raise error(f"{what}: {_file(path, what)} is not a numpy file (it starts with {head!r}, not "
                f"an .npy or .npz header); {_SAVE_HINT}")


def load_user_npy(path: str, what: str, error: type[Exception] = ValueError,
                  mmap: bool = False) -> np.ndarray:
  """A user's .npy file (an external score or top-k matrix, a target list), or one `error` that
  names `what` and the path when numpy cannot read it as one numeric array (not a numpy file,
  truncated, pickled objects, an .npz archive)."""
  _check_magic(path, what, error)
  try:
    out = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:
    raise error(f"{what}: cannot read {_file(path, what)} as a numpy array ({e}); "
                f"{_SAVE_HINT}") from e
  if not isinstance(out, np.ndarray):
    out.close()
    raise error(f"{what}: {_file(path, what)} is an .npz archive, expected one array in an .npy "
                f"file; {_SAVE_HINT}")
  if out.dtype.hasobject or out.dtype.kind not in "biufc":
    raise error(f"{what}: {_file(path, what)} holds {out.dtype} values, expected numbers; "
                f"{_SAVE_HINT}")
  return out


def load_user_npz(path: str, what: str, error: type[Exception] = ValueError) -> dict[str, Any]:
  """A user's .npz archive read whole ({key: array}), or one `error` naming `what` and the path."""
  _check_magic(path, what, error)
  try:
    z = np.load(path, allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:
    raise error(f"{what}: cannot read {_file(path, what)} as an .npz archive ({e}); "
                f"{_SAVE_HINT}") from e
  if not isinstance(z, np.lib.npyio.NpzFile):
    raise error(f"{what}: {_file(path, what)} holds a single array, expected an .npz archive; "
                f"{_SAVE_HINT}")
  with z:
    try:
      return {key: z[key] for key in z.files}
    except (ValueError, OSError, EOFError) as e:
      raise error(f"{what}: cannot read an array of {_file(path, what)} ({e}); "
                  f"{_SAVE_HINT}") from e


def integer_values(values: Any, what: str, error: type[Exception] = ValueError) -> np.ndarray:
  """`values` as int64, refusing anything that is not a whole number: integer arrays pass, float
  arrays only when every entry is finite and whole (e.g. indices saved as float), never booleans
  or cast-truncated fractions."""
  a = np.asarray(values)
  if a.dtype.kind in "iu":
    return a.astype(np.int64)
  if a.dtype.kind == "f":
    whole = np.isfinite(a) & (a == np.round(a))
    if whole.all():
      return a.astype(np.int64)
    first = np.unravel_index(int(np.argmin(whole)), a.shape)
    raise error(f"{what}: expected whole-number index values, got {a.dtype} with "
                f"{int((~whole).sum())} that are not (first {a[first].item()!r} at position "
                f"{tuple(int(i) for i in first)})")
  raise error(f"{what}: expected integer index values, got {a.dtype}")


def save_json(path: str, obj: Any) -> None:
  """Atomically writes pretty JSON."""
  with atomic_path(path) as tmp:
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
      f.write("\n")


def _json_default(x: Any) -> Any:
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)


def git_revision() -> str:
  """The git revision of the jaxattr checkout, or 'unknown'."""
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                         timeout=5)
    rev = out.stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=here,
        capture_output=True,
        text=True,
        timeout=5,
    ).stdout.strip()
    return (rev + ("-dirty" if dirty else "")) if rev else "unknown"
  except Exception:  # pylint: disable=broad-except
    return "unknown"


def provenance() -> dict[str, Any]:
  """Versions, devices and git revision, written next to every result."""
  import jax  # pylint: disable=g-import-not-at-top

  info: dict[str, Any] = {
      "python": sys.version.split()[0],
      "platform": platform.platform(),
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "devices": [str(d) for d in jax.devices()],
      "process_count": jax.process_count(),
      "git_revision": git_revision(),
      "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
  }
  for name in ("flax", "optax", "orbax.checkpoint", "numpy", "sklearn", "torch"):
    mod = sys.modules.get(name)
    if mod is not None:
      info[name] = getattr(mod, "__version__", "?")
  return info


def config_hash(obj: Any) -> str:
  """A short stable hash of a (nested) config or dict, for skip-if-done checks."""
  if hasattr(obj, "to_dict"):
    obj = obj.to_dict()
  blob = json.dumps(obj, sort_keys=True, default=_json_default)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Throughput:
  """Logs progress and items/s at most every `every_s` seconds."""

  def __init__(self, what: str, total: int | None = None, unit: str = "images",
               every_s: float = 10.0):
    self.what, self.total, self.unit, self.every_s = what, total, unit, every_s
    self.start = time.perf_counter()
    self.last = self.start
    self.done = 0

  def update(self, n: int, extra: str = "", force: bool = False) -> None:
    self.done += n
    now = time.perf_counter()
    if force or now - self.last >= self.every_s:
      self.last = now
      logging.info("%s", self.message(extra))

  def message(self, extra: str = "") -> str:
    elapsed = time.perf_counter() - self.start
    rate = self.done / max(elapsed, 1e-9)
    total = f"/{self.total}" if self.total else ""
    tail = f" {extra}" if extra else ""
    return (f"{self.what}: {self.done}{total} {self.unit}, {rate:,.1f} {self.unit}/s, "
            f"{elapsed:.1f}s{tail}")

  @property
  def rate(self) -> float:
    return self.done / max(time.perf_counter() - self.start, 1e-9)


class _DropLibraryInfo:
  """A logging filter that drops INFO-and-below records from noisy libraries (orbax)."""

  def __init__(self, fragments: tuple[str, ...]):
    self.fragments = fragments

  def filter(self, record) -> bool:  # logging.Filter protocol
    import logging as py_logging  # pylint: disable=g-import-not-at-top
    if record.levelno > py_logging.INFO:
      return True
    return not any(f in record.pathname for f in self.fragments)


def quiet_library_logs(fragments: tuple[str, ...] = ("orbax", "etils")) -> None:
  """Keeps orbax's per-save INFO chatter out of the logs (warnings still pass)."""
  import logging as py_logging  # pylint: disable=g-import-not-at-top
  flt = _DropLibraryInfo(fragments)
  for handler in py_logging.getLogger().handlers + py_logging.getLogger("absl").handlers:
    handler.addFilter(flt)
  py_logging.getLogger("absl").addFilter(flt)


LOCK_FILE = ".lock"


class WorkdirLocked(RuntimeError):
  """Another live run (or a run on another host, which cannot be checked) holds the workdir."""


def _read_lock(path: str) -> dict[str, Any] | None:
  """The holder recorded in a lock file; None when it vanished; {} when it is not (yet) JSON."""
  # A holder creates the file and then writes it, so an empty file may be a lock being written:
  # read again briefly before calling it unreadable.
  for _ in range(20):
    try:
      with open(path) as f:
        text = f.read()
    except FileNotFoundError:
      return None
    try:
      holder = json.loads(text)
      if isinstance(holder, dict):
        return holder
    except json.JSONDecodeError:
      pass
    time.sleep(0.05)
  return {}


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Another user's live process.
    return True
  return True


def _describe(holder: dict[str, Any]) -> str:
  argv = holder.get("argv")
  command = " ".join(argv) if isinstance(argv, list) else "?"
  return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started "
          f"{holder.get('started', '?')}, command: {command}")


@contextlib.contextmanager
def workdir_lock(workdir: str, argv: Sequence[str] | None = None,
                 name: str = LOCK_FILE) -> Iterator[str]:
  """Holds WORKDIR/.lock while the block runs, so that one run at a time writes a workdir.

  The lock file is created atomically (O_CREAT | O_EXCL) and holds JSON {pid, host, started (UTC),
  argv}. It is removed when the block exits in any way (exception, KeyboardInterrupt included). A
  lock left by a dead process of this host (a kill -9, a power cut) is stale: it is logged and
  taken over. The workdir is created if needed.

  Args:
    workdir: the run's output directory.
    argv: the command recorded for whoever finds the lock (default: sys.argv).
    name: the lock file's name (the shards of a job array each hold their own).

  Yields:
    The lock file's path.

  Raises:
    WorkdirLocked: a live process of this host holds the lock, or a process of another host
      (which cannot be checked), or the lock file is unreadable; the message names the holder
      and what to do. Nothing has been written then.
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, name)
  host = socket.gethostname()
  mine = {
      "pid": os.getpid(),
      "host": host,
      "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
      "argv": list(sys.argv if argv is None else argv),
  }
  # A few attempts: each stale lock taken over, or a holder that released while we read it,
  # costs one; more than that means processes are racing for the workdir.
  for _ in range(5):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      holder = _read_lock(path)
      if holder is None:  # Released between our open and our read.
        continue
      if not holder:
        raise WorkdirLocked(
            f"workdir {workdir} has an unreadable lock file {path}; if no other run "
            f"is using this workdir, delete {path} and run again") from None
      pid = holder.get("pid")
      if holder.get("host") != host:
        raise WorkdirLocked(
            f"workdir {workdir} is locked by a run on another host ({_describe(holder)}); this "
            f"host ({host}) cannot check whether it is alive: wait for it to finish or use another "
            f"--workdir, and if that run is dead, delete {path} and run again") from None
      if isinstance(pid, int) and not _pid_alive(pid):
        logging.warning("workdir %s: taking over the stale lock of a dead run (%s)", workdir,
                        _describe(holder))
        _remove_stale(path, holder)
        continue
      raise WorkdirLocked(
          f"workdir {workdir} is in use by another run ({_describe(holder)}): wait for it to "
          f"finish, stop it (kill {pid}), or use another --workdir; if no such run is alive "
          f"(the pid now belongs to another program), delete {path} and run again") from None
    try:
      with os.fdopen(fd, "w") as f:
        json.dump(mine, f)
        f.write("\n")
    except BaseException:
      os.remove(path)
      raise
    break
  else:
    raise WorkdirLocked(f"workdir {workdir}: could not take {path}, other runs keep taking it; "
                        "run one at a time")
  try:
    yield path
  finally:
    # Only our own lock: had someone deleted it and another run taken the workdir, theirs stays.
    if _read_lock(path) == mine:
      os.remove(path)


def _remove_stale(path: str, holder: dict[str, Any]) -> None:
  """Removes the stale lock `holder`, but not a fresh lock another run put there meanwhile."""
  # Rename first (atomic, one winner) and check what was renamed: two runs both judging the
  # same stale lock must not remove each other's fresh one.
  aside = f"{path}.stale.{os.getpid()}"
  try:
    os.rename(path, aside)
  except FileNotFoundError:
    return
  if _read_lock(aside) != holder:
    with contextlib.suppress(FileExistsError):
      os.link(aside, path)  # Put the live lock back (no-op if yet another run holds the path).
  os.remove(aside)

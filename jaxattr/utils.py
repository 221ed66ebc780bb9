"""Small shared helpers: atomic writes, provenance, throughput logging, config hashing."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Any, Iterator

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

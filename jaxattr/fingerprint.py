"""Fingerprints that tie a result to what made it: content hashes of arrays and data sources.

A run's outputs are only reused by a run whose fingerprint matches (`jaxattr.pretrain`), so a
changed file under the same path, or other options, never resumes an old run.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np

from jaxattr import data, utils

# Rows per block of `arrays_fingerprint`'s hashing: memory-mapped inputs (ImageNet's 1.28M x 2048
# features) are read a block at a time, never copied whole into memory.
HASH_BLOCK_BYTES = 1 << 26


def arrays_fingerprint(*arrays: np.ndarray) -> str:
  """A short exact hash of arrays' dtypes, shapes and bytes (in-memory or memory-mapped inputs;
  the bytes are hashed in blocks of ~64 MB, as one stream: the same hash as of the whole)."""
  h = hashlib.sha256()
  for a in arrays:
    a = np.asarray(a)
    a = a.reshape(1) if a.ndim == 0 else a
    h.update(str(a.dtype).encode() + str(a.shape).encode())
    step = max(1, HASH_BLOCK_BYTES // max(1, a.itemsize * int(np.prod(a.shape[1:]))))
    for start in range(0, len(a), step):
      h.update(memoryview(np.ascontiguousarray(a[start:start + step])).cast("B"))
  return h.hexdigest()[:16]


def data_fingerprint(data_config: Any) -> str:
  """A cheap content fingerprint of a config's `data` section: equal only for the same data.

  Reads no image: it hashes (`jaxattr.utils.config_hash`) the options given (not None) plus
  ``digits``: the source name and scikit-learn's version (the images ship with it);
  ``folder:DIR``: the sorted relative file list of DIR with sizes and mtimes (not DIR's path, so a
  tree keeps its fingerprint under another spelling of its path);
  ``folder:ARCHIVE`` and ``npz:FILE``: the file's absolute path, size and mtime;
  ``tfds:NAME``: the prepared dataset directory's relative file list with sizes, or, where that
  directory is not local, the builder's version and split sizes.

  Args:
    data_config: `config.data`: `source` and `options`, as for `data.load_splits`.

  Returns:
    A short hex string.

  Raises:
    data.DataError: what `data.load` raises for a missing path, an unknown source, an unknown
      option or bad option value (`data.parse_source`, `data.check_options`) or an unprepared
      tfds dataset (`data.prepared_tfds_builder`).
  """
  kind, arg = data.parse_source(data_config.source)
  options = {k: v for k, v in dict(data_config.options).items() if v is not None}
  data.check_options(kind, options)
  if kind == "digits":
    import sklearn  # pylint: disable=g-import-not-at-top
    content: Any = {"sklearn": sklearn.__version__}
  elif kind == "folder":
    content = _file_list(arg, mtimes=True) if os.path.isdir(arg) else _file_stat(arg)
  elif kind == "npz":
    content = _file_stat(arg)
  else:
    content = _tfds_content(arg, options.get("data_dir"))
  return utils.config_hash({"kind": kind, "content": content, "options": options})


def path_content(path: str) -> list[Any]:
  """A file's absolute path, size and mtime, or a directory's relative file list with sizes and
  mtimes (an encoder checkpoint, for instance): JSON-able, equal only for the same files."""
  return _file_list(path, mtimes=True) if os.path.isdir(path) else _file_stat(path)


def _file_stat(path: str) -> list[Any]:
  st = os.stat(path)
  return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


def _file_list(root: str, mtimes: bool) -> list[list[Any]]:
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    for name in sorted(filenames):
      full = os.path.join(dirpath, name)
      st = os.stat(full)
      rel = os.path.relpath(full, root).replace(os.sep, "/")
      out.append([rel, st.st_size] + ([st.st_mtime_ns] if mtimes else []))
    if not filenames and dirpath != root:
      # An empty class folder makes loading fail, so adding one must change the fingerprint.
      out.append([os.path.relpath(dirpath, root).replace(os.sep, "/") + "/"])
  return sorted(out)


def _tfds_content(name: str, data_dir: str | None) -> Any:
  builder = data.prepared_tfds_builder(name, data_dir)
  directory = str(getattr(builder, "data_dir", ""))
  if directory and os.path.isdir(directory):
    return _file_list(directory, mtimes=False)
  splits = getattr(builder.info, "splits", {})
  return {
      "version": str(getattr(builder, "version", "")),
      "splits": {
          s: int(getattr(splits[s], "num_examples", -1)) for s in sorted(splits)
      }
  }

"""`ChunkStore`: a large [N, ...] array written to disk chunk by chunk, resumable and atomic.

The array lives in `PATH.partial` (a .npy file, memory-mapped, so only the chunk being written is
in host memory) until every chunk is written; then it is renamed to PATH in one step. A chunk
counts as written once its marker `PATH.chunks/<id>.npz` exists (written atomically after the
rows are flushed; it also holds per-row extras such as `ok` flags). `PATH.chunks/plan.json`
names what the rows belong to (`key`: a fingerprint of the config and data), the shape, dtype and
chunk size: a rerun resumes only a plan that is exactly its own, and otherwise starts over. Chunks
are disjoint row ranges, so processes that share the directory may fill different chunks.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import numpy as np
from absl import logging

from jaxattr import utils


class ChunkStore:
  """A [num_rows, *row_shape] array on disk, filled in chunks of `chunk_rows` rows."""

  def __init__(self, path: str, shape: tuple[int, ...], dtype: Any, chunk_rows: int, key: str,
               create: bool = True):
    """Opens (resuming) or creates the store.

    Args:
      path: the final .npy path.
      shape: the full array's shape.
      dtype: its dtype.
      chunk_rows: rows per chunk (the last may be shorter).
      key: what the rows belong to; a partial store of another key is discarded.
      create: create a missing or mismatched store (False: another process does; wait for it).
    """
    self.path, self.shape, self.dtype = path, tuple(int(s) for s in shape), np.dtype(dtype)
    self.chunk_rows, self.key = int(chunk_rows), key
    self.partial, self.chunks = path + ".partial", path + ".chunks"
    self.plan = {
        "key": key,
        "shape": list(self.shape),
        "dtype": self.dtype.str,
        "chunk_rows": self.chunk_rows
    }
    self.num_chunks = -(-self.shape[0] // self.chunk_rows) if self.shape[0] else 0
    if create and not self._plan_matches():
      if os.path.exists(self.partial) or os.path.exists(self.chunks):
        logging.info("%s: discarding a partial store of another config, data or shape", path)
      self.discard()
      os.makedirs(self.chunks, exist_ok=True)
      # Created at full size (sparse where the filesystem allows), then filled in place.
      with utils.atomic_path(self.partial) as tmp:
        np.lib.format.open_memmap(tmp, mode="w+", dtype=self.dtype, shape=self.shape).flush()
      utils.save_json(os.path.join(self.chunks, "plan.json"), self.plan)
    self._array = None

  def _plan_matches(self) -> bool:
    try:
      with open(os.path.join(self.chunks, "plan.json")) as f:
        return json.load(f) == self.plan and os.path.exists(self.partial)
    except (OSError, ValueError):
      return False

  def discard(self) -> None:
    """Removes the partial array and the markers (not a finished PATH)."""
    if os.path.exists(self.partial):
      os.remove(self.partial)
    shutil.rmtree(self.chunks, ignore_errors=True)

  def chunk(self, j: int) -> tuple[int, int]:
    """Chunk j's rows [start, stop)."""
    return j * self.chunk_rows, min((j + 1) * self.chunk_rows, self.shape[0])

  def _marker(self, j: int) -> str:
    return os.path.join(self.chunks, f"{j:07d}.npz")

  def done(self) -> set[int]:
    """The chunks already written."""
    return {j for j in range(self.num_chunks) if os.path.exists(self._marker(j))}

  def missing(self, meter: Any = None, shard: tuple[int, int] = (0, 1)) -> Any:
    """Yields (j, start, stop) of every chunk not yet written, in order; `meter`
    (`utils.Throughput`) is credited with the rows of the chunks already written. shard (i, n):
    only chunks j with j % n == i (process i of n)."""
    done = self.done()
    for j in range(self.num_chunks):
      if j % shard[1] != shard[0]:
        continue
      start, stop = self.chunk(j)
      if j in done:
        if meter is not None:
          meter.update(stop - start)
        continue
      yield j, start, stop

  def write(self, j: int, rows: np.ndarray, **extras: np.ndarray) -> None:
    """Writes chunk j's rows (flushed to disk), then its marker with `extras`."""
    start, stop = self.chunk(j)
    if rows.shape != (stop - start,) + self.shape[1:]:
      raise ValueError(
          f"{self.path}: chunk {j} needs rows of shape {(stop - start,) + self.shape[1:]}"
          f", got {rows.shape}")
    if self._array is None:
      self._array = np.load(self.partial, mmap_mode="r+")
    self._array[start:stop] = rows.astype(self.dtype, copy=False)
    self._array.flush()
    utils.save_npz(self._marker(j), **extras)

  def extras(self, name: str) -> np.ndarray:
    """The concatenation over chunks (in order) of one extra array of the markers."""
    parts = []
    for j in range(self.num_chunks):
      with np.load(self._marker(j)) as z:
        parts.append(z[name])
    return np.concatenate(parts) if parts else np.zeros((0,))

  def finish(self) -> np.ndarray:
    """Renames the complete array onto PATH, drops the markers; returns it memory-mapped.

    Raises:
      RuntimeError: chunks are missing (naming how many).
    """
    missing = self.num_chunks - len(self.done())
    if missing:
      raise RuntimeError(f"{self.path}: {missing} of {self.num_chunks} chunks are not written yet")
    self._array = None
    os.replace(self.partial, self.path)
    shutil.rmtree(self.chunks, ignore_errors=True)
    return np.load(self.path, mmap_mode="r")

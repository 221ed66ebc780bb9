"""`jax.lax.top_k`'s selection on the host, for CPU devices, where it is faster.

Same result as top_k: positions of the k largest values per row, best first, ties broken by the
lower position (boundary ties included).
"""

from __future__ import annotations

import functools
import os
from concurrent import futures

import numpy as np

# Rows per task of `host_topk`'s thread pool (NumPy's partition and sort release the GIL).
HOST_TOPK_ROWS = 128
HOST_TOPK_WORKERS = max(1, os.cpu_count() or 1)


@functools.lru_cache(maxsize=1)
def _host_pool() -> futures.ThreadPoolExecutor:
  return futures.ThreadPoolExecutor(HOST_TOPK_WORKERS, "host_topk")


def host_topk(ranked: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """`jax.lax.top_k` on the host: (positions [B, k], scores [B, k]) of the k <= n largest of
  `ranked` [B, n] (no NaN) per row, best first, and `scores` [B, n] there.

  Ties are broken as top_k does (lower position first), boundary ties included. On XLA:CPU a
  partition plus a sort of the k kept entries beats top_k, and row blocks run on all cores.
  """
  if HOST_TOPK_WORKERS > 1 and len(ranked) >= 2 * HOST_TOPK_ROWS:
    step = max(HOST_TOPK_ROWS, -(-len(ranked) // HOST_TOPK_WORKERS))
    parts = list(_host_pool().map(
        lambda i: _host_topk_rows(ranked[i:i + step], scores[i:i + step], k),
        range(0, len(ranked), step)))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
  return _host_topk_rows(ranked, scores, k)


def _host_topk_rows(ranked: np.ndarray, scores: np.ndarray,
                    k: int) -> tuple[np.ndarray, np.ndarray]:
  part = np.argpartition(-ranked, k - 1, axis=1)[:, :k]
  kept = np.take_along_axis(ranked, part, 1)
  kth = kept.min(1)
  # Rows where the k-th value ties with entries left out: keep the lowest tied positions.
  short = np.flatnonzero((ranked == kth[:, None]).sum(1) > (kept == kth[:, None]).sum(1))
  for row in short:
    above = np.flatnonzero(ranked[row] > kth[row])
    tied = np.flatnonzero(ranked[row] == kth[row])[:k - len(above)]
    part[row] = np.concatenate([above, tied])
  # Order the kept entries by (value descending, position ascending) with one sort of int64 keys:
  # the float32 bits mapped to an order-preserving unsigned integer (inverted for descending),
  # the position in the low 32 bits: much faster than np.lexsort.
  bits = (np.take_along_axis(ranked, part, 1).astype(np.float32) + np.float32(0.0)).view(
      np.uint32).astype(np.uint64)  # + 0.0: -0.0 ties with 0.0, as in top_k
  ordered = np.where(bits >> 31 == 1, ~bits & 0xFFFFFFFF, bits | 0x80000000)
  keys = ((0xFFFFFFFF - ordered) << 32) | part.astype(np.uint64)
  keys.sort(axis=1)
  pos = (keys & 0xFFFFFFFF).astype(np.int64)
  return pos, np.take_along_axis(scores, pos, 1)

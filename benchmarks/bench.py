"""Benchmark helpers: timing after warm-up with median and spread, a printed table, JSON out.

Every benchmark launcher measures jaxattr and its reference side by side in one run and writes
its table plus the resolved settings and `utils.provenance()` to JSON.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Sequence

from jaxattr import utils


def time_fn(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> dict[str, float]:
  """Times `fn()` (which must block until its work is done) after `warmup` calls.

  Returns:
    {'median_s', 'min_s', 'max_s', 'repeats'} over `repeats` timed calls.
  """
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return summarize(times)


def summarize(times: Sequence[float]) -> dict[str, Any]:
  """{'median_s', 'min_s', 'max_s', 'repeats', 'times_s'} of timed calls' seconds."""
  return {
      "median_s": statistics.median(times),
      "min_s": min(times),
      "max_s": max(times),
      "repeats": len(times),
      "times_s": [float(t) for t in times]
  }


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
  """A plain-text table of `rows` (dicts), floats with 4 significant digits."""
  if not rows:
    return "(no rows)"
  columns = list(columns or rows[0].keys())

  def fmt(v: Any) -> str:
    if isinstance(v, float):
      return f"{v:,.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    return str(v)

  cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
  widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
  line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
  sep = "  ".join("-" * w for w in widths)
  body = ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
  return "\n".join([line, sep, *body])


def write_result(path: str, name: str, rows: Sequence[dict[str, Any]], settings: dict[str,
                                                                                      Any]) -> None:
  """Writes {'benchmark', 'rows', 'settings', 'provenance'} atomically to `path`."""
  utils.save_json(path, {
      "benchmark": name,
      "rows": list(rows),
      "settings": settings,
      "provenance": utils.provenance()
  })


def int_list(name: str, values: list[str], lo: int) -> list[int]:
  """A comma-separated int flag's values (absl DEFINE_list), or a usage error naming the flag."""
  from absl import app  # pylint: disable=g-import-not-at-top

  try:
    out = [int(v) for v in values]
  except ValueError:
    out = []
  if not out or min(out) < lo:
    raise app.UsageError(f"--{name}={','.join(values)}: expected comma-separated integers >= {lo}")
  return out


def cpu_peak_tflops() -> float:
  """A float32 matmul's achieved TFLOP/s on this machine's default backend (on the CPU the
  practical peak for an MFU)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  a = jnp.ones((2048, 2048), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  t = time_fn(lambda: f(a).block_until_ready(), repeats=5, warmup=2)
  return 2 * 2048**3 / t["min_s"] / 1e12

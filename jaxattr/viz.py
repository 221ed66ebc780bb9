"""Image grids (PNG) for looking at attributions."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxattr import utils


def grid_array(targets: Sequence[np.ndarray], rows: Sequence[Sequence[np.ndarray]], pad: int = 2,
               gap: int = 6) -> np.ndarray:
  """One row per target: the target, a gap, then its images. uint8 [H, W, 3] (white background)."""
  h, w = np.asarray(targets[0]).shape[:2]
  ncol = max(len(r) for r in rows)
  height = len(targets) * (h + pad) + pad
  width = pad + w + gap + ncol * (w + pad)
  canvas = np.full((height, width, 3), 255, np.uint8)
  for i, (t, r) in enumerate(zip(targets, rows)):
    y = pad + i * (h + pad)
    canvas[y:y + h, pad:pad + w] = t
    for j, im in enumerate(r):
      x = pad + w + gap + j * (w + pad)
      canvas[y:y + h, x:x + w] = im
  return canvas


def save_grid(path: str, targets: Sequence[np.ndarray], rows: Sequence[Sequence[np.ndarray]],
              title: str = "", scale: int = 3) -> None:
  """Writes the grid as a PNG, upscaled `scale` times (nearest) so small images stay visible."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  canvas = grid_array(targets, rows)
  im = Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale),
                                      Image.NEAREST)
  info = None
  if title:
    from PIL import PngImagePlugin  # pylint: disable=g-import-not-at-top
    info = PngImagePlugin.PngInfo()
    info.add_text("Title", title)
  with utils.atomic_path(path) as tmp:
    im.save(tmp, format="PNG", pnginfo=info)

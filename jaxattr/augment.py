"""On-device image augmentation as pure functions of (key, uint8 images), for use inside jit.

`simclr_views` is the view recipe of the reference's MoCo training (REFERENCE.md section 4):
RandomResizedCrop(scale 0.08..1, ratio 3/4..4/3) -> horizontal flip (p 0.5) -> ColorJitter(0.4,
0.4, 0.4, 0.1) with p 0.8 (the four ops in a random order) -> grayscale (p 0.2) -> normalise.
No blur. The crop is a separable bilinear resampling, i.e. two small matrix products per image,
which maps well onto accelerators.

`cifar_train_views` is the counterfactual models' recipe (REFERENCE.md section 3): random
horizontal flip, random translation with zero padding, Cutout filled with the mean, then
`cifar_normalize` on the 0..255 scale (not `normalize`'s ImageNet statistics on 0..1).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The counterfactual recipe's normalisation, on the 0..255 scale.
CIFAR_MEAN = (125.307, 122.961, 113.8575)
CIFAR_STD = (51.5865, 50.847, 51.255)
# NumPy, not jnp: a module-level jax array would start the backend at import, before a launcher
# can set XLA_FLAGS (jaxattr.xla_flags).
_GRAY = np.array([0.299, 0.587, 0.114], np.float32)


def normalize(images: jax.Array, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> jax.Array:
  """uint8 (or 0..1 float) [..., 3] -> float32 normalised with `mean`/`std` on the 0..1 scale."""
  x = images.astype(jnp.float32)
  if images.dtype == jnp.uint8:
    x = x / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def _sample_crop(key: jax.Array, height: int, width: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                 tries: int = 10) -> jax.Array:
  """torchvision's RandomResizedCrop.get_params: returns float32 [4] = (top, left, h, w).

  Up to `tries` (area, aspect) draws; the first that fits is used, else the central crop of the
  image clipped to the ratio range (torchvision's fallback).
  """
  k_area, k_ratio, k_top, k_left = jax.random.split(key, 4)
  area = height * width
  target = area * jax.random.uniform(k_area, (tries,), minval=scale[0], maxval=scale[1])
  log_r = jax.random.uniform(k_ratio, (tries,), minval=math.log(ratio[0]),
                             maxval=math.log(ratio[1]))
  aspect = jnp.exp(log_r)
  w = jnp.round(jnp.sqrt(target * aspect))
  h = jnp.round(jnp.sqrt(target / aspect))
  ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
  first = jnp.argmax(ok)
  any_ok = jnp.any(ok)
  # Fallback: whole image, aspect clipped into the ratio range.
  in_ratio = width / height
  if in_ratio < ratio[0]:
    fw, fh = width, round(width / ratio[0])
  elif in_ratio > ratio[1]:
    fh, fw = height, round(height * ratio[1])
  else:
    fw, fh = width, height
  h = jnp.where(any_ok, h[first], fh)
  w = jnp.where(any_ok, w[first], fw)
  # torch.randint(0, H - h + 1): uniform integer offsets.
  top = jnp.floor(jax.random.uniform(k_top) * (height - h + 1))
  left = jnp.floor(jax.random.uniform(k_left) * (width - w + 1))
  return jnp.stack([top, left, h, w]).astype(jnp.float32)


def _interp_matrix(start: jax.Array, length: jax.Array, in_size: int, out_size: int) -> jax.Array:
  """[out_size, in_size] bilinear weights resampling [start, start+length) to out_size pixels.

  Pixel centres are aligned as in torch's interpolate(align_corners=False).
  """
  o = jnp.arange(out_size, dtype=jnp.float32)
  src = start + (o + 0.5) * (length / out_size) - 0.5
  src = jnp.clip(src, start, start + length - 1)
  lo = jnp.floor(src)
  frac = src - lo
  hi = jnp.minimum(lo + 1, in_size - 1)
  cols = jnp.arange(in_size, dtype=jnp.float32)
  return ((cols[None, :] == lo[:, None]) * (1 - frac)[:, None] +
          (cols[None, :] == hi[:, None]) * frac[:, None])


def _rgb_to_hsv(rgb: jax.Array) -> jax.Array:
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  maxc = jnp.max(rgb, axis=-1)
  minc = jnp.min(rgb, axis=-1)
  v = maxc
  delta = maxc - minc
  s = jnp.where(maxc > 0, delta / jnp.where(maxc > 0, maxc, 1.0), 0.0)
  safe = jnp.where(delta > 0, delta, 1.0)
  rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
  h = jnp.where(maxc == r, bc - gc, jnp.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
  h = jnp.where(delta > 0, (h / 6.0) % 1.0, 0.0)
  return jnp.stack([h, s, v], axis=-1)


def _hsv_to_rgb(hsv: jax.Array) -> jax.Array:
  h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
  i = jnp.floor(h * 6.0)
  f = h * 6.0 - i
  p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
  i = i.astype(jnp.int32) % 6
  r = jnp.select([i == 0, i == 1, i == 2, i == 3, i == 4], [v, q, p, p, t], v)
  g = jnp.select([i == 0, i == 1, i == 2, i == 3, i == 4], [t, v, v, q, p], p)
  b = jnp.select([i == 0, i == 1, i == 2, i == 3, i == 4], [p, p, t, v, v], q)
  return jnp.stack([r, g, b], axis=-1)


def _gray(x: jax.Array) -> jax.Array:
  return jnp.sum(x * _GRAY, axis=-1, keepdims=True)


def color_jitter(key: jax.Array, x: jax.Array, brightness=0.4, contrast=0.4, saturation=0.4,
                 hue=0.1) -> jax.Array:
  """torchvision ColorJitter on one float image [H, W, 3] in 0..1; ops in a random order."""
  kb, kc, ks, kh, kp = jax.random.split(key, 5)
  fb = jax.random.uniform(kb, minval=1 - brightness, maxval=1 + brightness)
  fc = jax.random.uniform(kc, minval=1 - contrast, maxval=1 + contrast)
  fs = jax.random.uniform(ks, minval=1 - saturation, maxval=1 + saturation)
  fh = jax.random.uniform(kh, minval=-hue, maxval=hue)

  def do_brightness(y):
    return jnp.clip(y * fb, 0, 1)

  def do_contrast(y):
    return jnp.clip(fc * y + (1 - fc) * jnp.mean(_gray(y)), 0, 1)

  def do_saturation(y):
    return jnp.clip(fs * y + (1 - fs) * _gray(y), 0, 1)

  def do_hue(y):
    hsv = _rgb_to_hsv(y)
    hsv = hsv.at[..., 0].set((hsv[..., 0] + fh) % 1.0)
    return _hsv_to_rgb(hsv)

  ops = (do_brightness, do_contrast, do_saturation, do_hue)
  order = jax.random.permutation(kp, 4)

  def body(i, y):
    return jax.lax.switch(order[i], ops, y)

  return jax.lax.fori_loop(0, 4, body, x)


def simclr_view(key: jax.Array, image: jax.Array, out_size: int, *, min_scale: float = 0.08,
                jitter_p: float = 0.8, gray_p: float = 0.2, mean=IMAGENET_MEAN,
                std=IMAGENET_STD) -> jax.Array:
  """One augmented view of one uint8 image [H, W, 3] -> float32 [out, out, 3], normalised."""
  height, width = image.shape[0], image.shape[1]
  k_crop, k_flip, k_jit, k_jp, k_gp = jax.random.split(key, 5)
  top, left, h, w = _sample_crop(k_crop, height, width, scale=(min_scale, 1.0))
  wy = _interp_matrix(top, h, height, out_size)
  wx = _interp_matrix(left, w, width, out_size)
  wx = jnp.where(jax.random.bernoulli(k_flip), wx[::-1], wx)
  x = image.astype(jnp.float32) / 255.0
  x = jnp.einsum("oh,hwc,pw->opc", wy, x, wx)
  x = jnp.clip(x, 0.0, 1.0)
  x = jnp.where(jax.random.bernoulli(k_jp, jitter_p), color_jitter(k_jit, x), x)
  x = jnp.where(jax.random.bernoulli(k_gp, gray_p), jnp.broadcast_to(_gray(x), x.shape), x)
  return normalize(x, mean, std)


def simclr_views(key: jax.Array, images: jax.Array, out_size: int | None = None,
                 **kwargs) -> jax.Array:
  """Independent views of a batch: uint8 [B, H, W, 3] -> float32 [B, out, out, 3]."""
  out_size = out_size or images.shape[1]
  keys = jax.random.split(key, images.shape[0])
  return jax.vmap(lambda k, im: simclr_view(k, im, out_size, **kwargs))(keys, images)


def denormalize_to_uint8(x: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
  """Inverse of `normalize`, for looking at views."""
  y = np.asarray(x) * np.asarray(std) + np.asarray(mean)
  return np.clip(np.round(y * 255), 0, 255).astype(np.uint8)


def cifar_normalize(images: jax.Array) -> jax.Array:
  """uint8 or float images [..., 3] on the 0..255 scale -> float32 with CIFAR_MEAN/STD."""
  return (images.astype(jnp.float32) - jnp.asarray(CIFAR_MEAN)) / jnp.asarray(CIFAR_STD)


def _part(draws: jax.Array, part: tuple[jax.Array, int] | None) -> jax.Array:
  """Rows [start, start + size) of per-image draws [B, ...] (all of them when part is None)."""
  if part is None:
    return draws
  start, size = part
  return jax.lax.dynamic_slice_in_dim(draws, start, size)


def cifar_train_views(key: jax.Array, images: jax.Array, flip: bool = True, translate: int = 2,
                      cutout: int = 8, batch: int | None = None,
                      start: jax.Array | None = None) -> jax.Array:
  """The reference's training augmentation, then `cifar_normalize`, on one batch.

  Args:
    key: PRNG key for this batch.
    images: uint8 [B, H, W, 3].
    flip: random horizontal flip with probability 1/2.
    translate: shift by an integer in [-translate, translate] per axis, zero padding.
    cutout: side of a square placed uniformly inside the image and filled with the mean (0: off).
    batch, start: `images` are rows [start, start + len(images)) of a batch of `batch` images (a
      data-parallel device's part); their views equal those rows of the whole batch's views.

  Returns:
    float32 [B, H, W, 3], normalised.
  """
  b, h, w, _ = images.shape
  full = b if batch is None else batch
  part = None if batch is None else (start, b)
  kf, kt, kc = jax.random.split(key, 3)
  x = images.astype(jnp.float32)
  if flip:
    do = _part(jax.random.bernoulli(kf, 0.5, (full,)), part)
    x = jnp.where(do[:, None, None, None], x[:, :, ::-1], x)
  if translate:
    t = translate
    xp = jnp.pad(x, ((0, 0), (t, t), (t, t), (0, 0)))
    off = _part(jax.random.randint(kt, (full, 2), 0, 2 * t + 1), part)
    x = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, 3)))(xp, off)
  if cutout:
    c = cutout
    ky, kx = jax.random.split(kc)
    y0 = _part(jax.random.randint(ky, (full, 1), 0, h - c + 1), part)
    x0 = _part(jax.random.randint(kx, (full, 1), 0, w - c + 1), part)
    rows = jnp.arange(h)[None]
    cols = jnp.arange(w)[None]
    inside = (((rows >= y0) & (rows < y0 + c))[:, :, None] & ((cols >= x0) &
                                                              (cols < x0 + c))[:, None, :])
    x = jnp.where(inside[..., None], jnp.asarray(CIFAR_MEAN), x)
  return cifar_normalize(x)


def _area_matrix(start: jax.Array, length: jax.Array, in_size: int, out_size: int) -> jax.Array:
  """[out_size, in_size] weights resampling pixels [start, start + length) to out_size pixels
  with PIL's antialiased bilinear filter: a triangle as wide as the scale when shrinking (every
  source pixel contributes), plain bilinear when enlarging; rows sum to 1, the edge clamped."""
  scale = length / out_size
  support = jnp.maximum(scale, 1.0)
  centre = start + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * scale
  cols = jnp.arange(in_size, dtype=jnp.float32)
  weight = jnp.maximum(0.0, 1.0 - jnp.abs(cols[None, :] + 0.5 - centre[:, None]) / support)
  inside = (cols >= start) & (cols < start + length)
  weight = jnp.where(inside[None, :], weight, 0.0)
  return weight / jnp.maximum(weight.sum(1, keepdims=True), 1e-12)


def rrc_view(key: jax.Array, image: jax.Array, out_size: int, min_scale: float = 0.08,
             flip: bool = True, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> jax.Array:
  """ffcv-imagenet's training view of one uint8 image [H, W, 3]: RandomResizedCrop (area
  min_scale..1, aspect 3/4..4/3, torchvision's sampling) resized to out_size x out_size with an
  antialiased bilinear filter, a horizontal flip with probability 1/2, ImageNet normalisation."""
  height, width = image.shape[0], image.shape[1]
  k_crop, k_flip = jax.random.split(key)
  top, left, h, w = _sample_crop(k_crop, height, width, scale=(min_scale, 1.0))
  wy = _area_matrix(top, h, height, out_size)
  wx = _area_matrix(left, w, width, out_size)
  if flip:
    wx = jnp.where(jax.random.bernoulli(k_flip), wx[::-1], wx)
  x = jnp.einsum("oh,hwc,pw->opc", wy, image.astype(jnp.float32) / 255.0, wx)
  return normalize(x, mean, std)


def rrc_train_views(key: jax.Array, images: jax.Array, out_size: int, min_scale: float = 0.08,
                    flip: bool = True, batch: int | None = None,
                    start: jax.Array | None = None) -> jax.Array:
  """`rrc_view` of every image of a batch, each with its own key (split from `key` over the
  whole batch of `batch` images, of which `images` are rows [start, ...): a data-parallel part
  gets the views the whole batch would): uint8 [B, H, W, 3] -> float32 [B, out, out, 3]."""
  b = images.shape[0]
  keys = jax.random.split(key, b if batch is None else batch)
  if batch is not None:
    keys = jax.lax.dynamic_slice_in_dim(keys, start, b)
  return jax.vmap(lambda k, im: rrc_view(k, im, out_size, min_scale, flip))(keys, images)

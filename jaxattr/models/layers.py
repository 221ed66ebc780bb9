"""Layers with PyTorch semantics, so converted PyTorch weights give the same outputs.

* `conv`: explicit symmetric padding like torch.nn.Conv2d (XLA's 'SAME' pads stride-2 convs
  asymmetrically, which would shift every feature map by a pixel).
* `BatchNorm`: torch.nn.BatchNorm2d semantics: normalise with the biased batch variance, update
  the running variance with the unbiased one, `momentum` is torch's (0.1 = flax's 0.9).
  With `num_splits > 1` it is lightly's SplitBatchNorm: in training the batch is cut into
  `num_splits` interleaved groups (sample n belongs to group n % num_splits) that are normalised
  with their own statistics; running statistics are kept per group, shape [num_splits * C] in
  torch's layout; at eval the statistics averaged over groups are used. `split_layout='blocked'`
  takes the groups as contiguous blocks instead (group g = rows [g n / s, (g + 1) n / s)): the
  same normalisation for a batch whose rows were sorted by group (`group_order`), and, with the
  batch sharded over D devices that divide num_splits, statistics that stay on each device.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def conv(features: int, kernel: int, stride: int = 1, padding: int | None = None,
         dtype: Dtype = jnp.float32, name: str | None = None, use_bias: bool = False,
         groups: int = 1) -> nn.Conv:
  """A torch-style Conv2d (NHWC, HWIO kernel) with explicit symmetric padding."""
  if padding is None:
    padding = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((padding, padding),
                                                                                (padding, padding)),
                 use_bias=use_bias, feature_group_count=groups, dtype=dtype, name=name,
                 kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"))


def patch_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
  """A convolution (NHWC x HWIO, symmetric zero padding) as one matrix product of the k x k
  patches: the same values as XLA's convolution. Its autodiff is pads, slices and two more matrix
  products, where XLA:CPU's own weight gradient of a convolution with a 2 x 2 output took over
  a second for ResNet-18's layer4 (32 px crops)."""
  b, h, w, c = x.shape
  k = kernel.shape[0]
  ho, wo = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
  xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  taps = [
      jax.lax.slice(xp, (0, i, j, 0), (b, i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1, c),
                    (1, stride, stride, 1)) for i in range(k) for j in range(k)
  ]
  patches = jnp.concatenate(taps, axis=-1).reshape(b * ho * wo, k * k * c)
  return (patches @ kernel.reshape(k * k * c, -1)).reshape(b, ho, wo, -1)


class Conv(nn.Module):
  """`conv`'s module (same parameters, init and values) that computes small outputs (at most
  `patch_below` pixels) with `patch_conv` instead of XLA's convolution (`patch_below` 0: never)."""

  features: int
  kernel: int
  stride: int = 1
  padding: int = 0
  dtype: Dtype = jnp.float32
  patch_below: int = 0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                        (self.kernel, self.kernel, x.shape[-1], self.features), jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    ho = (x.shape[1] + 2 * self.padding - self.kernel) // self.stride + 1
    wo = (x.shape[2] + 2 * self.padding - self.kernel) // self.stride + 1
    if ho * wo <= self.patch_below:
      return patch_conv(x, kernel, self.stride, self.padding)
    return jax.lax.conv_general_dilated(x, kernel, (self.stride,) * 2,
                                        ((self.padding, self.padding),) * 2,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def materialize(x: jax.Array) -> jax.Array:
  """x itself, which XLA then stores once instead of recomputing it inside each consumer.

  XLA:CPU fuses cheap elementwise producers (BatchNorm, ReLU, residual sums, BlurPool) into
  every consumer, among them the transposes that a convolution's weight gradient needs: those
  recompute the producer chain in transposed order, reading each operand with a stride of a
  whole image (ResNet-18 at 48 px, batch 64: 95 ms for the input of layer2_0 against ~9 ms
  for a transpose of the stored array). `jax.lax.optimization_barrier` does not prevent this
  on XLA:CPU (it is removed before fusion); a conditional is a fusion boundary. The predicate
  is true for every value (no float exceeds +inf) but XLA cannot prove it, so the branch stays.
  Under vmap the predicate is batched and the conditional becomes a select (same values).
  """
  first = x.reshape(-1)[0]
  return jax.lax.cond(~(first > jnp.inf), lambda a: a, jnp.zeros_like, x)


def max_pool(x: jax.Array, window: int, stride: int, padding: int = 0) -> jax.Array:
  """torch.nn.MaxPool2d with symmetric padding (padded cells never win).

  The ResNet stem's 3x3 / 2 pool (padding 1) on an even-sized input is differentiated by
  `_pool_3x3s2`: XLA's select-and-scatter gradient took a fifth of a ResNet-18 training step on
  XLA:CPU (64 px inputs).
  """
  if (window, stride, padding) == (3, 2, 1) and x.shape[1] % 2 == 0 and x.shape[2] % 2 == 0:
    return _pool_3x3s2(x)
  return _reduce_max(x, window, stride, padding)


def _reduce_max(x: jax.Array, window: int, stride: int, padding: int) -> jax.Array:
  return nn.max_pool(x, (window, window), strides=(stride, stride),
                     padding=((padding, padding), (padding, padding)))


def _window_taps(x: jax.Array) -> list[jax.Array]:
  """The 9 inputs of every 3x3 / 2 window (padding 1, -inf) of an even-sized x [B, H, W, C], in
  row-major window order, each [B, H / 2, W / 2, C]: strided views through a 2x2 phase split."""
  b, h, w, c = x.shape
  ho, wo = h // 2, w // 2
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  xr = xp.reshape(b, ho + 1, 2, wo + 1, 2, c)
  return [
      xr[:, i // 2:i // 2 + ho, i % 2, j // 2:j // 2 + wo, j % 2]
      for i in range(3)
      for j in range(3)
  ]


@jax.custom_vjp
def _pool_3x3s2(x: jax.Array) -> jax.Array:
  return _reduce_max(x, 3, 2, 1)


def _pool_3x3s2_fwd(x):
  y = _reduce_max(x, 3, 2, 1)
  return y, (x, y)


def _pool_3x3s2_bwd(residuals, g):
  """torch's routing: each window's gradient goes to its first maximal input (row-major). Built
  per 2x2 phase of the padded input at the output's resolution, then interleaved once."""
  x, y = residuals
  b, h, w, c = x.shape
  ho, wo = h // 2, w // 2
  taken = jnp.zeros(y.shape, bool)
  phases = [[None, None], [None, None]]
  for t, tap in enumerate(_window_taps(x)):
    i, j = divmod(t, 3)
    hit = (tap == y) & ~taken
    taken = taken | hit
    part = jnp.pad(jnp.where(hit, g, jnp.zeros((), g.dtype)),
                   ((0, 0), (i // 2, 1 - i // 2), (j // 2, 1 - j // 2), (0, 0)))
    cur = phases[i % 2][j % 2]
    phases[i % 2][j % 2] = part if cur is None else cur + part
  grid = jnp.stack([jnp.stack(row, axis=3) for row in phases], axis=2)  # [B, Ho+1, 2, Wo+1, 2, C]
  grid = grid.reshape(b, 2 * ho + 2, 2 * wo + 2, c)
  return (grid[:, 1:h + 1, 1:w + 1].astype(x.dtype),)


_pool_3x3s2.defvjp(_pool_3x3s2_fwd, _pool_3x3s2_bwd)


class BatchNorm(nn.Module):
  """torch-semantics BatchNorm2d over the channel (last) axis; see the module docstring."""

  num_splits: int = 1
  split_layout: str = "interleaved"  # or 'blocked' (see the module docstring)
  momentum: float = 0.1  # torch convention: new = (1 - m) * old + m * batch
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  scale_init: Any = nn.initializers.ones
  # A mesh axis (inside shard_map) whose devices each hold an equal part of the batch: training
  # statistics are then those of the whole batch (means of the parts' means), as on one device.
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    c = x.shape[-1]
    s = self.num_splits
    scale = self.param("scale", self.scale_init, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((s * c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((s * c,), jnp.float32))
    if train:
      n = x.shape[0]
      if s == 1:
        # No split axis at all: XLA:CPU fuses this flat form's autodiff into fewer passes
        # (ResNet-9 training ~5% faster per step than with a size-1 split axis).
        xs = x.astype(jnp.float32)
        axes = tuple(range(xs.ndim - 1))
      else:
        if n % s:
          raise ValueError(f"SplitBatchNorm: batch {n} is not divisible by num_splits {s}")
        if self.split_layout == "blocked":  # [s, n // s, ..., c]: group g = the g-th block
          xs = x.astype(jnp.float32).reshape((s, n // s) + x.shape[1:])
          axes = tuple(range(1, xs.ndim - 1))
        elif self.split_layout == "interleaved":
          # [n // s, s, ..., c]: sample i goes to group i % s, as torch's view(-1, C * s, H, W).
          xs = x.astype(jnp.float32).reshape((n // s, s) + x.shape[1:])
          axes = (0,) + tuple(range(2, xs.ndim - 1))
        else:
          raise ValueError(f"SplitBatchNorm: split_layout={self.split_layout!r}; expected "
                           "'interleaved' or 'blocked'")
      mean = jnp.mean(xs, axis=axes)  # [s, c]
      if self.axis_name is not None:
        mean = jax.lax.pmean(mean, self.axis_name)
      var = jnp.mean(jnp.square(xs - jnp.expand_dims(mean, axes)), axis=axes)
      count = xs.size // (s * c)
      if self.axis_name is not None:
        var = jax.lax.pmean(var, self.axis_name)
        count *= jax.lax.axis_size(self.axis_name)
      if not self.is_initializing():
        unbiased = var * (count / max(count - 1, 1))
        m = self.momentum
        ra_mean.value = (1 - m) * ra_mean.value + m * mean.reshape(-1)
        ra_var.value = (1 - m) * ra_var.value + m * unbiased.reshape(-1)
      inv = jax.lax.rsqrt(var + self.epsilon) * scale  # [s, c]
      shift = bias - mean * inv
      y = xs * jnp.expand_dims(inv, axes) + jnp.expand_dims(shift, axes)
      return y.reshape(x.shape).astype(self.dtype)
    mean = ra_mean.value.reshape(s, c).mean(0)
    var = ra_var.value.reshape(s, c).mean(0)
    inv = jax.lax.rsqrt(var + self.epsilon) * scale
    shift = bias - mean * inv
    return (x.astype(jnp.float32) * inv + shift).astype(self.dtype)


def blur(x: jax.Array) -> jax.Array:
  """BlurPool's low-pass filter: the depthwise 3x3 kernel [1, 2, 1] x [1, 2, 1] / 16 at stride 1
  with zero padding 1, as two separable passes of shifted adds (no grouped convolution, which
  XLA:CPU runs slowly)."""
  dt = x.dtype

  def smooth(y, axis):
    pad = [(0, 0)] * y.ndim
    pad[axis] = (1, 1)
    yp = jnp.pad(y, pad)
    n = y.shape[axis]

    def take(lo):
      return jax.lax.slice_in_dim(yp, lo, lo + n, axis=axis)

    return (take(0) + 2 * take(1) + take(2)) * 0.25

  return smooth(smooth(x.astype(jnp.float32), 1), 2).astype(dt)


def count_params(params: Any) -> int:
  """Number of scalars in a parameter pytree."""
  return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))

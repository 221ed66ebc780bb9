"""Inference-time BatchNorm folding, an exact rewrite timed by benchmark_features.py.

conv(x, W) * s + t == conv(x, W * s) + t folds each eval-mode BatchNorm into the convolution
before it, removing one multiply-add pass over every activation.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp

# BN module name -> the conv it follows, inside the same parent module (both ResNet families).
_BN_AFTER = {
    "bn1": "conv1",
    "bn2": "conv2",
    "bn3": "conv3",
    "shortcut_bn": "shortcut_conv",
    "downsample_bn": "downsample_conv"
}


def fold_batchnorm(variables: Any, epsilon: float = 1e-5) -> tuple[Any, Any]:
  """Folds eval-mode BatchNorms into the convs before them (an exact inference rewrite).

  conv(x, W) * s + t == conv(x, W * s) + t with s = scale / sqrt(var + eps) and
  t = bias - mean * s per output channel (SplitBatchNorm statistics averaged over splits first,
  as at eval). This removes one multiply-add pass over every activation.

  Args:
    variables: {'params', 'batch_stats'} of a CifarResNet or ResNet.
    epsilon: the BatchNorm epsilon (torch's 1e-5, as in `layers.BatchNorm`).

  Returns:
    (params with folded conv kernels, {conv module path tuple: bias [C]}), for `apply_folded`.
  """
  params = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables["params"]))
  stats = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables["batch_stats"]))
  folded, biases = dict(params), {}
  for path in stats:
    if path[-1] != "mean":
      continue
    bn = path[:-1]
    conv = bn[:-1] + (_BN_AFTER[bn[-1]],)
    scale, shift = params[bn + ("scale",)], params[bn + ("bias",)]
    c = scale.shape[0]
    mean = jnp.reshape(stats[path], (-1, c)).mean(0)
    var = jnp.reshape(stats[bn + ("var",)], (-1, c)).mean(0)
    inv = scale * jax.lax.rsqrt(var + epsilon)
    folded[conv + ("kernel",)] = params[conv + ("kernel",)] * inv
    biases[conv] = shift - mean * inv
    del folded[bn + ("scale",)], folded[bn + ("bias",)]
  return flax.traverse_util.unflatten_dict(folded), biases


def apply_folded(model: Any, params: Any, biases: Any, images: jax.Array) -> dict[str, jax.Array]:
  """Eval-mode `model.apply` with the BatchNorms folded by `fold_batchnorm`.

  The model's own code runs unchanged: a method interceptor turns each folded BatchNorm into the
  identity and adds its shift after the conv before it.

  Args:
    model: the CifarResNet / ResNet whose variables were folded.
    params, biases: `fold_batchnorm`'s outputs.
    images: normalised images [B, H, W, 3].

  Returns:
    The model's outputs ({'feature': [B, D], ...}).
  """
  from jaxattr.models.layers import BatchNorm  # pylint: disable=g-import-not-at-top

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "__call__" and module.scope is not None:
      path = tuple(module.scope.path)
      if isinstance(module, BatchNorm) and path[-1] in _BN_AFTER:
        if path[:-1] + (_BN_AFTER[path[-1]],) in biases:
          return args[0]
      elif isinstance(module, flax.linen.Conv) and path in biases:
        y = next_fun(*args, **kwargs)
        return y + biases[path].astype(y.dtype)
    return next_fun(*args, **kwargs)

  with flax.linen.intercept_methods(intercept):
    return model.apply({"params": params}, images, train=False)

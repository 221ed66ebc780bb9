"""PyTorch ResNet checkpoints -> jaxattr variables checkpoints (Flax params + batch statistics).

Reads `.pth`, `.pth.tar` and PyTorch Lightning `.ckpt` files (`jaxattr.torch_state`) and writes
`jaxattr.checkpoint.save_variables(dst, {'params', 'batch_stats'}, meta)`.

Formats (detected from the keys, or forced with `format=`):

* 'lightly': a lightly SSL model (MoCo, BYOL, SimCLR, ... as LightningModule) whose backbone is
  `nn.Sequential(*list(resnet.children())[:-1], nn.AdaptiveAvgPool2d(1))`: keys
  `backbone.0.weight` (stem conv), `backbone.1.*` (stem BN), `backbone.2..5.*` (stages 1..4) for
  lightly's CIFAR ResNetGenerator, or `backbone.4..7.*` when the children are a torchvision ResNet's
  (conv1, bn1, relu, maxpool, layer1..4). Keys outside the backbone (projection/prediction heads,
  `backbone_momentum.*`, loss memory banks) are ignored, or exported on request.
* 'lightly_resnet': a plain lightly ResNetGenerator state_dict (`conv1.*`, `bn1.*`,
  `layer1.0.conv1.weight`, `layer1.0.shortcut.0.weight`, ...); its classifier `linear.*` is dropped
  and, as in `ResNetGenerator.forward`, the stem BN is followed by a ReLU (`stem_relu`).
* 'moco': official facebookresearch/moco v1/v2 (`module.encoder_q.<torchvision key>`); its `fc`
  projection head (v1 linear, v2 MLP) is dropped, `module.encoder_k.*`, `module.queue` and
  `module.queue_ptr` are ignored (the key encoder can be exported on request).
* 'torchvision': a torchvision ResNet state_dict (optionally under a DDP `module.` prefix);
  `fc.*` is dropped or, with `keep_fc`, kept as the encoder's 'logits' head.

SplitBatchNorm: lightly's MoCo uses SplitBatchNorm whose running statistics have shape
[num_splits * C]. By default they are copied as they are and `num_splits` goes into
`encoder_kwargs`: jaxattr's BatchNorm averages the per-split statistics at eval time exactly like
lightly's `SplitBatchNorm.train(False)` (mean of the split means and of the split variances), so
eval-mode features are identical and the conversion loses nothing (training can resume per
split). `average_splits=True` instead stores the averaged statistics with `num_splits=1`.

Every tensor of the converted scope must be used and every Flax variable must be filled with the
right shape; otherwise one `ConversionError` lists the offending keys and nothing is written.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxattr import augment, checkpoint, utils
from jaxattr.models import ENCODERS, cifar_resnet
from jaxattr.torch_state import ConversionError, load_torch_state, preview as _preview, sha256_file

FORMATS = ("lightly", "lightly_resnet", "moco", "torchvision")

# (stage sizes, bottleneck?) -> torchvision encoder name.
_TORCHVISION_ARCHS = {
    ((2, 2, 2, 2), False): "resnet18",
    ((3, 4, 6, 3), False): "resnet34",
    ((3, 4, 6, 3), True): "resnet50",
    ((3, 4, 23, 3), True): "resnet101",
    ((3, 8, 36, 3), True): "resnet152",
}
_MOCO_Q, _MOCO_K = "module.encoder_q.", "module.encoder_k."
_MOCO_IGNORED = ("module.queue", "module.queue_ptr")


@dataclasses.dataclass
class _Layout:
  """How one checkpoint format names the encoder: source key <-> torchvision-style name."""

  format: str
  prefix: str  # source keys of the encoder start with this
  seq_offset: int | None = None  # lightly nn.Sequential: stage k is child k + offset
  head: str | None = None  # classifier / projection head inside the scope ('fc', 'linear')
  ignored_outside: bool = True  # keys outside `prefix` ignored (True) or must be known

  def canonical(self, key: str) -> str | None:
    """torchvision-style name ('layer1.0.conv1.weight') of a source key, None if out of scope."""
    if not key.startswith(self.prefix):
      return None
    rest = key[len(self.prefix):]
    if self.seq_offset is None:
      return rest
    first, _, tail = rest.partition(".")
    if not first.isdigit():
      return rest
    idx = int(first)
    if idx == 0:
      name = "conv1"
    elif idx == 1:
      name = "bn1"
    elif 1 <= idx - self.seq_offset <= 4:
      name = f"layer{idx - self.seq_offset}"
    else:
      name = f"child{idx}"  # e.g. a parameterised module we do not know: reported as extra
    return f"{name}.{tail}"

  def source(self, name: str) -> str:
    """Inverse of `canonical`, to name missing keys the way the user's file would."""
    if self.seq_offset is None:
      return self.prefix + name
    first, _, tail = name.partition(".")
    if first == "conv1":
      idx = 0
    elif first == "bn1":
      idx = 1
    elif first.startswith("layer"):
      idx = int(first[5:]) + self.seq_offset
    else:
      return self.prefix + name
    return f"{self.prefix}{idx}.{tail}"


def _lightly_prefix(keys: list[str], state: dict[str, np.ndarray]) -> str | None:
  """The prefix of a lightly nn.Sequential backbone ('backbone.'), None if there is none."""
  cands = [
      k[:-len("0.weight")]
      for k in keys
      if k.endswith("backbone.0.weight") and np.ndim(state[k]) == 4
  ]
  if "backbone." in cands:
    return "backbone."
  cands = [c for c in cands if "momentum" not in c and "teacher" not in c]
  if len(cands) == 1:
    return cands[0]
  if len(cands) > 1:
    raise ConversionError(f"several lightly backbones found ({_preview(cands)}); choose one with "
                          "prefix= (--prefix)")
  return None


def detect_format(state: dict[str, np.ndarray]) -> str:
  """Guesses the checkpoint format from its keys; raises ConversionError if none fits."""
  keys = list(state)
  if any(k.startswith(_MOCO_Q) for k in keys):
    return "moco"
  if _lightly_prefix(keys, state) is not None:
    return "lightly"
  plain = _strip_ddp(state)
  if "conv1.weight" in plain:
    w = plain["conv1.weight"]
    if (any(".shortcut." in k for k in plain) or "linear.weight" in plain or
        (np.ndim(w) == 4 and w.shape[-1] == 3)):
      return "lightly_resnet"
    return "torchvision"
  raise ConversionError(
      f"unknown checkpoint format: none of {FORMATS} matches ({len(keys)} keys: "
      f"{_preview(keys)}); expected 'module.encoder_q.*' (MoCo), 'backbone.0.weight' (lightly) "
      "or 'conv1.weight' (ResNet state_dict)")


def _strip_ddp(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  if state and all(k.startswith("module.") for k in state):
    return {k[len("module."):]: v for k, v in state.items()}
  return state


def _layout(fmt: str, state: dict[str, np.ndarray], prefix: str | None) -> _Layout:
  if fmt == "moco":
    return _Layout("moco", prefix or _MOCO_Q, head="fc", ignored_outside=False)
  if fmt == "lightly":
    prefix = prefix or _lightly_prefix(list(state), state)
    if prefix is None:
      raise ConversionError(f"format 'lightly' needs '<prefix>0.weight' (e.g. backbone.0.weight);"
                            f" keys: {_preview(list(state))}")
    stem = state.get(prefix + "0.weight")
    # torchvision children: conv1, bn1, relu, maxpool, layer1..4 -> stage k is child k + 3.
    offset = 3 if stem is not None and np.ndim(stem) == 4 and stem.shape[-1] == 7 else 1
    return _Layout("lightly", prefix, seq_offset=offset)
  if fmt in ("lightly_resnet", "torchvision"):
    head = "linear" if fmt == "lightly_resnet" else "fc"
    return _Layout(fmt, prefix or "", head=head, ignored_outside=False)
  raise ConversionError(f"unknown format {fmt!r}; known: {('auto',) + FORMATS}")


def detect_encoder(names: dict[str, np.ndarray], fmt: str) -> tuple[str, dict[str, Any]]:
  """(encoder name, encoder_kwargs) from torchvision-style tensor names of one encoder."""
  stem = names.get("conv1.weight")
  if stem is None or np.ndim(stem) != 4:
    raise ConversionError(f"no stem conv ('conv1.weight' in torchvision naming) in the {fmt} "
                          f"checkpoint; encoder keys: {_preview(list(names))}")
  stage_sizes = []
  for k in range(1, 5):
    blocks = {m.group(1) for n in names for m in [re.match(rf"layer{k}\.(\d+)\.", n)] if m}
    stage_sizes.append(len(blocks))
  stage_sizes = tuple(stage_sizes)
  bottleneck = any(re.match(r"layer\d+\.\d+\.conv3\.", n) for n in names)
  if stem.shape[-1] == 3:  # lightly CIFAR stem
    if bottleneck:
      raise ConversionError("lightly Bottleneck ResNets (resnet-50/101/152) are not supported: "
                            "jaxattr's CifarResNet has BasicBlocks only")
    width = stem.shape[0] / 64
    kwargs: dict[str, Any] = {"width": width}
    if stage_sizes == (2, 2, 2, 2):
      return "lightly_resnet18", kwargs
    if 0 in stage_sizes:
      raise ConversionError(f"unsupported architecture: blocks per stage {stage_sizes}")
    return "lightly_resnet", {**kwargs, "stage_sizes": list(stage_sizes)}
  if stem.shape[-1] == 7:
    name = _TORCHVISION_ARCHS.get((stage_sizes, bottleneck))
    if name is None:
      raise ConversionError(f"unsupported torchvision-style ResNet: blocks per stage "
                            f"{stage_sizes}, bottleneck={bottleneck}")
    return name, {}
  raise ConversionError(f"unsupported stem conv kernel {tuple(stem.shape)} (expected 3x3 "
                        "lightly CIFAR or 7x7 ImageNet ResNet)")


def _flax_to_torch(path: tuple[str, ...]) -> str:
  """('params', 'layer1_0', 'downsample_bn', 'scale') -> 'layer1.0.downsample.1.weight'."""
  collection, *modules, leaf = path
  parts = []
  for m in modules:
    stage = re.fullmatch(r"(layer\d+)_(\d+)", m)
    if stage:
      parts += [stage.group(1), stage.group(2)]
    elif m in ("shortcut_conv", "downsample_conv"):
      parts += [m.split("_")[0], "0"]
    elif m in ("shortcut_bn", "downsample_bn"):
      parts += [m.split("_")[0], "1"]
    else:
      parts.append(m)
  if collection == "batch_stats":
    parts.append({"mean": "running_mean", "var": "running_var"}[leaf])
  else:
    parts.append({"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf])
  return ".".join(parts)


def _to_flax(value: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == "kernel" and value.ndim == 4:
    return np.transpose(value, (2, 3, 1, 0))  # OIHW -> HWIO
  if leaf == "kernel" and value.ndim == 2:
    return value.T  # Linear [out, in] -> Dense [in, out]
  return value


def _fill(model: Any, names: dict[str, np.ndarray], layout: _Layout, num_splits_src: int,
          average_splits: bool) -> tuple[dict[str, Any], list[str], list[str], list[str]]:
  """Fills the model's variables from torchvision-style `names`.

  Returns:
    (variables, missing source keys, unused source keys, shape mismatch descriptions).
  """
  size = 32 if isinstance(model, cifar_resnet.CifarResNet) else 64
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes))
  out, missing, mismatched, used = {}, [], [], set()
  for path, spec in flat.items():
    name = _flax_to_torch(path)
    if name not in names:
      missing.append(layout.source(name))
      continue
    used.add(name)
    value = _to_flax(names[name], path[-1])
    if path[0] == "batch_stats" and average_splits and num_splits_src > 1:
      value = value.reshape(num_splits_src, -1).mean(0)
    if tuple(value.shape) != tuple(spec.shape):
      src_shape, got = tuple(names[name].shape), tuple(value.shape)
      shown = f"{src_shape} -> {got}" if got != src_shape else f"{src_shape}"
      mismatched.append(f"{layout.source(name)}: checkpoint {shown}, expected {tuple(spec.shape)}")
      continue
    out[path] = value.astype(spec.dtype)
  unused = [layout.source(n) for n in names if n not in used]
  return flax.traverse_util.unflatten_dict(out), missing, unused, mismatched


def _num_splits(names: dict[str, np.ndarray]) -> int:
  """SplitBatchNorm splits: running_mean length over the BN's channel count."""
  mean, weight = names.get("bn1.running_mean"), names.get("bn1.weight")
  if mean is None or weight is None or mean.shape[0] % weight.shape[0]:
    return 1
  return mean.shape[0] // weight.shape[0]


def _convert_scope(state: dict[str, np.ndarray], layout: _Layout, src: str, encoder: str | None,
                   width: float | None, keep_fc: bool, average_splits: bool,
                   stem_relu: bool | None) -> tuple[dict[str, Any], str, dict[str, Any], list[str]]:
  """Converts the encoder under `layout.prefix`. Returns (variables, name, kwargs, dropped)."""
  names: dict[str, np.ndarray] = {}
  for k, v in state.items():
    name = layout.canonical(k)
    if name is None or name.endswith("num_batches_tracked"):
      continue
    names[name] = v
  if not names:
    raise ConversionError(f"{src}: no encoder keys under prefix {layout.prefix!r} "
                          f"(format {layout.format}); keys: {_preview(list(state))}")
  dropped = []
  head = {n for n in names if layout.head and n.startswith(layout.head + ".")}
  if head and not keep_fc:
    dropped = sorted(layout.source(n) for n in head)
    names = {n: v for n, v in names.items() if n not in head}
  if encoder is None:
    encoder, kwargs = detect_encoder(names, layout.format)
  else:
    if encoder not in ENCODERS:
      raise ConversionError(f"unknown encoder {encoder!r}; known: {sorted(ENCODERS)}")
    kwargs = {}
    if encoder.startswith("lightly"):
      stem = names.get("conv1.weight")
      kwargs["width"] = stem.shape[0] / 64 if stem is not None and stem.ndim == 4 else 1.0
  if width is not None:
    kwargs["width"] = float(width)
  is_cifar = encoder.startswith("lightly")
  splits = _num_splits(names) if is_cifar else 1
  if is_cifar:
    kwargs["num_splits"] = 1 if average_splits else splits
    # lightly's ResNetGenerator.forward applies a ReLU after the stem BN; the nn.Sequential
    # backbone built from its children (the reference's MoCo) never does.
    kwargs["stem_relu"] = bool(layout.format == "lightly_resnet" if stem_relu is
                               None else stem_relu)
  elif stem_relu is not None:
    raise ConversionError(f"stem_relu applies to lightly CIFAR ResNets only, not {encoder}")
  if keep_fc and "fc.weight" in names and not is_cifar:
    kwargs["num_classes"] = int(names["fc.weight"].shape[0])
  model = ENCODERS[encoder](**kwargs)
  variables, missing, unused, mismatched = _fill(model, names, layout, splits, average_splits)
  if missing or unused or mismatched:
    lines = [
        f"cannot convert {src} (format {layout.format}) into encoder {encoder} {kwargs}: "
        f"{len(missing)} missing, {len(unused)} unexpected, {len(mismatched)} shape "
        "mismatches; nothing was written"
    ]
    if missing:
      lines.append(f"  missing ({len(missing)}): {_preview(missing)}")
    if unused:
      lines.append(f"  unexpected ({len(unused)}): {_preview(unused)}")
    if mismatched:
      lines.append(f"  shape mismatch ({len(mismatched)}): " + "; ".join(mismatched[:4]) +
                   (f"; ... (+{len(mismatched) - 4} more)" if len(mismatched) > 4 else ""))
    raise ConversionError("\n".join(lines))
  return variables, encoder, kwargs, dropped


def convert(
    src_path: str,
    dst_path: str,
    format: str = "auto",
    *,  # pylint: disable=redefined-builtin
    encoder: str | None = None,
    width: float | None = None,
    prefix: str | None = None,
    keep_fc: bool = False,
    average_splits: bool = False,
    stem_relu: bool | None = None,
    export_momentum: bool = False,
    export_extras: bool = False,
    mean: tuple[float, ...] = augment.IMAGENET_MEAN,
    std: tuple[float, ...] = augment.IMAGENET_STD,
    trust_pickle: bool = False,
    overwrite: bool = False) -> dict[str, Any]:
  """Converts a PyTorch ResNet checkpoint into a jaxattr variables checkpoint.

  Args:
    src_path: .pth / .pth.tar / .ckpt file.
    dst_path: output directory (jaxattr.checkpoint layout).
    format: 'auto' or one of FORMATS (see the module docstring).
    encoder: force the encoder (a name of `ENCODERS`, e.g. 'resnet50'); detected by default.
      A checkpoint of another architecture then fails with the mismatching keys.
    width: force the lightly width multiplier (detected from the stem conv by default).
    prefix: key prefix of the encoder (default: 'backbone.' for lightly, 'module.encoder_q.'
      for MoCo, none for plain state_dicts; a DDP 'module.' prefix is stripped).
    keep_fc: torchvision only: keep `fc` as the encoder's 'logits' head.
    average_splits: store SplitBatchNorm statistics averaged over splits with num_splits=1
      (eval features are the same either way).
    stem_relu: lightly CIFAR ResNets only: ReLU after the stem BN. Default: True for
      'lightly_resnet' (what ResNetGenerator.forward computes), False for 'lightly' (the
      reference's nn.Sequential backbone of the children skips it).
    export_momentum: also convert the momentum encoder (lightly `backbone_momentum.`, MoCo
      `module.encoder_k.`) into the checkpoint `<dst_path>_momentum`.
    export_extras: also save every tensor that is not part of the converted encoder (heads,
      queues, ...) under its original key, unchanged, to `<dst_path>_extras.npz`.
    mean, std: input normalisation on the 0..1 scale recorded in meta.
    trust_pickle: see `load_torch_state`.
    overwrite: replace existing outputs.

  Returns:
    The meta dict written next to the variables.

  Raises:
    ConversionError: unknown format, missing/extra keys, shape mismatch, another architecture.
  """
  dst_path = os.path.abspath(dst_path)
  outputs = [dst_path] + ([dst_path + "_momentum"] if export_momentum else
                          []) + ([dst_path + "_extras.npz"] if export_extras else [])
  for out in outputs:
    if os.path.exists(out) and not overwrite:
      raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
  if format != "auto" and format not in FORMATS:
    raise ConversionError(f"unknown format {format!r}; known: {('auto',) + FORMATS}")
  state = load_torch_state(src_path, trust_pickle)
  fmt = detect_format(state) if format == "auto" else format
  if keep_fc and fmt != "torchvision":
    # MoCo's fc is a projection head and lightly backbones have no classifier in jaxattr.
    raise ConversionError(f"keep_fc applies to torchvision classifiers only, not format {fmt}; "
                          "use export_extras to keep heads")
  if fmt in ("lightly_resnet", "torchvision") and prefix is None:
    state = _strip_ddp(state)
  layout = _layout(fmt, state, prefix)
  if not layout.ignored_outside:
    allowed = (_MOCO_K,) + _MOCO_IGNORED if fmt == "moco" else ()
    stray = [k for k in state if not k.startswith(layout.prefix) and not k.startswith(allowed)]
    if stray:
      raise ConversionError(f"cannot convert {src_path} (format {fmt}): {len(stray)} unexpected "
                            f"keys outside the encoder: {_preview(stray)}; nothing was written")
  variables, name, kwargs, dropped = _convert_scope(state, layout, src_path, encoder, width,
                                                    keep_fc, average_splits, stem_relu)
  converted = {k for k in state if layout.canonical(k) is not None}
  momentum = None
  if export_momentum:
    if fmt == "lightly":
      mprefix = layout.prefix[:-1] + "_momentum."
    elif fmt == "moco":
      mprefix = _MOCO_K
    else:
      raise ConversionError(f"format {fmt} has no momentum encoder to export")
    mlayout = dataclasses.replace(layout, prefix=mprefix)
    if not any(k.startswith(mprefix) for k in state):
      raise ConversionError(f"{src_path}: no momentum encoder keys '{mprefix}*' to export")
    momentum, _, _, _ = _convert_scope(state, mlayout, src_path, name, kwargs.get("width"), False,
                                       average_splits, kwargs.get("stem_relu"))
    converted |= {k for k in state if k.startswith(mprefix)}
  meta = {
      "encoder": name,
      "encoder_kwargs": kwargs,
      "mean": [float(m) for m in mean],
      "std": [float(s) for s in std],
      "image_size": 32 if name.startswith("lightly") else 224,
      "format": fmt,
      "prefix": layout.prefix,
      "source": os.path.abspath(src_path),
      "source_sha256": sha256_file(src_path),
      "dropped_keys": sorted(dropped),
      "ignored_keys": len([k for k in state if k not in converted]),
      "converted_by": "jaxattr.convert",
  }
  if momentum is not None:
    checkpoint.save_variables(dst_path + "_momentum", momentum, {
        **meta, "momentum_of": dst_path
    }, overwrite=overwrite)
  if export_extras:
    extras = {k: v for k, v in state.items() if k not in converted or k in dropped}
    utils.save_npz(dst_path + "_extras.npz", **extras)
  checkpoint.save_variables(dst_path, variables, meta, overwrite=overwrite)
  logging.info("converted %s (%s) -> %s: encoder %s %s", src_path, fmt, dst_path, name, kwargs)
  return meta

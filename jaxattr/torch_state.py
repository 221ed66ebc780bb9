"""PyTorch checkpoint files (.pth, .pth.tar, Lightning .ckpt) as NumPy state dicts.

torch is imported lazily, here only: it is an optional extra (`pip install 'jaxattr[torch]'`)
that converting needs and nothing else does.
"""

from __future__ import annotations

import hashlib
import os
import pickle

import numpy as np


class ConversionError(ValueError):
  """A checkpoint that cannot be converted; the message lists the offending keys."""


def preview(keys: list[str], n: int = 6) -> str:
  keys = sorted(keys)
  more = f", ... (+{len(keys) - n} more)" if len(keys) > n else ""
  return ", ".join(keys[:n]) + more


def sha256_file(path: str) -> str:
  """Hex sha256 of a file, read in chunks."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _first_line(e: BaseException) -> str:
  return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


def load_torch_state(path: str, trust_pickle: bool = False) -> dict[str, np.ndarray]:
  """Reads a PyTorch checkpoint and returns its state_dict as float32/int NumPy arrays.

  Accepts a bare state_dict or a dict holding one under 'state_dict' (Lightning, official MoCo),
  'model' or 'model_state_dict'.

  Args:
    path: .pth / .pth.tar / .ckpt file.
    trust_pickle: allow torch.load(weights_only=False), which runs arbitrary pickled code; only
      for files you trust whose extra entries (e.g. Lightning hyper-parameters) need it.
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "converting PyTorch checkpoints needs torch: pip install 'jaxattr[torch]'") from e
  if not os.path.isfile(path):
    raise FileNotFoundError(f"PyTorch checkpoint not found: {path}")
  with open(path, "rb") as f:
    head = f.read(4)
  # torch.save writes a zip archive (PK..), or a pickle (protocol 2+: 0x80) in the legacy format.
  if not head.startswith(b"PK") and not head.startswith(b"\x80"):
    raise ConversionError(f"{path}: not a PyTorch checkpoint (it starts with {head!r}, neither the "
                          "zip archive nor the pickle that torch.save writes)")
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    if not isinstance(e, pickle.UnpicklingError):  # not the weights-only refusal: a broken file
      raise ConversionError(f"{path}: torch.load failed ({_first_line(e)}); the file is damaged "
                            "or not a PyTorch checkpoint") from e
    if not trust_pickle:
      raise ConversionError(
          f"{path}: torch.load(weights_only=True) failed ({_first_line(e)}). If you trust this "
          "file, retry with trust_pickle=True (--trust_pickle)") from e
    try:
      obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e2:  # pylint: disable=broad-except
      raise ConversionError(f"{path}: torch.load failed ({_first_line(e2)}); the file is damaged "
                            "or not a PyTorch checkpoint") from e2
  state = obj
  if isinstance(obj, dict):
    for key in ("state_dict", "model", "model_state_dict"):
      if isinstance(obj.get(key), dict):
        state = obj[key]
        break
  if not isinstance(state, dict) or not state:
    raise ConversionError(f"{path}: no state_dict found (top-level type {type(obj).__name__}" + (
        f", keys {preview([str(k) for k in obj])}" if isinstance(obj, dict) else "") + ")")
  out, skipped = {}, []
  for k, v in state.items():
    if not isinstance(v, torch.Tensor):
      skipped.append(str(k))
      continue
    v = v.detach()
    out[str(k)] = (v.float() if v.is_floating_point() else v).numpy()
  if not out:
    raise ConversionError(f"{path}: the state_dict holds no tensors (keys {preview(skipped)})")
  return out

"""Orbax checkpoints of Flax variables plus a small JSON of metadata.

A variables checkpoint is a directory::

  PATH/variables/   orbax StandardCheckpointer tree {'params': ..., 'batch_stats': ...}
  PATH/meta.json    {'encoder': name, 'encoder_kwargs': {...}, 'mean': [..], 'std': [..], ...}

`meta.json` is written last, so a directory without it is incomplete and is never loaded. Writes
go to a temporary sibling directory renamed into place, so an existing checkpoint survives a crash.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

META = "meta.json"


def save_variables(path: str, variables: Any, meta: dict[str, Any],
                   overwrite: bool = False) -> None:
  """Writes `variables` (a pytree of arrays) and `meta` to directory `path` atomically."""
  path = os.path.abspath(path)
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"checkpoint {path} exists; pass overwrite=True to replace it")
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", dir=parent)
  try:
    host = jax.tree_util.tree_map(np.asarray, variables)
    ckptr = _local_checkpointer()
    ckptr.save(os.path.join(tmp, "variables"), host)
    ckptr.wait_until_finished()
    with open(os.path.join(tmp, META), "w") as f:
      json.dump(meta, f, indent=2, sort_keys=True, default=str)
    if os.path.exists(path):
      shutil.rmtree(path)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)


def _local_checkpointer() -> ocp.StandardCheckpointer:
  """An orbax checkpointer of this process alone: in a job of several processes, one of them
  writes an exported encoder and each reads it, without waiting for the others (orbax's default
  is a collective save/restore that every process must join)."""
  me = jax.process_index()
  return ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
      primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"local-{me}"))


def is_checkpoint(path: str) -> bool:
  return os.path.isfile(os.path.join(path, META)) and os.path.isdir(os.path.join(path, "variables"))


def load_variables(path: str) -> tuple[Any, dict[str, Any]]:
  """Reads (variables as NumPy arrays, meta) from a directory written by `save_variables`."""
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint not found: {path}")
  if not is_checkpoint(path):
    raise ValueError(f"{path} is not a jaxattr variables checkpoint (expected {META} and "
                     "variables/ inside; convert PyTorch files with launch/convert.py)")
  meta = read_meta(path)
  try:
    variables = _local_checkpointer().restore(os.path.join(path, "variables"))
  except Exception as e:  # pylint: disable=broad-except  (orbax raises many kinds)
    raise ValueError(f"{os.path.join(path, 'variables')}: cannot restore the variables "
                     f"({type(e).__name__}: {e}); {_DAMAGED}") from e
  variables = jax.tree_util.tree_map(np.asarray, variables)
  return variables, meta


_DAMAGED = ("the checkpoint is incomplete or damaged: write it again (launch/convert.py, or the "
            "run that made it)")


def read_meta(path: str) -> dict[str, Any]:
  """PATH/meta.json of a variables checkpoint as a dict, or one ValueError naming the file."""
  file = os.path.join(path, META)
  try:
    with open(file) as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{file}: cannot read the checkpoint's metadata ({e}); {_DAMAGED}") from e
  if not isinstance(meta, dict) or not isinstance(meta.get("encoder", ""), str):
    raise ValueError(f"{file}: expected a JSON object with the encoder's name ('encoder') and "
                     f"settings, got {json.dumps(meta)[:80]}; {_DAMAGED}")
  return meta

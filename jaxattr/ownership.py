"""Which config and data a stage's outputs belong to: fingerprints, records, checks.

Every stage's outputs carry a record of everything they depend on, written after the outputs
themselves (so a killed stage leaves no record and counts as not done):

=============  ==========================================  ========================================
stage          record                                      fields
=============  ==========================================  ========================================
pretrain       ``pretrain/fingerprint.json`` (the run),    `seed`, `data` (+ its content
               ``pretrain/encoder/meta.json`` (export)     fingerprint), `encoder`, `pretrain`
                                                           less `RUN_ONLY_FIELDS`
features       ``features/fingerprint.json``               `data` (+ content), `features`, the
                                                           encoder: pretrain's fingerprint and
                                                           step, or the checkpoint's file list
attribution    ``attribution/<method>/fingerprint.json``   the features' fingerprint, `seed`,
                                                           `attribution` (less `methods`), `viz`
support        ``support/<metric>/<method>/summary.json``  `jaxattr.counterfactual.support`:
                                                           the search settings, `ensemble`, the
                                                           data and the exact top-k rows used
=============  ==========================================  ========================================

A stage is done only when its record matches the fingerprint the current config and data give
(`current`). Each stage's `run` checks its own record, so every launcher that writes a stage's
outputs records them the same way, and a rerun of an up-to-date stage costs nothing. A stage
reads an earlier stage's outputs only after `require` finds their record equal to what the
config expects; otherwise it stops before any work with `StageMismatchError`, naming the fields
that differ and the launcher to run. The main job (`jaxattr.pipeline`) instead reruns every
stage whose record does not match, in order.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

import ml_collections

from jaxattr import fingerprint, utils

# pretrain fields that do not change the trained state: how often to log, checkpoint and run the
# kNN monitor (and its settings), and where to stop (a run stopped early and resumed equals an
# uninterrupted one). encoder.checkpoint names an encoder used INSTEAD of pretraining.
RUN_ONLY_FIELDS = ("pretrain.log_every_steps", "pretrain.checkpoint_every_steps",
                   "pretrain.knn_every_epochs", "pretrain.knn_k", "pretrain.knn_temperature",
                   "pretrain.max_steps", "encoder.checkpoint")

RECORD = "fingerprint.json"


class StageMismatchError(ValueError):
  """An earlier stage's outputs in WORKDIR belong to another config or data, or carry no record."""


def digest(fields: dict[str, Any]) -> str:
  """The fingerprint of flat fields (`utils.config_hash`)."""
  return utils.config_hash(fields)


def _canonical(fields: dict[str, Any]) -> dict[str, Any]:
  # The JSON round trip makes fresh fields compare equal to the ones read back from a record.
  return json.loads(json.dumps(fields, sort_keys=True, default=str))


def _section(config: ml_collections.ConfigDict, name: str) -> dict[str, Any]:
  return {f"{name}.{k}": v for k, v in sorted(config[name].to_dict().items())}


def data_fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """`data.source`, the options given (not None) and `data.fingerprint` (the content)."""
  fields: dict[str, Any] = {"data.source": config.data.source}
  for k, v in sorted(dict(config.data.options).items()):
    if v is not None:  # None means "not given", as in data.load_splits
      fields[f"data.options.{k}"] = v
  fields["data.fingerprint"] = fingerprint.data_fingerprint(config.data)
  return fields


def pretrain_fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What a MoCo run's trained state depends on (`RUN_ONLY_FIELDS` left out)."""
  fields = {"seed": config.seed, **data_fields(config)}
  fields.update(_section(config, "encoder"))
  fields.update(_section(config, "pretrain"))
  for k in RUN_ONLY_FIELDS:
    fields.pop(k, None)
  return _canonical(fields)


def encoder_fields(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """The identity of the encoder that the features stage loads.

  `encoder.checkpoint`: its path's file list with sizes and mtimes. Otherwise the exported
  WORKDIR/pretrain/encoder, which must come from a MoCo run of this config and data: its
  fingerprint and step (a run stopped early by `pretrain.max_steps` and one that finished give
  different features).

  Raises:
    StageMismatchError: no exported encoder, or one of another config or data.
  """
  path = config.encoder.checkpoint
  if path:
    if not os.path.exists(path):
      raise StageMismatchError(f"encoder.checkpoint={path} does not exist: pass the path of a "
                               "variables checkpoint (launch/convert.py writes one)")
    return {"encoder.checkpoint.content": utils.config_hash(fingerprint.path_content(path))}
  meta_path = os.path.join(workdir, "pretrain", "encoder", "meta.json")
  want = pretrain_fields(config)
  if not os.path.exists(meta_path):
    raise StageMismatchError(
        f"no pretrained encoder in {os.path.dirname(meta_path)}: run the pretrain stage first "
        "(launch/pretrain.py or launch/pipeline.py with this config), or set encoder.checkpoint")
  with open(meta_path) as f:
    meta = json.load(f)
  if meta.get("fingerprint") != digest(want):
    old = _read(os.path.join(workdir, "pretrain", RECORD)) or {}
    raise StageMismatchError(
        f"the encoder in {os.path.dirname(meta_path)} was pretrained with another config or data"
        f" ({describe(old.get('fields'), want)}): run the pretrain stage with this config "
        "(launch/pretrain.py or launch/pipeline.py) into another --workdir, or use the config "
        f"recorded in {os.path.join(workdir, 'pretrain', RECORD)}")
  return {"pretrain.fingerprint": meta["fingerprint"], "pretrain.step": meta.get("step")}


def features_fields(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """What WORKDIR/features depends on: the data, the `features` section and the encoder."""
  return _canonical({
      **data_fields(config),
      **_section(config, "features"),
      **encoder_fields(config, workdir)
  })


def attribution_fields(config: ml_collections.ConfigDict, workdir: str, method: str,
                       features: str | None = None) -> dict[str, Any]:
  """What WORKDIR/attribution/<method> depends on; the features' record must match first.

  Raises:
    StageMismatchError: WORKDIR/features are missing, unrecorded or of another config or data.
  """
  # `features`: the features' fingerprint when the caller has checked it already (one data
  # fingerprint per run, not one per method).
  feats = features or require(workdir, "features", lambda: features_fields(config, workdir))
  fields = {"features.fingerprint": feats, "method": method, "seed": config.seed}
  fields.update(_section(config, "attribution"))
  fields.pop("attribution.methods")  # each method has its own record
  fields.update(_section(config, "viz"))
  if method == "trak":  # its own models: the trainer's recipe and TRAK's settings
    fields.update(_section(config, "ensemble"))
    fields.update(_section(config, "trak"))
  return _canonical(fields)


def stage_dir(workdir: str, stage: str, method: str | None = None) -> str:
  return os.path.join(workdir, stage, *([method] if method else []))


def _read(path: str) -> dict[str, Any] | None:
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None  # A damaged record counts as none: the stage runs again.


def current(workdir: str, stage: str, fields: dict[str, Any], outputs: tuple[str, ...] = (),
            method: str | None = None) -> bool:
  """True when the stage's record equals `fields`' fingerprint and its `outputs` all exist."""
  where = stage_dir(workdir, stage, method)
  rec = _read(os.path.join(where, RECORD))
  return (rec is not None and rec.get("fingerprint") == digest(fields) and
          all(os.path.exists(os.path.join(where, o)) for o in outputs))


def clear(workdir: str, stage: str, method: str | None = None) -> None:
  """Removes the stage's record before it writes outputs: a killed stage counts as not done."""
  path = os.path.join(stage_dir(workdir, stage, method), RECORD)
  if os.path.exists(path):
    os.remove(path)


def record(workdir: str, stage: str, fields: dict[str, Any], method: str | None = None) -> str:
  """Writes the stage's record (atomically, after its outputs); returns the fingerprint."""
  fp = digest(fields)
  utils.save_json(
      os.path.join(stage_dir(workdir, stage, method), RECORD), {
          "stage": stage,
          "method": method,
          "fingerprint": fp,
          "fields": fields,
          "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")
      })
  return fp


_RUN_WITH = {
    "features": "launch/features.py",
    "attribution": "launch/attribute.py",
}


def require(workdir: str, stage: str, fields: dict[str, Any] | Callable[[], dict[str, Any]],
            method: str | None = None) -> str:
  """The fingerprint of an earlier stage's outputs, which must belong to this config and data.

  `fields` (or the callable giving them, called only once a record exists, so that missing
  outputs are named before what they would depend on) are what the config expects.

  Raises:
    StageMismatchError: no record (outputs missing, from an older jaxattr, or a killed run), or
      a record of other fields, naming those that differ and the launcher to run.
  """
  where = stage_dir(workdir, stage, method)
  rec = _read(os.path.join(where, RECORD))
  how = (f"run {_RUN_WITH.get(stage, 'its stage')} (or launch/pipeline.py) with this config "
         "first, or pass the --workdir and overrides that made them")
  if rec is None:
    raise StageMismatchError(
        f"{where} holds no outputs of a finished {stage} stage (no {RECORD}: missing, "
        f"interrupted or written by an older jaxattr): {how}")
  if callable(fields):
    fields = fields()
  if rec.get("fingerprint") != digest(fields):
    raise StageMismatchError(f"{where} was made with another config or data "
                             f"({describe(rec.get('fields'), fields)}): {how}")
  return rec["fingerprint"]


def describe(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
  """'field: old -> new; ...' for the fields that differ ('data: its files changed' for the
  content fingerprint)."""
  if old is None:
    return "no record of the fields that made them"
  diffs = []
  for k in sorted(set(old) | set(new)):
    a, b = old.get(k, _ABSENT), new.get(k, _ABSENT)
    if a == b:
      continue
    if k == "data.fingerprint":
      diffs.append("data: the files changed")
    else:
      diffs.append(f"{k}: {_show(a)} -> {_show(b)}")
  return "; ".join(diffs) or "fingerprint format changed"


_ABSENT = object()


def _show(value: Any) -> str:
  return "(absent)" if value is _ABSENT else repr(value)

"""One validation pass over an experiment config, against the data, before any stage starts.

`check(config, train, test, stages=...)` raises one `ConfigError` that lists EVERY problem found,
one per line, each naming the field (`pretrain.epochs`), its value, and the values allowed, so that
a bad setting fails in seconds instead of giving silently wrong results or failing hours later.
`problems(...)` returns the same lines as a list. Only `seed`, `data` and the sections of the
requested stages are checked (`stages=None`: `pipeline_stages(config)`, the stages that config
runs):

* pretrain: `encoder` (a name whose constructor takes `width` and `num_splits`, width giving at
  least one base channel, num_splits >= 1) and `pretrain` (epochs, batch_size, memory_bank_size,
  proj dims, knn_k, checkpoint_every_steps, log_every_steps >= 1; knn_every_epochs >= 0;
  max_steps -1 or >= 1; base_lr, temperature, knn_temperature > 0; momentum in [0, 1);
  weight_decay >= 0; ema_momentum in [0, 1]; min_scale in (0, 1]; batch_size a multiple of
  encoder.num_splits and at most memory_bank_size: the FIFO bank takes a whole batch of keys).
* features: batch_size >= 1, dtype 'float32' | 'bfloat16', encoder.checkpoint '' or a variables
  checkpoint directory (meta.json and variables/).
* attribution: methods non-empty, known (`jaxattr.attribute.METHODS`) and distinct; k >= 1;
  targets 'all' | 'random' | 'list'; num_targets >= 1 for 'random'; a non-empty, duplicate-free
  target_list of ints >= 0 for 'list'; C, tol > 0; max_iter, max_rows, chunk_size >= 1;
  same_class, allow_nonconverged bools; viz.num_targets >= 1, viz.top >= 0 (targets only).
* support: metrics non-empty, known (`bisection.METRICS`) and distinct; methods non-empty with
  distinct names, a 'name=PATH' file existing and explicit targets for it; targets '' or a file
  or a list of ints; num_targets, search_budget >= 0; num_tests, k >= 1; with exhaustive, the grid
  strictly ascending ints in [1, k]; flip_models >= 1 for 'mislabel'; seed, flip_seed >= 0;
  exhaustive, joint bools. With the attribution stage in the same run: own methods (no '=') among
  attribution.methods, support.k <= attribution.k, support.num_targets <= the attribution's
  targets ('random': num_targets, 'list': the list; 'all': the test split) and support.targets
  among them; support.num_targets <= the explicit support.targets. Plus `ensemble` (below).
* flip: mode 'flip' | 'train', num_models >= 1, and the `ensemble` section.
* ensemble (support, flip): model 'resnet9' | 'mobilenetv2'; width, peak_lr, log_every_s > 0;
  epochs, batch_size, eval_batch_size >= 1; peak_epoch >= 0 (above epochs the lr only ramps up,
  as configs/digits.py:quick uses it); schedule_examples, translate, cutout, models_per_wave,
  weight_decay >= 0; momentum, label_smoothing in [0, 1); compute_dtype 'auto' | 'float32' |
  'bfloat16'; formulation 'auto' | 'vmap' | 'map'; cpu_ops 'auto' | 'on' | 'off'; flip a bool.
* always: seed an int >= 0; data.source 'digits', 'folder:PATH', 'npz:PATH' or 'tfds:NAME';
  data.options.size / limit_per_class / workers None or ints >= 1, val_labels / data_dir None or
  strings, and only the options of data.source's kind (`jaxattr.data.SOURCE_OPTIONS`).

Types: an int field takes an int (not a bool, not a float, not a string), a float field any
finite number (NaN and inf are rejected in every float of the checked sections), a bool field a
bool, a string field a str.

Against the data (when `train` / `test` are given): both splits non-empty; for attribution,
support and flip at least 2 classes in train, and for attribution and support every test class
present in train; pretrain.batch_size <= the training images; attribution.num_targets <= the test
images ('random'), target_list within the test split, attribution.k <= the smallest training class
among the possible targets' classes (same_class) or the training set; ensemble.cutout <= the image
side and translate < it; ensemble.batch_size <= the training images minus support.k when removal
support runs (its models drop up to k images and batches drop_last: fewer images than a batch
would train no step), and <= the training images for full-data models (flip, mislabel);
support.k <= the training images; support.targets among the test `index` values; trak.proj_dim
<= the training images when trak.lambda_reg is 0 (else X^T X is singular); each 'name=PATH'
file of support.methods and lds.methods read as its stage reads it (numeric, shape, whole-number
training index values for top-k files, index and NaN checks for score files), so a bad file stops
the pipeline before its first stage.
`attribution.k` is compared with the classes that can hold targets (those of target_list for
'list', else every test class), the rule of `jaxattr.attribute.ranking.check_inputs`.

Device counts never make a config invalid: features.batch_size, attribution.chunk_size and
ensemble.models_per_wave are rounded UP to a multiple of the devices by the stages.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Sequence

import numpy as np

from jaxattr import config as config_lib

SECTIONS = ("pretrain", "features", "attribution", "support", "lds", "flip")

# The config sections (top-level fields) each stage reads, besides `seed` and `data`.
STAGE_FIELDS = {
    "pretrain": ("encoder", "pretrain"),
    "features": ("encoder", "features"),
    "attribution": ("attribution", "viz", "shard"),
    "support": ("support", "ensemble", "shard"),
    "lds": ("lds", "trak", "ensemble"),
    "flip": ("mode", "num_models", "ensemble"),
}

DATA_KINDS = ("digits", "folder", "npz", "tfds")
FEATURE_DTYPES = ("float32", "bfloat16")
TARGET_SPECS = ("all", "random", "list")
CLASSIFIERS = ("resnet9", "mobilenetv2", "resnet18")  # jaxattr.counterfactual.ensemble.classifier
STEMS = ("small", "imagenet")  # jaxattr.models.resnet.STEMS
AUGMENTS = ("cifar", "rrc")
DATA_SHARDINGS = ("replicated", "sharded")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")
FORMULATIONS = ("auto", "vmap", "map")
CPU_OPS = ("auto", "on", "off")
FLIP_MODES = ("flip", "train")

_BAD = object()  # a field that is missing or failed its own check: dependent checks skip it


class ConfigError(ValueError):
  """A config that a stage would reject or run wrongly; the message lists every problem.

  Attributes:
    problems: one line per problem, each starting with the field and its value.
  """

  def __init__(self, problems: Sequence[str]):
    self.problems = tuple(problems)
    n = len(self.problems)
    super().__init__(f"invalid config ({n} problem{'s' if n != 1 else ''}; fix each in the config "
                     "file or override it with --config.FIELD=VALUE):\n" +
                     "\n".join(f"  - {p}" for p in self.problems))

  def __reduce__(self):
    return type(self), (self.problems,)


def pipeline_stages(config: Any) -> tuple[str, ...]:
  """The stages a config runs when `stages` is not given.

  configs/flip.py's shape (`num_models`, no `attribution`): ('flip',). Otherwise the pipeline's:
  pretrain unless `encoder.checkpoint` is set, features, attribution, support when
  `support.metrics` is non-empty, and lds when `lds.methods` is.
  """
  raw = _Checker(config).raw
  if raw("num_models") is not _BAD and raw("attribution") is _BAD:
    return ("flip",)
  stages = []
  checkpoint = raw("encoder.checkpoint")
  if checkpoint is _BAD or not checkpoint:
    stages.append("pretrain")
  stages += ["features", "attribution"]
  # A list field that names something runs its stage (a malformed one too: its checks name it).
  for field, stage in (("support.metrics", "support"), ("lds.methods", "lds")):
    value = raw(field)
    try:
      wanted = value is not _BAD and bool(config_lib.names(value))
    except TypeError:
      wanted = True
    if wanted:
      stages.append(stage)
  return tuple(stages)


def check(config: Any, train: Any = None, test: Any = None, *, stages: Sequence[str] | None = None,
          num_devices: int | None = None) -> None:
  """Checks `config` for the stages a launcher runs, against the data when given.

  Args:
    config: the experiment config (`jaxattr.config.base_config()` or configs/flip.py's).
    train: the training `jaxattr.data.Dataset`, or None to skip the data-dependent checks.
    test: the test `Dataset`, or None.
    stages: the stages that will run, a subset of `SECTIONS`; only `seed`, `data` and their
      sections (`STAGE_FIELDS`) are checked. None: `pipeline_stages(config)`.
    num_devices: the devices the stages will use (default `jax.device_count()`). No check depends
      on it today (every device-count rounding in the stages is a padding, never an error); it
      is accepted so that launchers need not change when one does.

  Raises:
    ConfigError: listing every problem found, one per line.
    ValueError: `stages` names an unknown stage (a bug of the caller, not of the config).
  """
  found = problems(config, train, test, stages=stages, num_devices=num_devices)
  if found:
    raise ConfigError(found)


def problems(config: Any, train: Any = None, test: Any = None, *,
             stages: Sequence[str] | None = None, num_devices: int | None = None) -> list[str]:
  """`check`'s problems as a list of lines (empty when the config is fine); same arguments."""
  del num_devices  # See `check`.
  stages = _stages(pipeline_stages(config) if stages is None else stages)
  c = _Checker(config)
  c.int_("seed", lo=0)
  _check_data_section(c)
  if "pretrain" in stages:
    _check_pretrain(c)
  if "features" in stages:
    _check_features(c)
  if "attribution" in stages:
    _check_attribution(c)
  trak_used = "attribution" in stages and "trak" in _entries(c.raw("attribution.methods"))
  if "lds" in stages:
    _check_lds(c)
    trak_used = trak_used or "trak" in _entries(c.raw("lds.methods"))
  if trak_used:
    _check_trak(c)
  if "support" in stages or "flip" in stages or "lds" in stages or trak_used:
    _check_ensemble(c)
  if "support" in stages:
    _check_support(c, with_attribution="attribution" in stages)
  if "flip" in stages:
    c.str_("mode", FLIP_MODES)
    c.int_("num_models", lo=1)
  fields = ["seed", "data"] + [f for s in SECTIONS if s in stages for f in STAGE_FIELDS[s]]
  _check_finite(c, dict.fromkeys(fields))
  if train is not None or test is not None:
    _check_against_data(c, train, test, stages)
  return c.problems


# ------------------------------------------------------------------------------------------------
# Field access and typed checks.


def _is_int(v: Any) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_number(v: Any) -> bool:
  return isinstance(v,
                    (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _range_text(lo, hi, lo_open: bool, hi_open: bool) -> str:
  if lo is not None and hi is not None:
    return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
  if lo is not None:
    return f"{'>' if lo_open else '>='} {lo}"
  if hi is not None:
    return f"{'<' if hi_open else '<='} {hi}"
  return ""


def _in_range(v, lo, hi, lo_open: bool, hi_open: bool) -> bool:
  if lo is not None and (v <= lo if lo_open else v < lo):
    return False
  return not (hi is not None and (v >= hi if hi_open else v > hi))


class _Checker:
  """Collects problems; each typed getter returns the field's value, or `_BAD` after a problem."""

  def __init__(self, config: Any):
    self.config = config
    self.problems: list[str] = []
    self.flagged: set[str] = set()
    self.values: dict[str, Any] = {}  # fields that passed their own check

  def add(self, field: str, message: str) -> None:
    self.flagged.add(field)
    self.problems.append(f"{field}{message}")

  def bad(self, field: str, value: Any, expected: str, show_type: bool = False) -> Any:
    kind = f" ({type(value).__name__})" if show_type else ""
    self.add(field, f"={value!r}{kind}: must be {expected}")
    return _BAD

  def has(self, field: str) -> bool:
    return self.raw(field) is not _BAD

  def raw(self, field: str) -> Any:
    node = self.config
    for part in field.split("."):
      try:
        node = node[part]
      except (KeyError, TypeError, AttributeError, IndexError):
        return _BAD
    return node

  def get(self, field: str) -> Any:
    value = self.raw(field)
    if value is _BAD:
      self.add(field, ": missing from the config (start it from jaxattr.config's sections)")
    return value

  def good(self, field: str) -> Any:
    """The value of a field that passed its check, else `_BAD`."""
    return self.values.get(field, _BAD)

  def done(self, field: str) -> bool:
    """Whether `field` was checked already (stages share fields, e.g. encoder.checkpoint)."""
    return field in self.flagged or field in self.values

  def _keep(self, field: str, value: Any) -> Any:
    self.values[field] = value
    return value

  def int_(self, field: str, lo: int | None = None, hi: int | None = None, *,
           allow: tuple[int, ...] = (), what: str = "") -> Any:
    if self.done(field):
      return self.good(field)
    v = self.get(field)
    if v is _BAD:
      return v
    rng = _range_text(lo, hi, False, False)
    expected = "an int" + (f" {rng}" if rng else "") + "".join(
        f" or {a}" for a in allow) + (f" ({what})" if what else "")
    if not _is_int(v):
      return self.bad(field, v, expected, show_type=True)
    if int(v) not in allow and not _in_range(v, lo, hi, False, False):
      return self.bad(field, v, expected)
    return self._keep(field, int(v))

  def num_(self, field: str, lo: float | None = None, hi: float | None = None, *,
           lo_open: bool = False, hi_open: bool = False, what: str = "") -> Any:
    if self.done(field):
      return self.good(field)
    v = self.get(field)
    if v is _BAD:
      return v
    rng = _range_text(lo, hi, lo_open, hi_open)
    expected = "a finite number" + (f" {rng}" if rng else "") + (f" ({what})" if what else "")
    if not _is_number(v):
      return self.bad(field, v, expected, show_type=True)
    if not math.isfinite(float(v)) or not _in_range(float(v), lo, hi, lo_open, hi_open):
      return self.bad(field, v, expected)
    return self._keep(field, float(v))

  def bool_(self, field: str) -> Any:
    if self.done(field):
      return self.good(field)
    v = self.get(field)
    if v is _BAD:
      return v
    if not isinstance(v, (bool, np.bool_)):
      return self.bad(field, v, "a bool (True or False)", show_type=True)
    return self._keep(field, bool(v))

  def str_(self, field: str, choices: Sequence[str] | None = None) -> Any:
    if self.done(field):
      return self.good(field)
    v = self.get(field)
    if v is _BAD:
      return v
    expected = f"one of {list(choices)}" if choices is not None else "a string"
    if not isinstance(v, str):
      return self.bad(field, v, expected, show_type=True)
    if choices is not None and v not in choices:
      return self.bad(field, v, expected)
    return self._keep(field, v)

  def names_(self, field: str, known: Sequence[str] | None = None, nonempty: bool = True) -> Any:
    """A comma-separated list field (`config.names`): entries distinct and, given `known`, known."""
    if self.done(field):
      return self.good(field)
    v = self.get(field)
    if v is _BAD:
      return v
    if not (isinstance(v, str) or
            (isinstance(v, (list, tuple)) and all(isinstance(s, str) for s in v))):
      return self.bad(field, v, "a comma-separated string", show_type=True)
    entries = config_lib.names(v)
    allowed = f"any of {list(known)}" if known is not None else "names"
    if nonempty and not entries:
      return self.bad(field, v, f"a non-empty comma-separated list of {allowed}")
    unknown = [e for e in entries if known is not None and e not in known]
    if unknown:
      return self.bad(field, v, f"a comma-separated list of {allowed}; unknown: {unknown}")
    dups = sorted({e for e in entries if entries.count(e) > 1})
    if dups:
      return self.bad(field, v, f"a list of distinct entries; repeated: {dups}")
    return self._keep(field, entries)

  def ints_(self, field: str) -> Any:
    """A tuple/list field of ints (attribution.target_list, support.grid)."""
    if self.done(field):
      return self.good(field)
    v = self.get(field)
    if v is _BAD:
      return v
    if not isinstance(v, (list, tuple, np.ndarray)) or not all(_is_int(x) for x in v):
      return self.bad(field, v, "a tuple of ints", show_type=True)
    return self._keep(field, [int(x) for x in v])


# ------------------------------------------------------------------------------------------------
# Sections.


def _stages(stages: Sequence[str]) -> tuple[str, ...]:
  if isinstance(stages, str):  # ("attribution") without its comma
    stages = (stages,)
  stages = tuple(stages)
  unknown = [s for s in stages if s not in SECTIONS]
  if unknown:
    raise ValueError(f"validate.check: unknown stages {unknown}; known: {list(SECTIONS)}")
  return stages


def _check_data_section(c: _Checker) -> None:
  source = c.str_("data.source")
  if source is not _BAD:
    kind, sep, arg = source.partition(":")
    if kind not in DATA_KINDS or (kind != "digits" and not arg.strip()):
      c.values.pop("data.source")
      c.bad("data.source", source, "'digits', 'folder:PATH', 'npz:PATH' or 'tfds:NAME'")
    elif kind == "digits" and sep:
      c.values.pop("data.source")
      c.bad("data.source", source, "'digits' without an argument")
  for name in ("size", "limit_per_class", "workers"):
    field = f"data.options.{name}"
    if c.has(field) and c.raw(field) is not None:
      c.int_(field, lo=1, what="or None")
  for name in ("val_labels", "data_dir"):
    field = f"data.options.{name}"
    if c.has(field) and c.raw(field) is not None:
      c.str_(field)
  if source is not _BAD and c.has("data.options"):
    from jaxattr import data as data_lib  # pylint: disable=import-outside-toplevel
    kind = source.partition(":")[0]
    given = [k for k, v in dict(c.raw("data.options")).items() if v is not None]
    accepted = data_lib.COMMON_OPTIONS + data_lib.SOURCE_OPTIONS.get(kind, ())
    for name in given:
      if kind in data_lib.SOURCE_OPTIONS and name not in accepted:
        c.add(
            f"data.options.{name}", f": not an option of {kind!r} sources (they take "
            f"{', '.join(accepted)}); unset it or use another source")
  if c.has("data.stream"):
    stream = c.bool_("data.stream")
    if stream is True and source is not _BAD and not source.startswith("tfds:") and not (
        source.startswith("folder:") and os.path.isdir(source[len("folder:"):])):
      c.add(
          "data.stream", f"=True needs data.source='folder:DIR' with DIR a directory tree, or a "
          f"prepared 'tfds:NAME', got {source!r} (archives, digits and npz sources load in "
          "memory: set it False)")
    if stream is True and c.has("encoder.checkpoint") and not c.raw("encoder.checkpoint"):
      c.add(
          "data.stream", "=True: pretraining reads its data in memory; set encoder.checkpoint "
          "(e.g. a MoCo v2 ResNet-50 converted by launch/convert.py), or data.stream=False")
    if stream is True and c.has("support.metrics") and config_lib.names(c.raw("support.metrics")):
      # The counterfactual models train on the resident copy the prepare stage writes.
      from jaxattr import resident  # pylint: disable=import-outside-toplevel
      side = c.raw("resident.side")
      if side not in resident.SIDES or isinstance(side, bool):
        c.add(
            "resident.side", f"={side!r}: support on streamed data trains on the resident copy "
            f"of this side; must be one of {resident.SIDES}")


@functools.lru_cache(maxsize=1)
def _pretrainable_encoders() -> tuple[str, ...]:
  """Encoders `jaxattr.ssl.moco_model` can build: their constructors take width and num_splits."""
  from jaxattr.models import ENCODERS  # pylint: disable=import-outside-toplevel

  names = []
  for name, ctor in ENCODERS.items():
    cls = ctor.func if isinstance(ctor, functools.partial) else ctor
    try:
      fields = {f.name for f in dataclasses.fields(cls)}
    except TypeError:
      continue
    if {"width", "num_splits"} <= fields:
      names.append(name)
  return tuple(names)


def _check_pretrain(c: _Checker) -> None:
  c.str_("encoder.name", _pretrainable_encoders())
  width = c.num_("encoder.width", 0, lo_open=True, what="channel multiplier")
  if width is not _BAD and int(64 * width) < 1:
    c.bad("encoder.width", width, ">= 1/64 (the encoder's base channels are int(64 * width))")
  splits = c.int_("encoder.num_splits", lo=1)
  c.str_("encoder.checkpoint")
  c.int_("pretrain.epochs", lo=1)
  batch = c.int_("pretrain.batch_size", lo=1)
  c.num_("pretrain.base_lr", 0, lo_open=True)
  c.num_("pretrain.momentum", 0, 1, hi_open=True)
  c.num_("pretrain.weight_decay", 0)
  c.num_("pretrain.ema_momentum", 0, 1)
  c.num_("pretrain.temperature", 0, lo_open=True)
  bank = c.int_("pretrain.memory_bank_size", lo=1)
  c.int_("pretrain.proj_hidden_dim", lo=1)
  c.int_("pretrain.proj_out_dim", lo=1)
  c.num_("pretrain.min_scale", 0, 1, lo_open=True)
  c.int_("pretrain.knn_k", lo=1)
  c.num_("pretrain.knn_temperature", 0, lo_open=True)
  c.int_("pretrain.knn_every_epochs", lo=0, what="0 = only at the end")
  c.int_("pretrain.checkpoint_every_steps", lo=1)
  c.int_("pretrain.log_every_steps", lo=1)
  c.int_("pretrain.max_steps", lo=1, allow=(-1,), what="-1 = all epochs")
  if batch is not _BAD and splits is not _BAD and batch % splits:
    c.add("pretrain.batch_size",
          f"={batch}: must be a multiple of encoder.num_splits={splits} (SplitBatchNorm groups)")
  if batch is not _BAD and bank is not _BAD and bank < batch:
    c.add(
        "pretrain.memory_bank_size",
        f"={bank}: must be >= pretrain.batch_size={batch} (each step enqueues a whole batch of "
        "keys into the FIFO bank; a larger batch overwrites its own slots)")


def _check_features(c: _Checker) -> None:
  c.int_("features.batch_size", lo=1, what="rounded up to a multiple of the devices")
  c.str_("features.dtype", FEATURE_DTYPES)
  if c.has("features.store_dtype"):
    c.str_("features.store_dtype", ("float32", "float16"))
    c.int_("features.chunk_rows", lo=1, what="rows per resumable chunk of streamed features")
    c.int_("features.workers", lo=0, what="decode processes; 0 = threads of this process")
    c.int_("features.threads", lo=1, what="decode threads per process")
    c.bool_("features.skip_unreadable")
  path = c.str_("encoder.checkpoint")
  if path not in (_BAD, "") and "://" not in path and not (os.path.isfile(
      os.path.join(path, "meta.json")) and os.path.isdir(os.path.join(path, "variables"))):
    what = "does not exist" if not os.path.exists(path) else "is not a variables checkpoint"
    c.add(
        "encoder.checkpoint",
        f"={path!r}: {what}; must be '' (pretrain) or a directory with meta.json and variables/ "
        "(write one with launch/convert.py)")
  elif path not in (_BAD, "") and "://" not in path:
    from jaxattr import checkpoint  # pylint: disable=import-outside-toplevel
    from jaxattr.models import ENCODERS  # pylint: disable=import-outside-toplevel
    try:
      name = checkpoint.read_meta(path).get("encoder")
    except ValueError as e:
      c.add("encoder.checkpoint", f"={path!r}: {e}")
    else:
      if name is not None and name not in ENCODERS:
        c.add(
            "encoder.checkpoint", f"={path!r}: its meta.json names the encoder {name!r}, which "
            f"this jaxattr does not know (known: {sorted(ENCODERS)})")


def _check_attribution(c: _Checker) -> None:
  from jaxattr.attribute import METHODS  # pylint: disable=import-outside-toplevel

  c.names_("attribution.methods", METHODS)
  c.int_("attribution.k", lo=1, what="training examples kept per target")
  c.bool_("attribution.same_class")
  targets = c.str_("attribution.targets", TARGET_SPECS)
  c.int_("attribution.num_targets", lo=1 if targets == "random" else None)
  target_list = c.ints_("attribution.target_list")
  if targets == "list" and target_list is not _BAD:
    neg = [t for t in target_list if t < 0]
    dups = sorted({t for t in target_list if target_list.count(t) > 1})
    if not target_list:
      c.bad("attribution.target_list", (), "a non-empty tuple of test positions when "
            "attribution.targets='list'")
    elif neg or dups:
      c.bad(
          "attribution.target_list", tuple(target_list), "distinct test positions >= 0"
          f"{f'; negative: {neg}' if neg else ''}{f'; repeated: {dups}' if dups else ''}")
  c.num_("attribution.C", 0, lo_open=True)
  c.num_("attribution.tol", 0, lo_open=True)
  c.int_("attribution.max_iter", lo=1)
  c.int_("attribution.max_rows", lo=1)
  c.int_("attribution.chunk_size", lo=1, what="rounded up to a multiple of the devices")
  c.bool_("attribution.allow_nonconverged")
  # The grid of each method shows viz.num_targets targets: none at all fails to draw.
  c.int_("viz.num_targets", lo=1)
  c.int_("viz.top", lo=0)  # 0: the grid shows the targets only
  if c.has("shard.count"):
    count = c.int_("shard.count", lo=1)
    index = c.int_("shard.index", lo=0)
    if isinstance(count, int) and isinstance(index, int) and index >= count:
      c.add("shard.index", f"={index} must lie in [0, shard.count={count})")


def _entries(value: Any) -> tuple[str, ...]:
  """The names of a list field's entries ('name=PATH' -> 'name'); () when malformed."""
  try:
    return tuple(e.partition("=")[0] for e in config_lib.names(value))
  except TypeError:
    return ()


def _check_trak(c: _Checker) -> None:
  from jaxattr.attribute.trak import PROJECTIONS  # pylint: disable=import-outside-toplevel
  c.int_("trak.num_models", lo=1, what="full-data models")
  c.int_("trak.proj_dim", lo=1)
  c.str_("trak.projection", PROJECTIONS)
  c.int_("trak.seed", lo=0)
  c.num_("trak.lambda_reg", 0)
  c.int_("trak.chunk_size", lo=1, what="images per gradient step")
  c.int_("trak.block_rows", lo=1)


def _check_lds(c: _Checker) -> None:
  from jaxattr.counterfactual.lds import OWN_METHODS  # pylint: disable=import-outside-toplevel
  specs = c.names_("lds.methods")
  if specs is not _BAD:
    names = [e.partition("=")[0] for e in specs]
    for spec in specs:
      name, eq, path = spec.partition("=")
      if eq:
        if not name or os.sep in name:
          c.add("lds.methods", f": entry {spec!r} must start with a method name")
        elif not path.strip().endswith((".npy", ".npz")) or not os.path.exists(path.strip()):
          c.add(
              "lds.methods", f": entry {spec!r}: score matrix {path.strip()!r} must be an "
              "existing .npy (float [targets, train]) or .npz (scores, train_index) file")
      elif name not in OWN_METHODS:
        c.add(
            "lds.methods", f": entry {spec!r} is not one of {list(OWN_METHODS)} (an external "
            "score matrix is 'name=PATH.npy')")
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
      c.add("lds.methods", f": method names {dups} repeat")
  c.int_("lds.num_subsets", lo=2, what="random training subsets")
  c.num_("lds.alpha", 0, 1, lo_open=True, hi_open=True,
         what="the fraction of the training set in each subset")
  c.int_("lds.models_per_subset", lo=1)
  c.int_("lds.num_targets", lo=0, what="0 = every test image")
  c.int_("lds.seed", lo=0)
  c.int_("lds.bootstrap", lo=0)


def _check_lds_data(c: _Checker, train: Any, test: Any, where: str) -> None:
  _check_lds_score_files(c, train, test)
  alpha, batch = c.good("lds.alpha"), c.good("ensemble.batch_size")
  if alpha is _BAD or train is None:
    return
  n = len(train)
  size = int(round(alpha * n))
  classes = len(np.unique(np.asarray(train.labels)))
  if batch is not _BAD and size < batch:
    c.add(
        "lds.alpha", f"={alpha}: subsets of {size} of the {n} training images {where} are "
        f"smaller than one batch (ensemble.batch_size={batch}): raise lds.alpha or lower the batch")
  if size < classes:
    c.add(
        "lds.alpha", f"={alpha}: subsets of {size} images cannot hold the {classes} classes of "
        f"the training set {where}: raise lds.alpha")


def _check_lds_score_files(c: _Checker, train: Any, test: Any) -> None:
  """Each external score matrix of lds.methods read as the stage will read it (shape, dtype,
  index, NaN), so that a bad file fails here and not after the pipeline's earlier stages."""
  from jaxattr.counterfactual import lds  # pylint: disable=import-outside-toplevel
  specs, num, seed = c.good("lds.methods"), c.good("lds.num_targets"), c.good("lds.seed")
  if train is None or test is None or _BAD in (specs, num, seed) or "lds.methods" in c.flagged:
    return
  targets = lds.select_targets(len(test), num, seed)
  for spec in specs:
    name, _, path = spec.partition("=")
    if path:
      try:
        lds.external_scores(name, path.strip(), targets, np.asarray(train.index),
                            np.asarray(test.index))
      except lds.LdsError as e:
        c.add("lds.methods", ": " + str(e).removeprefix("lds.methods "))


def _check_ensemble(c: _Checker) -> None:
  c.str_("ensemble.model", CLASSIFIERS)
  c.num_("ensemble.width", 0, lo_open=True, what="channel multiplier")
  c.int_("ensemble.epochs", lo=1)
  c.int_("ensemble.batch_size", lo=1)
  c.num_("ensemble.peak_lr", 0, lo_open=True)
  # Beyond ensemble.epochs the lr only ramps up (configs/digits.py:quick trains 1 epoch of its
  # 1.5-epoch ramp), as `ensemble.check_config` allows.
  c.num_("ensemble.peak_epoch", 0, what="the epoch of the lr peak")
  c.int_("ensemble.schedule_examples", lo=0, what="0 = the dataset given")
  c.num_("ensemble.momentum", 0, 1, hi_open=True)
  c.num_("ensemble.weight_decay", 0)
  c.num_("ensemble.label_smoothing", 0, 1, hi_open=True)
  c.str_("ensemble.compute_dtype", COMPUTE_DTYPES)
  c.int_("ensemble.translate", lo=0, what="pixels")
  c.int_("ensemble.cutout", lo=0, what="pixels, 0 = off")
  c.bool_("ensemble.flip")
  c.int_("ensemble.models_per_wave", lo=0, what="0 = all; rounded up to a multiple of the devices")
  c.str_("ensemble.formulation", FORMULATIONS)
  c.str_("ensemble.cpu_ops", CPU_OPS)
  c.int_("ensemble.eval_batch_size", lo=1)
  c.num_("ensemble.log_every_s", 0, lo_open=True)

  # Fields of the ResNet-18 recipes (`config.imagenet_recipe`); older configs may lack them.
  def optional(f):
    return c.has(f"ensemble.{f}")

  if optional("stem"):
    c.str_("ensemble.stem", STEMS)
  for f in ("blurpool", "bn_weight_decay", "eval_flip"):
    if optional(f):
      c.bool_(f"ensemble.{f}")
  augment = c.str_("ensemble.augment", AUGMENTS) if optional("augment") else "cifar"
  if optional("min_scale"):
    c.num_("ensemble.min_scale", 0, 1, lo_open=True, what="a fraction of the image area")
  ramp = {}
  for f in ("res_min", "res_max", "ramp_start", "ramp_end", "res_step"):
    if optional(f):
      ramp[f] = c.int_(f"ensemble.{f}", lo=0, what="pixels" if "res" in f else "epoch")
  if augment == "cifar":
    for f in ("res_min", "res_max"):
      if ramp.get(f) not in (None, _BAD, 0):
        c.add(
            f"ensemble.{f}", f"={ramp[f]} needs ensemble.augment='rrc' (the 'cifar' views keep "
            "the image side); set it to 0")
  if _BAD not in ramp.values() and ramp.get("ramp_end", 0) < ramp.get("ramp_start", 0):
    c.add("ensemble.ramp_end", f"={ramp['ramp_end']} precedes ensemble.ramp_start="
          f"{ramp['ramp_start']}")
  if optional("data_parallel"):
    dp = c.int_("ensemble.data_parallel", lo=1, what="devices per model")
    bs = c.good("ensemble.batch_size")
    if dp is not _BAD and bs is not _BAD and bs % dp:
      c.add(
          "ensemble.batch_size", f"={bs} does not divide over ensemble.data_parallel={dp} "
          f"devices; make it a multiple of {dp}")
    model = c.good("ensemble.model")
    if dp is not _BAD and dp > 1 and model is not _BAD and model != "resnet18":
      c.add(
          "ensemble.data_parallel", f"={dp} needs ensemble.model='resnet18' (its BatchNorms "
          "reduce over the data axis), got " + repr(model))
  if optional("data_sharding"):
    c.str_("ensemble.data_sharding", DATA_SHARDINGS)


def _check_support(c: _Checker, with_attribution: bool) -> None:
  from jaxattr.counterfactual.bisection import METRICS  # pylint: disable=import-outside-toplevel

  metrics = c.names_("support.metrics", METRICS)
  specs = c.names_("support.methods")
  requested = _support_targets(c)
  num = c.int_("support.num_targets", lo=0, what="the first n targets, 0 = all")
  if requested is not _BAD and requested is not None and num is not _BAD and num > len(requested):
    c.add(
        "support.num_targets", f"={num} exceeds the {len(requested)} targets of support.targets; "
        f"lower it to at most {len(requested)}, or 0 for all")
  c.int_("support.num_tests", lo=1)
  c.int_("support.search_budget", lo=0)
  k = c.int_("support.k", lo=1)
  exhaustive = c.bool_("support.exhaustive")
  grid = c.ints_("support.grid")
  if exhaustive is True and grid is not _BAD and k is not _BAD:
    if any(g < 1 or g > k for g in grid) or any(b <= a for a, b in zip(grid, grid[1:])):
      c.bad(
          "support.grid", tuple(grid), f"strictly ascending ints in [1, support.k={k}] with "
          "support.exhaustive=True (entries outside would be dropped silently)")
  c.int_("support.seed", lo=0)
  c.int_("support.flip_models", lo=1 if metrics is not _BAD and "mislabel" in metrics else None)
  c.int_("support.flip_seed", lo=0)
  c.bool_("support.joint")
  if specs is _BAD:
    return
  names = [s.partition("=")[0].strip() for s in specs]
  for spec, name in zip(specs, names):
    _, sep, path = spec.partition("=")
    if not name or os.sep in name:
      c.add("support.methods", f": entry {spec!r} must start with a method name (no '{os.sep}')")
    if sep and not os.path.isfile(path.strip()):
      c.add("support.methods", f": entry {spec!r}: top-k file {path.strip()!r} does not exist")
    if sep and requested is None and c.has("support.targets"):
      c.add(
          "support.targets",
          f"='': the reference-layout matrix of support.methods entry {spec!r} needs explicit "
          "targets (a file or a list of test index values)")
  dups = sorted({n for n in names if names.count(n) > 1})
  if dups:
    c.add("support.methods", f"={','.join(specs)!r}: method names {dups} repeat (one output "
          "directory per name)")
  if not with_attribution:
    return  # The attribution outputs of an earlier run say what they hold (support checks them).
  own = [s for s in specs if "=" not in s]
  computed = c.good("attribution.methods")
  if own and computed is not _BAD:
    missing = [m for m in own if m not in computed]
    if missing:
      c.add(
          "support.methods", f"={','.join(specs)!r}: {missing} are not computed by "
          f"attribution.methods={','.join(computed)!r}; add them there or drop them here")
  ak = c.good("attribution.k")
  if own and k is not _BAD and ak is not _BAD and k > ak:
    c.add(
        "support.k", f"={k} exceeds attribution.k={ak}: the searched prefixes are the "
        f"attribution's top-k; lower support.k or raise attribution.k")
  # Without support.targets, the searched targets are the attribution's (its first n).
  spec, num = c.good("attribution.targets"), c.good("support.num_targets")
  count, listed = _BAD, c.good("attribution.target_list")
  if spec == "random":
    count = c.good("attribution.num_targets")
  elif spec == "list" and listed is not _BAD and "attribution.target_list" not in c.flagged:
    count = len(listed)  # ('all': the test split's size, checked against the data)
  if own and requested is None and num is not _BAD and count is not _BAD and num > count:
    _too_many_targets(c, num, count, spec)


def _too_many_targets(c: _Checker, num: int, count: int, spec: str) -> None:
  c.add(
      "support.num_targets", f"={num} exceeds the {count} targets of attribution.targets="
      f"{spec!r}; lower it to at most {count} (0 = all), or attribute more targets")


def _support_targets(c: _Checker) -> Any:
  """support.targets parsed: None for '', int64 array of test index values, or `_BAD`."""
  from jaxattr.counterfactual import support  # pylint: disable=import-outside-toplevel

  spec = c.str_("support.targets")
  if spec is _BAD:
    return _BAD
  try:
    ids = support.parse_targets(spec)
  except (ValueError, OSError) as e:
    c.values.pop("support.targets", None)
    c.add(
        "support.targets", f"={spec!r}: must be '', a .npy or text file of test index values, "
        f"or a comma-separated list of ints ({e})")
    return _BAD
  if ids is None:
    return c._keep("support.targets", None)  # pylint: disable=protected-access
  values, repeats = np.unique(ids, return_counts=True)
  dups = values[repeats > 1].tolist()
  if not len(ids) or dups:
    c.values.pop("support.targets", None)
    c.add(
        "support.targets", f"={spec!r}: must name at least one test index value, each once" +
        (f"; repeated: {dups[:10]}" if dups else ""))
    return _BAD
  return c._keep("support.targets", ids)  # pylint: disable=protected-access


def _check_finite(c: _Checker, fields: dict[str, None]) -> None:
  """NaN / inf anywhere in the checked sections (fields flagged already are not repeated)."""

  def walk(field: str, value: Any) -> None:
    if field in c.flagged:
      return
    if isinstance(value, (float, np.floating)) and not math.isfinite(value):
      c.bad(field, value, "a finite number")
    elif isinstance(value, (list, tuple)):
      for x in value:
        if isinstance(x, (float, np.floating)) and not math.isfinite(x):
          c.bad(field, tuple(value), "free of NaN and inf")
          return
    elif hasattr(value, "items") and not isinstance(value, str):
      for key, sub in value.items():
        walk(f"{field}.{key}", sub)

  for field in fields:
    value = c.raw(field)
    if value is not _BAD:
      walk(field, value)


# ------------------------------------------------------------------------------------------------
# Against the data.


def _check_against_data(c: _Checker, train: Any, test: Any, stages: tuple[str, ...]) -> None:
  source = c.raw("data.source")
  where = f"of data.source={source!r}" if isinstance(source, str) else "of the data"
  for split, ds in (("train", train), ("test", test)):
    if ds is not None and not len(ds):
      c.add("data.source", f"={source!r}: the {split} split is empty")
  train = train if train is not None and len(train) else None
  test = test if test is not None and len(test) else None
  counts = None
  if train is not None:
    labels = np.asarray(train.labels)
    counts = np.bincount(labels, minlength=max(train.num_classes, int(labels.max()) + 1))
    present = np.flatnonzero(counts)
    if {"attribution", "support", "flip"} & set(stages) and len(present) < 2:
      c.add(
          "data.source", f"={source!r}: the training split holds only class(es) "
          f"{_class_list(train, present)}; attribution (ESVM negatives) and the counterfactual "
          "models (a wrong class to flip to) need at least 2 classes")
    if test is not None and {"attribution", "support"} & set(stages):
      missing = np.setdiff1d(np.unique(test.labels), present)
      if len(missing):
        c.add(
            "data.source", f"={source!r}: test classes {_class_list(test, missing)} have no "
            "training images (no candidates to attribute them to); use data with every test "
            "class in the training split")

  if train is not None and c.done("trak.proj_dim"):  # TRAK runs (its section was checked)
    dim, ridge = c.good("trak.proj_dim"), c.good("trak.lambda_reg")
    if dim is not _BAD and ridge is not _BAD and ridge == 0 and dim > len(train):
      c.add(
          "trak.proj_dim", f"={dim} exceeds the {len(train)} training images {where}: with "
          "trak.lambda_reg=0 the projected gradients' X^T X is singular; lower trak.proj_dim "
          f"to at most {len(train)} or set trak.lambda_reg > 0")

  if "pretrain" in stages and train is not None:
    batch = c.good("pretrain.batch_size")
    if batch is not _BAD and batch > len(train):
      c.add(
          "pretrain.batch_size", f"={batch} exceeds the {len(train)} training images {where}; "
          "lower it (a multiple of encoder.num_splits)")
  if "attribution" in stages:
    _check_attribution_data(c, counts, train, test, where)
  if "lds" in stages:
    _check_lds_data(c, train, test, where)
  if {"support", "flip"} & set(stages) and train is not None:
    # Streamed data trains on its resident copy (`jaxattr.resident`), resident.side pixels.
    in_memory = isinstance(getattr(train, "images", None), np.ndarray)
    side = min(train.images.shape[1:3]) if in_memory else c.raw("resident.side")
    if not isinstance(side, int) or isinstance(side, bool):
      side = 0
    if not side:
      c.add(
          "resident.side", f"={c.raw('resident.side')!r}: the counterfactual models of "
          "streamed data train on its resident copy; must be one of (32, 64, 96, 128)")
      side = 10**9  # nothing to compare the image-size fields with
    cutout, translate = c.good("ensemble.cutout"), c.good("ensemble.translate")
    for f in ("res_min", "res_max"):
      res = c.good(f"ensemble.{f}") if c.has(f"ensemble.{f}") else 0
      if res is not _BAD and res > side:
        c.add(
            f"ensemble.{f}", f"={res} exceeds the {side}-pixel side of the images {where}; "
            "must be <= it (0 = the side)")
    if cutout is not _BAD and cutout > side:
      c.add(
          "ensemble.cutout", f"={cutout} exceeds the {side}-pixel side of the images {where}; "
          "must be <= it (0 = off)")
    if translate is not _BAD and translate >= side:
      c.add("ensemble.translate", f"={translate}: must be < the {side}-pixel side of the images "
            f"{where}")
    _check_ensemble_batch(c, len(train), stages, where)
  if "support" in stages:
    _check_support_data(c, train, test, stages, where)


def _check_support_topk_files(c: _Checker, specs: Sequence[str], k: int, requested: np.ndarray,
                              train: Any, where: str) -> None:
  """Each 'name=PATH' top-k matrix of support.methods read as the stage will read it: the rows
  of support.targets, whole numbers, and (with the data) training index values."""
  from jaxattr.counterfactual import support  # pylint: disable=import-outside-toplevel
  for spec in specs:
    path = spec.partition("=")[2].strip()
    if not path or not os.path.isfile(path):
      continue  # no file, or one that `_check_support` reported missing
    try:
      _, _, topk = support.load_topk("", spec, k, requested)
    except ValueError as e:
      c.add("support.methods", ": " + str(e).removeprefix("support.methods "))
      continue
    if train is not None:
      foreign = np.setdiff1d(topk, np.asarray(train.index, np.int64))
      if len(foreign):
        c.add(
            "support.methods", f": entry {spec!r}: the top-{k} of support.targets holds "
            f"{len(foreign)} value(s) that are not training index values {where} (first "
            f"{foreign[:10].tolist()}); a reference-layout matrix holds training index values, "
            "best first")


def _class_list(ds: Any, classes: np.ndarray) -> str:
  names = list(getattr(ds, "class_names", []))
  shown = [
      f"{int(i)} ({names[int(i)]!r})" if int(i) < len(names) else str(int(i)) for i in classes[:10]
  ]
  return "[" + ", ".join(shown) + (", ..." if len(classes) > 10 else "") + "]"


def _attribution_target_positions(c: _Checker, n_test: int) -> Any:
  """The test positions attribution will use (as `attribution.select_targets`), or `_BAD`."""
  spec = c.good("attribution.targets")
  if spec == "all":
    return np.arange(n_test)
  if spec == "random":
    num, seed = c.good("attribution.num_targets"), c.good("seed")
    if num is _BAD or seed is _BAD or num > n_test:
      return _BAD
    from jaxattr.attribute.attribution import select_targets  # pylint: disable=import-outside-toplevel
    return select_targets("random", n_test, num, (), seed)
  if spec == "list":
    lst = c.good("attribution.target_list")
    if lst is _BAD or "attribution.target_list" in c.flagged:
      return _BAD
    return np.asarray(lst, np.int64)
  return _BAD


def _check_attribution_data(c: _Checker, counts: np.ndarray | None, train: Any, test: Any,
                            where: str) -> None:
  spec, num = c.good("attribution.targets"), c.good("attribution.num_targets")
  lst = c.good("attribution.target_list")
  if "attribution.target_list" in c.flagged:
    lst = _BAD
  if test is not None:
    n_test = len(test)
    if spec == "random" and num is not _BAD and num > n_test:
      c.add(
          "attribution.num_targets", f"={num} exceeds the {n_test} test images {where}; lower "
          "it (or use attribution.targets='all')")
    if spec == "list" and lst is not _BAD:
      out = [t for t in lst if t >= n_test]
      if out:
        c.add(
            "attribution.target_list", f"={tuple(lst)!r}: positions {out[:10]} are outside the "
            f"{n_test} test images {where} (positions must lie in [0, {n_test}))")
  k, same = c.good("attribution.k"), c.good("attribution.same_class")
  if train is None or k is _BAD or same is _BAD:
    return
  if not same:
    if k > len(train):
      c.add("attribution.k", f"={k} exceeds the {len(train)} training images {where}; lower "
            "attribution.k")
    return
  # Classes that may hold targets: those of the listed positions, else every test class (all
  # training classes when the test split is not given).
  if test is None:
    classes = np.arange(len(counts))
  elif spec == "list" and lst is not _BAD:
    classes = np.unique(np.asarray(test.labels)[[t for t in lst if t < len(test)]])
  else:
    classes = np.unique(test.labels)
  classes = classes[classes < len(counts)]
  classes = classes[counts[classes] > 0]  # classes without training images are flagged above
  if not len(classes):
    return
  smallest = classes[np.argmin(counts[classes])]
  if k > counts[smallest]:
    c.add(
        "attribution.k", f"={k} exceeds the {counts[smallest]} training images of class "
        f"{_class_list(train, [smallest])[1:-1]}, the smallest class of the targets {where} "
        "(same_class=True: a target's candidates are its class); lower attribution.k or set "
        "attribution.same_class=False")


def _check_ensemble_batch(c: _Checker, n: int, stages: tuple[str, ...], where: str) -> None:
  batch = c.good("ensemble.batch_size")
  if batch is _BAD:
    return
  metrics = c.good("support.metrics") if "support" in stages else ()
  k = c.good("support.k")
  if metrics is not _BAD and "removal" in metrics and k is not _BAD and k <= n:
    if batch > n - k:
      c.add(
          "ensemble.batch_size", f"={batch} exceeds the {n - k} training images left when "
          f"removal support drops support.k={k} of the {n} {where} (batches drop_last: such a "
          "model would train no step); lower ensemble.batch_size or support.k")
  elif batch > n:
    c.add(
        "ensemble.batch_size", f"={batch} exceeds the {n} training images {where} (batches "
        "drop_last: a model would train no step); lower it")


def _check_support_data(c: _Checker, train: Any, test: Any, stages: tuple[str, ...],
                        where: str) -> None:
  k = c.good("support.k")
  if train is not None and k is not _BAD and k > len(train):
    c.add("support.k", f"={k} exceeds the {len(train)} training images {where}; lower it")
  requested = c.good("support.targets")
  if test is None or requested is _BAD:
    return
  test_index = np.asarray(test.index, np.int64)
  if requested is not None:
    absent = np.setdiff1d(requested, test_index)
    if len(absent):
      c.add(
          "support.targets", f": index values {absent[:10].tolist()} are not among the "
          f"{len(test_index)} test images {where} (limit_per_class may have dropped them)")
      return
  specs = c.good("support.methods")
  if requested is not None and specs is not _BAD and k is not _BAD:
    _check_support_topk_files(c, specs, k, requested, train, where)
  num = c.good("support.num_targets")
  if "attribution" not in stages or specs is _BAD or all("=" in s for s in specs):
    return
  # Methods without '=' read this run's attribution outputs: its targets bound support's.
  positions = _attribution_target_positions(c, len(test_index))
  if positions is _BAD or (len(positions) and positions.max() >= len(test_index)):
    return
  have = test_index[positions]
  source = f"attribution.targets={c.good('attribution.targets')!r}"
  if requested is not None:
    absent = np.setdiff1d(requested, have)
    if len(absent):
      c.add(
          "support.targets", f": index values {absent[:10].tolist()} are not among the "
          f"{len(have)} targets of {source}; pick targets among them or change "
          "attribution.targets")
  elif num is not _BAD and num > len(have) and c.good("attribution.targets") == "all":
    _too_many_targets(c, num, len(have), "all")

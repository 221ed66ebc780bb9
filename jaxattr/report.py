"""A static HTML report of a run: WORKDIR/report.html, self-contained (images embedded as PNG).

It renders whatever the workdir holds and says what is missing:

* the config (given, or WORKDIR/config.json) and `utils.provenance()`;
* timing per stage from WORKDIR/timings.json ({stage: seconds}, written by the pipeline);
* per support metric, a table of every method's summary (WORKDIR/support/<metric>/<method>/
  summary.json) and the cumulative curves of all methods on one figure;
* per attribution method (WORKDIR/attribution/<method>/{topk,scores,targets}.npy), for a few
  targets: the target image, its top-16 training images with scores, and the top-`support`
  prefix whose removal flipped it.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from jaxattr import utils
from jaxattr.counterfactual import bisection, summaries, support

TOP = 16  # attributed images shown per target
MAX_PREFIX = 48  # flipping-prefix images shown per target (the rest are counted)
# Pipeline stages in run order (others follow alphabetically).
STAGES = ("pretrain", "encoder", "features", "attribution", "flip_classes", "prepare", "support",
          "lds", "report")


def write_report(workdir: str, config: Any = None, train: Any = None, test: Any = None,
                 num_examples: int = 4, out: str | None = None) -> str:
  """Writes the report and returns its path.

  Args:
    workdir: WORKDIR of a run.
    config: the run's ConfigDict or dict (default: WORKDIR/config.json when present). Its
      `data` section (`source` and `options`) loads the images when `train` / `test` are not
      given.
    train: the training `jaxattr.data.Dataset` (images of attributed training examples).
    test: the test `Dataset` (target images).
    num_examples: targets shown per attribution method.
    out: output path (default WORKDIR/report.html).

  Returns:
    The path of the written HTML file.
  """
  out = out or os.path.join(workdir, "report.html")
  cfg = _config_dict(workdir, config)
  train, test, data_note = _datasets(cfg, train, test)
  parts = [
      (f"<h1>jaxattr report</h1><p class='muted'>{html.escape(os.path.abspath(workdir))} "
       f"&middot; generated {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}</p>"),
      _timings(workdir),
      _unreadable(workdir),
      _support(workdir, cfg),
      _lds(workdir, cfg),
      _examples(workdir, train, test, data_note, num_examples),
      _config_section(cfg),
  ]
  page = _PAGE.format(body="\n".join(parts))
  with utils.atomic_path(out) as tmp, open(tmp, "w") as f:
    f.write(page)
  logging.info("report: %s", out)
  return out


# ------------------------------------------------------------------------------------------------
# Sections.


def _timings(workdir: str) -> str:
  path = os.path.join(workdir, "timings.json")
  head = "<h2>Timing per stage</h2>"
  if not os.path.exists(path):
    return head + _note("No timings.json yet (the pipeline writes it as stages finish).")
  timings, problem = _read_json(path, "timings.json")
  if problem:
    return head + problem
  # JSON files are written with sorted keys: show the pipeline's stages in pipeline order.
  order = {stage: i for i, stage in enumerate(STAGES)}
  stages = sorted(timings, key=lambda k: (order.get(k, len(order)), k))
  rows = [[html.escape(str(k)), _fmt_seconds(timings[k])] for k in stages]
  total = sum(v for v in timings.values() if isinstance(v, (int, float)))
  rows.append(["<b>total</b>", f"<b>{_fmt_seconds(total)}</b>"])
  return head + _table(["stage", "wall time"], rows)


def _unreadable(workdir: str) -> str:
  """A note on the images that the features or prepare stage skipped as unreadable ('' when
  none), so that a reader knows the attribution and the models went without them."""
  counts = []
  for stage, path, key in (("features", "features/summary.json", "unreadable_skipped"),
                           ("prepare", "resident/summary.json", "unreadable")):
    summary, _ = _read_json(os.path.join(workdir, path), path)
    for split in ("train", "test"):
      n = ((summary or {}).get(split) or {}).get(key, 0) if isinstance(summary, dict) else 0
      if isinstance(n, int) and n > 0:
        counts.append(f"{n} {split} image{'s' * (n != 1)} ({stage})")
  if not counts:
    return ""
  return ("<h2>Unreadable images</h2>" +
          _note("Skipped as unreadable (skip_unreadable) and stored as black images: " +
                ", ".join(counts) + ". They are never attributed, never targets, and no "
                "counterfactual model trains on them; the stage's log names the first ones."))


def _support(workdir: str, cfg: dict | None = None) -> str:
  root = os.path.join(workdir, "support")
  head = "<h2>Counterfactual support</h2>"
  metrics = [m for m in bisection.METRICS if os.path.isdir(os.path.join(root, m))]
  configured = ((cfg or {}).get("support") or {}).get("metrics", None)
  if not metrics and configured is not None and not str(configured).strip():
    return head + _note("This run measures no counterfactual support (support.metrics is ''); "
                        "set --config.support.metrics=removal,mislabel to measure it.")
  if not metrics:
    return head + _note("No support results yet (WORKDIR/support/ is empty): run the support "
                        "stage (launch/support.py).")
  parts = [
      head,
      ("<p>Support = the smallest number of top-attributed training images whose "
       "removal (or relabelling to the flip class) makes most retrained models "
       "misclassify the target; smaller is better. Targets not flipped within k count "
       "as never flipped (infinite support) in the median and curves.</p>")
  ]
  for metric in metrics:
    parts.append(f"<h3>{metric} support</h3>")
    rows, thresholds, settings, shared = [], [], set(), 0
    for method in sorted(os.listdir(os.path.join(root, metric))):
      path = os.path.join(root, metric, method, "summary.json")
      if not os.path.exists(path):
        state = os.path.join(root, metric, method, "state.json")
        if os.path.exists(state):
          rows.append([html.escape(method), "<i>in progress</i>"])
        continue
      with open(path) as f:
        s = json.load(f)
      thresholds = thresholds or sorted(s["fraction_flipped"], key=int)
      med = s["median_support"]
      rounds = s.get("rounds", [])
      # A round's trainer call trains the models of every search due then (all methods and
      # metrics at once): its time is the call's, shared with those searches, not this row's.
      is_shared = any(r.get("call_models", 0) > r.get("models", 0) for r in rounds)
      if is_shared:
        shared = max([shared] + [r.get("call_models", 0) for r in rounds])
      rows.append([
          html.escape(method),
          str(s["targets"]),
          f"&gt;{s['k']}" if med is None else f"{med:g}",
          "-" if s.get("median_support_flipped_only") is None else
          f"{s['median_support_flipped_only']:g}",
          str(s["not_flipped"]),
          *[f"{100 * s['fraction_flipped'].get(t, 0):.0f}%" for t in thresholds],
          str(s["trainings"]),
          str(s.get("trainings_per_target_max", "")),
          f"{len(rounds)} / " + _fmt_seconds(sum(r["seconds"] for r in rounds)) +
          (", shared" if is_shared else ""),
      ])
      models = "1 model" if s["num_tests"] == 1 else f"{s['num_tests']} models"
      settings.add(f"k = {s['k']}, {models} per evaluation, " + (
          "exhaustive grid" if s.get("exhaustive") else f"search budget {s['search_budget']}"))
    if not rows:
      parts.append(_note("No finished method yet."))
      continue
    columns = [
        "method", "targets", "median", "median (flipped)", "not flipped",
        *[f"&le;{t}" for t in thresholds], "trainings", "max / target", "rounds / time"
    ]
    parts.append(_table(columns, rows))
    parts.append(
        f"<p class='sub'>Search: {html.escape('; '.join(sorted(settings)))}. Columns "
        "&le;k: fraction of all targets flipped with at most k images. Rounds / time: the "
        "search's trainer calls and their wall time" +
        (f"; 'shared': each call trained the models of several searches at once (up to "
         f"{shared} models a call, every method and metric due in that round), so these times "
         "overlap and do not add up" if shared else "") + ".</p>")
    curves = os.path.join(root, metric, "curves.png")
    if not os.path.exists(curves) or _stale(curves, os.path.join(root, metric)):
      try:
        summaries.plot_curves(workdir, metric)
      except Exception as e:  # any failure: the table above stands alone
        logging.warning("curves for %s: %s", metric, e)
    if os.path.exists(curves):
      parts.append(_png(curves, f"{metric} support curves"))
  return "\n".join(parts)


def _examples(workdir: str, train: Any, test: Any, data_note: str, num_examples: int) -> str:
  root = os.path.join(workdir, "attribution")
  head = "<h2>Attributions</h2>"
  methods = sorted(
      m for m in os.listdir(root)
      if os.path.exists(os.path.join(root, m, "topk.npy"))) if os.path.isdir(root) else []
  if not methods:
    return head + _note("No attribution results yet (WORKDIR/attribution/ is empty).")
  if train is None or test is None:
    return head + _note(f"Images unavailable: {data_note}")
  parts = [
      head,
      (f"<p>For {num_examples} targets per method: the target (left), its top-ranked "
       f"(up to {TOP}) attributed training images with their scores" +
       (", and the training images whose removal flipped it (the top-<i>support</i> prefix of "
        "the ranking)" if os.path.isdir(os.path.join(workdir, "support")) else "") + ".</p>")
  ]
  for method in methods:
    parts.append(f"<h3>{html.escape(method)}</h3>")
    base = os.path.join(root, method)
    try:
      topk = np.load(os.path.join(base, "topk.npy"))
      ids = "target_index.npy" if os.path.exists(os.path.join(base, "target_index.npy")) else (
          "targets.npy")  # test `index` values (attribute writes positions in targets.npy)
      targets = np.load(os.path.join(base, ids))
      scores = (np.load(os.path.join(base, "scores.npy")) if os.path.exists(
          os.path.join(base, "scores.npy")) else None)
      t_pos = support.positions_of(test.index, targets[:num_examples], "targets")
      rows = support.positions_of(train.index, topk[:num_examples], "top-k")
    except (OSError, ValueError) as e:
      parts.append(_note(f"Cannot show {method}: {e}"))
      continue
    removal = _support_by_target(workdir, "removal", method)
    mislabel = _support_by_target(workdir, "mislabel", method, "flip_class")
    k_removal = _support_k(workdir, "removal", method, topk.shape[1])
    k_mislabel = _support_k(workdir, "mislabel", method, topk.shape[1])
    names = list(getattr(test, "class_names", []))
    for i, target in enumerate(targets[:num_examples]):
      label = int(test.labels[t_pos[i]])
      cells = [
          _figure(test.images[t_pos[i]],
                  f"target {int(target)}<br>{html.escape(_name(names, label))}", "target")
      ]
      for j in range(min(TOP, rows.shape[1])):
        lab = int(train.labels[rows[i, j]])
        score = "" if scores is None else f"{scores[i, j]:.3g}"
        cls = "same" if lab == label else "other"
        cells.append(
            _figure(train.images[rows[i, j]],
                    f"#{j + 1} {score}<br>{html.escape(_name(names, lab))}", cls))
      parts.append(f"<div class='row'>{''.join(cells)}</div>")
      s = removal.get(int(target))
      unmeasured = [
          metric for metric, found in (("removal", removal), ("mislabel", mislabel))
          if found and int(target) not in found
      ]  # measured for other targets only
      if unmeasured:
        parts.append(_note(f"{' and '.join(unmeasured)} support: not measured for this target."))
      if s is not None and s < 0:
        parts.append(
            _note(f"removal support >{k_removal}: not flipped within k (its top {k_removal} "
                  "removed)."))
      elif s is not None:
        shown = min(s, MAX_PREFIX, rows.shape[1])
        prefix_rows = support.positions_of(train.index, topk[i, :shown], "top-k")
        more = f" (first {shown} shown)" if shown < s else ""
        cells = [_figure(train.images[r], "", "small") for r in prefix_rows]
        what = "this image" if s == 1 else f"these {s} images"
        parts.append(f"<p class='sub'>removal support {s}: removing {what} flipped "
                     f"target {int(target)}{more}</p><div class='row'>{''.join(cells)}</div>")
      if int(target) in mislabel:
        ms, flip = mislabel[int(target)]
        to = html.escape(_name(names, flip))
        if ms < 0:
          line = (f"mislabel support &gt;{k_mislabel}: not flipped by relabelling its top "
                  f"{k_mislabel} to class {to}")
        else:
          line = f"mislabel support {ms}: relabelling its top {ms} to class {to} flipped it"
        parts.append(f"<p class='sub'>{line}</p>")
  return "\n".join(parts)


def _config_section(cfg: dict[str, Any] | None) -> str:
  try:
    prov = utils.provenance()
  except Exception as e:  # any failure (no git, ...): the report still renders
    prov = {"error": str(e)}
  parts = ["<h2>Config and versions</h2>"]
  if cfg is None:
    parts.append(_note("No config given and no WORKDIR/config.json."))
  else:
    parts.append("<pre>" + html.escape(json.dumps(cfg, indent=2, sort_keys=True, default=str)) +
                 "</pre>")
  parts.append(_table(["", ""], [[html.escape(k), html.escape(str(v))] for k, v in prov.items()]))
  return "\n".join(parts)


# ------------------------------------------------------------------------------------------------
# Helpers.


def _config_dict(workdir: str, config: Any) -> dict[str, Any] | None:
  if config is not None:
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return None


def _datasets(cfg: dict[str, Any] | None, train: Any, test: Any) -> tuple[Any, Any, str]:
  if train is not None and test is not None:
    return train, test, ""
  section = (cfg or {}).get("data") or {}
  source = section.get("source")
  if not source:
    return None, None, "no train/test datasets given and the config has no data.source."
  from jaxattr import stream  # pylint: disable=g-import-not-at-top
  # `options` too (size, limit_per_class): without them the images and their `index` values
  # would not be those the run attributed. A streamed source is listed, its images read when
  # shown.
  data_config = ml_collections.ConfigDict({
      "source": source,
      "options": section.get("options") or {},
      "stream": bool(section.get("stream", False))
  })
  try:
    loaded = stream.splits(data_config)
  except Exception as e:  # any failure: the report says so instead of images
    return None, None, f"loading {source!r} failed: {e}"
  train = train if train is not None else loaded[0]
  test = test if test is not None else loaded[1]
  return train, test, ""


def _support_by_target(workdir: str, metric: str, method: str, extra: str = "") -> dict[int, Any]:
  """{target: support} (or {target: (support, row[extra])}) from a method's results.jsonl."""
  path = os.path.join(workdir, "support", metric, method, "results.jsonl")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return {r["target"]: (r["support"], r[extra]) if extra else r["support"] for r in rows}


def _support_k(workdir: str, metric: str, method: str, default: int) -> int:
  """The k a metric's searches used (its summary.json), else `default` (the listed top-k)."""
  path = os.path.join(workdir, "support", metric, method, "summary.json")
  try:
    with open(path) as f:
      return int(json.load(f)["k"])
  except (OSError, ValueError, KeyError, TypeError):
    return default


def _stale(png: str, folder: str) -> bool:
  """True when some summary.json under `folder` is newer than the PNG."""
  newest = 0.0
  for method in os.listdir(folder):
    s = os.path.join(folder, method, "summary.json")
    if os.path.exists(s):
      newest = max(newest, os.path.getmtime(s))
  return newest > os.path.getmtime(png)


def png_data_uri(image: np.ndarray, min_size: int = 64) -> str:
  """uint8 [H, W, 3] -> a data: URI of a PNG, upscaled (nearest) to at least `min_size` pixels."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  img = Image.fromarray(np.asarray(image, np.uint8))
  if max(img.size) < min_size:
    scale = -(-min_size // max(img.size))
    img = img.resize((img.size[0] * scale, img.size[1] * scale), Image.NEAREST)
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _count(n: Any, noun: str) -> str:
  """'1 model', '20 models' (and '? models' for a missing count)."""
  return f"{n} {noun}" if n == 1 else f"{'?' if n is None else n} {noun}s"


def _lds(workdir: str, cfg: dict | None = None) -> str:
  head = "<h2>Linear datamodeling score (LDS)</h2>"
  path = os.path.join(workdir, "lds", "summary.json")
  configured = ((cfg or {}).get("lds") or {}).get("methods", None)
  if not os.path.exists(path):
    if configured is not None and not str(configured).strip():
      return ""  # not configured: no section
    return head + _note("No LDS results yet (WORKDIR/lds/summary.json): run launch/lds.py.")
  s, problem = _read_json(path, "lds/summary.json")
  if problem:
    return head + problem
  rows = []
  for name, m in sorted(s["methods"].items(), key=lambda kv: -(kv[1]["lds"] or -9)):
    lo, hi = m["ci95"]
    rows.append([
        html.escape(name), "-" if m["lds"] is None else f"{m['lds']:.3f}",
        "-" if lo is None or lo != lo else f"{lo:.3f} to {hi:.3f}",
        str(m["targets_scored"])
    ])
  training = s.get("training", {})
  parts = [
      head,
      (f"<p>Mean over {s['targets']} targets of the Spearman correlation, over {s['subsets']} "
       f"random subsets of {100 * s['alpha']:.0f}% of the training set "
       f"({_count(s['models_per_subset'], 'model')} each), between a method's summed scores of a "
       "subset and the correct-class margin of the models trained on it. Higher is better; the "
       "interval is a bootstrap over targets.</p>"),
      _table(["method", "LDS", "95% interval", "targets"], rows),
  ]
  if "class" in s["methods"]:
    parts.append("<p class='sub'>'class' scores 1 for every image of the target's class and 0 for "
                 "the others: no attribution at all, the floor against which a method that ranks "
                 "only the target's class (esvm, l2, cosine) is read.</p>")
  if training:
    parts.append(f"<p class='sub'>{_count(training.get('models'), 'model')}, "
                 f"{_count(training.get('trainer_calls'), 'trainer call')} in this run, waves of "
                 f"{training.get('wave')}.</p>")
  png = os.path.join(workdir, "lds", "scatter.png")
  if os.path.exists(png):
    parts.append("<p class='sub'>Predicted vs measured margins of the first targets:</p>" +
                 _png(png, "LDS scatter", "max-width: 900px"))
  return "\n".join(parts)


def _read_json(path: str, name: str) -> tuple[Any, str]:
  """(content, '') of a JSON file, or (None, a note saying why it is unreadable)."""
  try:
    with open(path) as f:
      return json.load(f), ""
  except (OSError, ValueError) as e:
    return None, _note(f"{name} is unreadable: {e}")


def _png(path: str, alt: str, style: str = "") -> str:
  """A PNG file embedded as an <img> (class 'curve')."""
  with open(path, "rb") as f:
    data = base64.b64encode(f.read()).decode()
  css = f" style='{style}'" if style else ""
  return f"<img class='curve'{css} alt='{alt}' src='data:image/png;base64,{data}'>"


def _figure(image: np.ndarray, caption: str, cls: str) -> str:
  cap = f"<figcaption>{caption}</figcaption>" if caption else ""
  size = 28 if cls == "small" else 56
  return (f"<figure class='{cls}'><img src='{png_data_uri(image, size)}' width='{size}' "
          f"height='{size}'>{cap}</figure>")


def _name(names: Sequence[str], label: int) -> str:
  return names[label] if 0 <= label < len(names) else str(label)


def _table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  head = "".join(f"<th>{c}</th>" for c in columns)
  body = "".join("<tr>" + "".join(f"<td>{v}</td>" for v in r) + "</tr>" for r in rows)
  return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _note(text: str) -> str:
  return f"<p class='note'>{html.escape(text)}</p>"


def _fmt_seconds(s: Any) -> str:
  if not isinstance(s, (int, float)):
    return html.escape(str(s))
  return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>jaxattr report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1400px; }}
h2 {{ border-bottom: 1px solid #ccc; padding-bottom: 4px; margin-top: 32px; }}
table {{ border-collapse: collapse; margin: 8px 0; font-size: 13px; }}
th, td {{ border: 1px solid #ddd; padding: 3px 8px; text-align: right; }}
th {{ background: #f3f3f3; }} td:first-child, th:first-child {{ text-align: left; }}
.muted {{ color: #777; }} .note {{ color: #8a5a00; background: #fff8e5; padding: 4px 8px; }}
.row {{ display: flex; flex-wrap: wrap; gap: 4px; align-items: flex-start; margin: 6px 0; }}
figure {{ margin: 0; text-align: center; font-size: 10px; width: 62px; }}
figure img {{ image-rendering: pixelated; border: 2px solid transparent; }}
figure.target img {{ border-color: #1565c0; }} figure.target {{ margin-right: 12px; }}
figure.same img {{ border-color: #2e7d32; }} figure.other img {{ border-color: #c62828; }}
figure.small {{ width: 30px; }}
.sub {{ font-size: 13px; margin: 2px 0; }} .curve {{ max-width: 560px; }}
pre {{ background: #f7f7f7; padding: 8px; font-size: 12px; max-height: 400px; overflow: auto; }}
</style></head><body>
{body}
<p class='muted'>Borders: blue = target, green = same class as the target, red = other class.</p>
</body></html>
"""

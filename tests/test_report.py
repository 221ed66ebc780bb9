"""The HTML report on a synthetic workdir, and on an empty one."""

import base64
import io
import json
import os
import re

import numpy as np
from PIL import Image

from jaxattr import config as config_lib, data, report, utils
from jaxattr.counterfactual import bisection, support

NUM_CLASSES = 4
TOP_K = 16


def _dataset(n, split, seed, labels):
  rng = np.random.default_rng(seed)
  return data.Dataset(images=rng.integers(0, 255, (n, 16, 16, 3), dtype=np.uint8),
                      labels=labels.astype(np.int32), class_names=["cat", "dog", "ship", "frog"],
                      index=np.arange(n, dtype=np.int64) * 2, source="synthetic", split=split)


def read(path):
  with open(path) as f:
    return f.read()


def make_workdir(wd, k=32):
  """Attribution files of two methods, their support via the search, and timings."""
  # Target labels 1..3 and flip classes label % 3 + 1: the predictor below flips a target once
  # sizes[m] >= its theta, removal and mislabel alike.
  train = _dataset(300, "train", 0, np.zeros(300))
  test = _dataset(40, "test", 1, np.random.default_rng(1).integers(1, NUM_CLASSES, 40))
  targets = test.index[[1, 5, 9, 20, 33]]
  rng = np.random.default_rng(2)
  for method in ("esvm", "l2"):
    base = os.path.join(wd, "attribution", method)
    os.makedirs(base)
    topk = np.stack([rng.permutation(train.index)[:k] for _ in targets]).astype(np.int64)
    np.save(os.path.join(base, "topk.npy"), topk)
    np.save(os.path.join(base, "scores.npy"),
            np.sort(rng.normal(size=topk.shape).astype(np.float32), 1)[:, ::-1])
    np.save(os.path.join(base, "targets.npy"), targets)
  theta = dict(zip(targets.tolist(), [3, 9, 20, 1000, 30]))  # 1000 > k: never flips

  def predictor(seeds, prefixes, sizes, flip, eval_positions):
    out = []
    for m, pos in enumerate(eval_positions):
      true = test.labels[pos]
      out.append(true if sizes[m] < theta[int(test.index[pos])] else (true + 1) % NUM_CLASSES)
    return np.array(out)

  config = config_lib.base_config()
  config.data.source = "synthetic"
  config.support.update({"k": k, "search_budget": 3, "num_tests": 3, "methods": "esvm,l2"})
  # Hand-written top-k files stand for an attribution stage: no ownership record to check.
  require, support.require_attribution = support.require_attribution, lambda *a: None
  try:
    support.run(config, wd, train=train, test=test, predictor=predictor,
                flip_fn=lambda images, labels: labels % 3 + 1)
  finally:
    support.require_attribution = require
  utils.save_json(os.path.join(wd, "timings.json"), {
      "features": 12.5,
      "attribution": 3.25,
      "support": 400.0
  })
  return config, train, test, targets


def test_report_contains_tables_images_curves_and_timings(tmp_path):
  wd = str(tmp_path)
  config, train, test, targets = make_workdir(wd)
  path = report.write_report(wd, config, train=train, test=test, num_examples=3)
  assert path == os.path.join(wd, "report.html")
  page = read(path)
  # Timings table with every stage and the total.
  for stage in ("features", "attribution", "support", "total"):
    assert f"<td>{stage}</td>" in page or f"<b>{stage}</b>" in page
  assert "6.7 min" in page and "12.5 s" in page
  # One summary table per metric with both methods, their medians and flip fractions.
  for metric in bisection.METRICS:
    assert f"<h3>{metric} support</h3>" in page
    with open(f"{wd}/support/{metric}/esvm/summary.json") as f:
      summary = json.load(f)
    assert summary["median_support"] == 20
  assert page.count("<td>esvm</td>") == 2 and page.count("<td>l2</td>") == 2
  assert "<td>20</td>" in page and "&le;10" in page
  # Both methods and metrics share each round's trainer call: its time is marked shared, not
  # presented as each row's own, and the note gives the largest call (4 searches' models).
  assert page.count(", shared</td>") == 4
  rounds = summary["rounds"]
  assert all(r["call_models"] == 4 * r["models"] for r in rounds)
  assert f"up to {max(r['call_models'] for r in rounds)} models a call" in page
  assert "do not add up" in page
  # Curves embedded as images, one per metric.
  assert len(re.findall(r"class='curve'[^>]*src='data:image/png;base64,", page)) == 2
  # Per method 3 targets, each with its image and top-16 with scores, plus the flipping prefix:
  # supports are 4, 12 and 20 on the 32 / 2**3 grid.
  for method in ("esvm", "l2"):
    assert f"<h3>{method}</h3>" in page
  scores = np.load(f"{wd}/attribution/esvm/scores.npy")
  assert f"#1 {scores[0, 0]:.3g}" in page and f"#16 {scores[2, 15]:.3g}" in page
  assert page.count("<figure class='target'>") == 2 * 3
  assert page.count("class='same'>") + page.count("class='other'>") == 2 * 3 * 16
  assert "removal support 4: removing these 4 images" in page
  assert "removal support 20:" in page
  assert "Search: k = 32, 3 models per evaluation, search budget 3." in page
  # Mislabel supports equal the removal ones here; flip class of a label-l target is l % 3 + 1.
  label = int(test.labels[test.index == targets[0]][0])
  name = ["cat", "dog", "ship", "frog"][label % 3 + 1]
  assert f"mislabel support 4: relabelling its top 4 to class {name} flipped it" in page
  assert page.count("<figure class='small'>") == 2 * (4 + 12 + 20)
  # Config and versions.
  assert "search_budget" in page and "git_revision" in page and "jax" in page
  # Self-contained: every image is embedded.
  assert "src='data:image/png;base64," in page and "src='/" not in page
  # A search whose calls trained only its own models (one method, one metric) owns its time.
  for metric in bisection.METRICS:
    for method in ("esvm", "l2"):
      p = f"{wd}/support/{metric}/{method}/summary.json"
      with open(p) as f:
        s = json.load(f)
      for r in s["rounds"]:
        r["call_models"] = r["models"]
      utils.save_json(p, s)
  page = read(report.write_report(wd, config, train=train, test=test, num_examples=1))
  assert ", shared</td>" not in page and "do not add up" not in page
  assert page.count("<td>4 / ") == 4


def test_report_per_target_support_lines_name_the_searches_k(tmp_path):
  # The searches' k (32) is below the listed top-k (40 here): an unflipped target's lines give
  # the searches' k, not the listing's width; one image reads as one; a target measured for one
  # metric only says so for the other.
  wd = str(tmp_path)
  config, train, test, targets = make_workdir(wd)
  for method in ("esvm", "l2"):
    path = f"{wd}/attribution/{method}/topk.npy"
    topk = np.load(path)
    extra = np.stack([np.setdiff1d(train.index, row)[:8] for row in topk])
    np.save(path, np.concatenate([topk, extra], 1))
    np.save(f"{wd}/attribution/{method}/scores.npy", np.zeros((len(targets), 40), np.float32))
  removal = f"{wd}/support/removal/esvm/results.jsonl"
  rows = [json.loads(line) for line in read(removal).splitlines()]
  for r in rows:
    if r["target"] == int(targets[1]):
      r["support"] = 1
  with open(removal, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  mislabel = f"{wd}/support/mislabel/esvm/results.jsonl"
  rows = [json.loads(line) for line in read(mislabel).splitlines()]
  with open(mislabel, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows if r["target"] != int(targets[0]))
  for metric in bisection.METRICS:  # l2's last target searched for neither metric
    path = f"{wd}/support/{metric}/l2/results.jsonl"
    rows = [json.loads(line) for line in read(path).splitlines()]
    with open(path, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows if r["target"] != int(targets[4]))
  for metric in bisection.METRICS:
    for method in ("esvm", "l2"):
      path = f"{wd}/support/{metric}/{method}/summary.json"
      summary = json.loads(read(path))
      utils.save_json(path, {**summary, "num_tests": 1})
  page = read(report.write_report(wd, config, train=train, test=test, num_examples=5))
  assert "Search: k = 32, 1 model per evaluation, search budget 3." in page
  # targets[3] never flips: both metrics, both methods.
  assert page.count("removal support &gt;32: not flipped within k (its top 32 removed).") == 2
  assert page.count("mislabel support &gt;32: not flipped by relabelling its top 32 to class") == 2
  assert "top 40" not in page and "support -1" not in page
  assert "removal support 1: removing this image flipped target" in page
  assert page.count("'note'>mislabel support: not measured for this target.") == 1
  assert page.count("'note'>removal and mislabel support: not measured for this target.") == 1
  assert page.count("'note'>removal support: not measured") == 0


def test_report_without_results_says_what_is_missing(tmp_path):
  path = report.write_report(str(tmp_path))
  page = read(path)
  assert "No timings.json yet" in page
  assert "No support results yet" in page
  assert "No attribution results yet" in page
  assert "No config given" in page
  assert "Unreadable images" not in page


def test_report_names_the_images_skipped_as_unreadable(tmp_path):
  wd = str(tmp_path)
  utils.save_json(f"{wd}/features/summary.json", {
      "train": {
          "unreadable_skipped": 2
      },
      "test": {
          "unreadable_skipped": 0
      }
  })
  utils.save_json(f"{wd}/resident/summary.json", {"train": {"unreadable": 1}, "test": {}})
  page = read(report.write_report(wd))
  assert "<h2>Unreadable images</h2>" in page
  assert "2 train images (features), 1 train image (prepare). They are never attributed" in page


def test_report_of_a_config_without_support_says_so(tmp_path):
  # configs/imagenet.py measures no support (support.metrics ''): not "run the support stage".
  page = read(report.write_report(str(tmp_path), config={"support": {"metrics": ""}}))
  assert "measures no counterfactual support" in page
  assert "No support results yet" not in page


def test_report_with_support_in_progress_and_no_images(tmp_path):
  wd = str(tmp_path)
  make_workdir(wd)
  # Another method is still running: only its state exists.
  os.makedirs(f"{wd}/support/removal/trak")
  utils.save_json(f"{wd}/support/removal/trak/state.json", {"next_round": 2})
  page = read(report.write_report(wd, {"data": {"source": ""}}))
  assert "<td>trak</td><td><i>in progress</i></td>" in page
  assert "Images unavailable" in page
  assert "<td>esvm</td>" in page


def test_report_from_config_json_loads_images_with_the_data_options(tmp_path):
  """A report rendered from WORKDIR/config.json loads the data as the run did, options included.
  """
  train, test = data.load("digits", "train", size=8), data.load("digits", "test", size=8)
  base = tmp_path / "attribution" / "l2"
  os.makedirs(base)
  np.save(base / "topk.npy", np.tile(train.index[:TOP_K], (2, 1)))
  np.save(base / "targets.npy", test.index[:2])
  config = config_lib.base_config()
  config.data.options.size = 8
  utils.save_json(str(tmp_path / "config.json"), config.to_dict())
  page = read(report.write_report(str(tmp_path), num_examples=2))
  assert "Images unavailable" not in page
  uris = re.findall(r"<figure class='target'><img src='data:image/png;base64,([^']+)'", page)
  # 8x8 digits are upscaled 7x to 56 pixels; without data.options (32x32 digits) they were 64.
  sizes = [Image.open(io.BytesIO(base64.b64decode(u))).size for u in uris]
  assert sizes == [(56, 56)] * 2


def test_report_lds_section_explains_the_class_floor_and_counts(tmp_path):
  wd = str(tmp_path)
  config, train, test, _ = make_workdir(wd)

  def lds_summary(methods, models_per_subset, training):
    utils.save_json(
        os.path.join(wd, "lds", "summary.json"), {
            "targets": 12,
            "subsets": 4,
            "alpha": 0.5,
            "models_per_subset": models_per_subset,
            "methods": {
                m: {
                    "lds": 0.1 * (i + 1),
                    "ci95": [0.05 * (i + 1), 0.15 * (i + 1)],
                    "targets_scored": 12
                } for i, m in enumerate(methods)
            },
            "training": training
        })
    return read(report.write_report(wd, config, train=train, test=test, num_examples=1))

  page = lds_summary(("esvm", "class"), 1, {"models": 4, "trainer_calls": 1, "wave": 4})
  assert "<td>class</td>" in page and "<td>0.200</td>" in page and "0.100 to 0.300" in page
  assert "(1 model each)" in page and "4 models, 1 trainer call in this run" in page
  assert "'class' scores 1 for every image of the target's class" in page
  page = lds_summary(("esvm", "trak"), 2, {"models": 8, "trainer_calls": 2, "wave": 4})
  assert "(2 models each)" in page and "8 models, 2 trainer calls in this run" in page
  assert "'class' scores" not in page and "model(s)" not in page and "call(s)" not in page

"""The HTML report on a synthetic workdir, and on an empty one."""

import json
import os
import re

import ml_collections
import numpy as np

from jaxattr import data
from jaxattr import report
from jaxattr import utils
from jaxattr.counterfactual import search

NUM_CLASSES = 4


def _dataset(n, split, seed, labels):
  rng = np.random.default_rng(seed)
  return data.Dataset(
      images=rng.integers(0, 255, (n, 16, 16, 3), dtype=np.uint8),
      labels=labels.astype(np.int32),
      class_names=["cat", "dog", "ship", "frog"], index=np.arange(n, dtype=np.int64) * 2,
      source="synthetic", split=split)


def make_workdir(wd, k=32):
  """Attribution files of two methods, their support via the search, and timings."""
  # Train labels 0, target labels 1..3 and flip classes label % 3 + 1 (never 0): relabelling
  # changes every prefix image, so the fake trainer below can count them.
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

  def predictor(seeds, keep, labels, eval_positions):
    out = []
    for m, pos in enumerate(eval_positions):
      changed = int((~keep[m]).sum() + (labels[m] != train.labels).sum())
      true = test.labels[pos]
      out.append(true if changed < theta[int(test.index[pos])] else (true + 1) % NUM_CLASSES)
    return np.array(out)

  support = search.default_config()
  support.update(dict(k=k, search_budget=3, num_tests=3, methods=("esvm", "l2")))
  config = ml_collections.ConfigDict({"data": {"source": "synthetic"}, "support": support})
  search.run(config, wd, train=train, test=test, predictor=predictor,
             flip_fn=lambda images, labels: labels % 3 + 1)
  utils.save_json(os.path.join(wd, "timings.json"),
                  {"features": 12.5, "attribution": 3.25, "support": 400.0})
  return config, train, test, targets


def test_report_contains_tables_images_curves_and_timings(tmp_path):
  wd = str(tmp_path)
  config, train, test, targets = make_workdir(wd)
  path = report.write_report(wd, config, train=train, test=test, num_examples=3)
  assert path == os.path.join(wd, "report.html")
  page = open(path).read()
  # Timings table with every stage and the total.
  for stage in ("features", "attribution", "support", "total"):
    assert f"<td>{stage}</td>" in page or f"<b>{stage}</b>" in page
  assert "6.7 min" in page and "12.5 s" in page
  # One summary table per metric with both methods, their medians and flip fractions.
  for metric in search.METRICS:
    assert f"<h3>{metric} support</h3>" in page
    summary = json.load(open(f"{wd}/support/{metric}/esvm/summary.json"))
    assert summary["median_support"] == 20
  assert page.count("<td>esvm</td>") == 2 and page.count("<td>l2</td>") == 2
  assert "<td>20</td>" in page and "&le;10" in page
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
  # Mislabel supports equal the removal ones here; flip class of a label-l target is l % 3 + 1.
  label = int(test.labels[test.index == targets[0]][0])
  name = ["cat", "dog", "ship", "frog"][label % 3 + 1]
  assert f"mislabel support 4: relabelling its top 4 to class {name} flipped it" in page
  assert page.count("<figure class='small'>") == 2 * (4 + 12 + 20)
  # Config and versions.
  assert "search_budget" in page and "git_revision" in page and "jax" in page
  # Self-contained: every image is embedded.
  assert "src='data:image/png;base64," in page and "src='/" not in page


def test_report_without_results_says_what_is_missing(tmp_path):
  path = report.write_report(str(tmp_path))
  page = open(path).read()
  assert "No timings.json yet" in page
  assert "No support results yet" in page
  assert "No attribution results yet" in page
  assert "No config given" in page


def test_report_with_support_in_progress_and_no_images(tmp_path):
  wd = str(tmp_path)
  make_workdir(wd)
  # Another method is still running: only its state exists.
  os.makedirs(f"{wd}/support/removal/trak")
  utils.save_json(f"{wd}/support/removal/trak/state.json", {"next_round": 2})
  page = open(report.write_report(wd, {"data": {"source": ""}})).read()
  assert "<td>trak</td><td><i>in progress</i></td>" in page
  assert "Images unavailable" in page
  assert "<td>esvm</td>" in page

"""Bad-input probe: runs the launchers on bad values, changed configs and changed data, and
tells for each case whether it gave a correct result, a clear early error, or something worse.

  python3 -m benchmarks.probe_bad_input --out bench_results/probe_after.json
  python3 -m benchmarks.probe_bad_input --checkout /tmp/before --out bench_results/probe_before.json

`--checkout` runs another checkout's launchers (an older commit, `git worktree add`), so the
same cases can be compared before and after a change. Each case starts from a copy of one
finished `configs/digits.py:quick` workdir or from an empty one, and is classified as

  correct   exit 0 and the result is right (the case's own check);
  silent    exit 0 but the result is wrong (a bad value reinterpreted, foreign outputs reused);
  clear     exit != 0 with one `error:`/usage line naming the problem, no traceback, and no
            stage work before it (no pretrain checkpoint in an empty workdir);
  off-target  a clear error, but about another problem than the case's own (`EXPECT`): the run
            stopped before reaching the check the case is for;
  late      exit != 0 after stage work was done;
  unclear   exit != 0 with a traceback or without a line naming the problem.

Prints a table and writes JSON (case, kind, rc, seconds, outcome, last line).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import Any, Callable

import numpy as np
from absl import app, flags

_CHECKOUT = flags.DEFINE_string("checkout", None, "Checkout whose launchers run (default: this).")
_OUT = flags.DEFINE_string("out", "bench_results/probe_bad_input.json", "JSON output path.")
_ONLY = flags.DEFINE_list("only", [], "Run only these case names.")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Probe:
  """Runs launchers of one checkout in scratch workdirs under one temporary root."""

  def __init__(self, checkout: str, root: str):
    self.checkout, self.root = checkout, root
    self.env = dict(os.environ, PYTHONPATH=checkout, JAXATTR_COMPILATION_CACHE=os.path.join(
        root, "jax_cache"))
    self.base = os.path.join(root, "base")
    self.n = 0
    self.copies: set[str] = set()  # workdirs that start with the base run's outputs
    self.library: set[str] = set()  # workdirs of library calls (no launcher)

  def run(self, launcher: str, workdir: str, *args: str, config: str = "configs/digits.py:quick",
          timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, f"launch/{launcher}.py", f"--config={config}", f"--workdir={workdir}", *args
    ]
    return subprocess.run(cmd, cwd=self.checkout, env=self.env, capture_output=True, text=True,
                          timeout=timeout, check=False)

  def python(self, code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=self.checkout, env=self.env,
                          capture_output=True, text=True, timeout=600, check=False)

  def fresh(self, copy: bool = False) -> str:
    self.n += 1
    path = os.path.join(self.root, f"w{self.n}")
    if copy:
      shutil.copytree(self.base, path, ignore=shutil.ignore_patterns(".lock"))
      self.copies.add(path)
    return path


def _npz(path: str, *, images=None, labels=None, classes: int = 2) -> str:
  rng = np.random.default_rng(0)
  # 70 training images a class: the quick config's ensemble batch (64) fits after support.k=32
  # and in LDS's half-size subsets of two classes.
  n_train, n_test = 70 * classes, 10 * classes
  x = {
      "x_train": rng.random((n_train, 16, 16, 3)).astype(np.float32),
      "x_test": rng.random((n_test, 16, 16, 3)).astype(np.float32)
  }
  y = {"y_train": np.arange(n_train) % classes, "y_test": np.arange(n_test) % classes}
  if images is not None:
    images(x["x_train"])
  if labels is not None:
    y["y_train"] = labels(y["y_train"])
  np.savez(path, **x, **y)
  return path


def _folder(root: str, value: int = 0) -> str:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  # 70 training images a class: the quick config's ensemble batch (64) fits after support.k=32
  # and in LDS's half-size subsets.
  for split, n in (("train", 70), ("test", 10)):
    for cls in ("a", "b"):
      os.makedirs(os.path.join(root, split, cls), exist_ok=True)
      for i in range(n):
        img = np.random.default_rng(i + 100 * (cls == "b") + value).integers(0, 256, (16, 16, 3))
        Image.fromarray(img.astype(np.uint8)).save(os.path.join(root, split, cls, f"{i}.png"))
  return root


def _summary_targets(wd: str) -> Any:
  with open(os.path.join(wd, "summary.json")) as f:
    return json.load(f)["support"]["removal"]["esvm"]["targets"]


def _cases(
    p: Probe) -> list[tuple[str, str, Callable[[], tuple[subprocess.CompletedProcess, str, bool]]]]:
  """(name, kind: S = silently wrong before / L = late or unclear before, fn) ->
  fn() = (the last process, its workdir, whether an exit-0 result is right)."""
  data = os.path.join(p.root, "data")
  os.makedirs(data, exist_ok=True)

  def pipeline(*args, copy=False, config="configs/digits.py:quick", right=True):

    def fn():
      wd = p.fresh(copy)
      return p.run("pipeline", wd, *args, config=config), wd, right

    return fn

  def seed_resumes():
    wd = p.fresh(copy=True)
    out = p.run("pipeline", wd, "--config.seed=1")
    # Right only if the seed-1 encoder differs from the seed-0 one.
    a = open(os.path.join(p.base, "pretrain/encoder/meta.json")).read()
    b = open(os.path.join(wd, "pretrain/encoder/meta.json")).read() if out.returncode == 0 else a
    return out, wd, json.loads(a).get("fingerprint") != json.loads(b).get("fingerprint")

  def lr_resumes():
    wd = p.fresh(copy=True)
    out = p.run("pipeline", wd, "--config.pretrain.base_lr=0.1")
    return out, wd, "resumed from step" not in out.stderr

  def two_runs_one_workdir():
    wd = p.fresh(copy=True)
    cmd = lambda c: [  # noqa: E731
        sys.executable, "launch/attribute.py", "--config=configs/digits.py:quick",
        f"--workdir={wd}", "--config.attribution.targets=all", f"--config.attribution.C={c}"
    ]
    a = subprocess.Popen(cmd(0.1), cwd=p.checkout, env=p.env, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    b = subprocess.run(cmd(0.2), cwd=p.checkout, env=p.env, capture_output=True, text=True,
                       check=False)
    a.communicate()
    return b, wd, False  # both finishing into one workdir is never right

  def support_then_pipeline():
    wd = p.fresh(copy=True)
    p.run("support", wd, "--config.support.num_targets=1")
    out = p.run("pipeline", wd)
    return out, wd, out.returncode == 0 and _summary_targets(wd) == 2

  def changed_images():
    root = _folder(os.path.join(data, "folder_changed"))
    wd = p.fresh()
    src = f"--config.data.source=folder:{root}"
    first = p.run("pipeline", wd, src)
    if first.returncode:
      return first, wd, False
    p.copies.add(wd)  # its outputs exist before the probed run
    _folder(root, value=7)  # same names, other pixels
    out = p.run("pipeline", wd, src)
    return out, wd, "up to date" not in out.stderr.split("stage pretrain")[-1][:200]

  def library(code):

    def fn():
      out = p.python(code)
      wd = p.fresh()
      p.library.add(wd)
      return out, wd, "GARBAGE" not in out.stdout

    return fn

  def architecture_change():
    wd = p.fresh(copy=True)
    return p.run("pipeline", wd, "--config.encoder.width=0.25"), wd, False

  def support_file(make):
    """The support launcher on a copy of the base run, with a file `make(base targets)` wrote."""

    def fn():
      wd = p.fresh(copy=True)
      ids = np.load(os.path.join(p.base, "attribution", "esvm", "target_index.npy"))[:2]
      return p.run("support", wd, *make(ids)), wd, False

    return fn

  def fractional_topk(ids):
    path = os.path.join(data, "topk_frac.npy")
    rows = np.zeros((359, 32))
    rows[ids] = np.arange(32) + 0.5  # truncated: the training index values 0..31
    np.save(path, rows)
    return (f"--config.support.methods=ref={path}",
            f"--config.support.targets={','.join(map(str, ids))}")

  def fractional_targets(ids):
    path = os.path.join(data, "targets_frac.npy")
    np.save(path, ids + 0.25)  # truncated: the base run's own targets
    return (f"--config.support.targets={path}",)

  scores = os.path.join(data, "scores_shape.npy")
  np.save(scores, np.zeros((20, 100), np.float32))  # [LDS targets, 100]: not the 1,438 images
  broken_config = os.path.join(data, "broken_config.py")
  with open(broken_config, "w") as f:
    f.write("def get_config(:\n  pass\n")
  text_scores = os.path.join(data, "scores_text.npy")
  with open(text_scores, "w") as f:
    f.write("0.1,0.2\n")
  nan = _npz(os.path.join(data, "nan.npz"), images=lambda x: x.__setitem__((0, 0, 0, 0), np.nan))
  inf = _npz(os.path.join(data, "inf.npz"), images=lambda x: x.__setitem__((0, 0, 0, 0), np.inf))
  frac = _npz(os.path.join(data, "frac.npz"), labels=lambda y: y + 0.5 * (np.arange(len(y)) == 3))
  one_class = _npz(os.path.join(data, "one.npz"), classes=1)
  bad_label = _npz(os.path.join(data, "label.npz"), labels=lambda y: np.where(y == 1, 5, y))
  good = _folder(os.path.join(data, "folder_tar"))
  tgz = os.path.join(data, "cut.tar.gz")
  with tarfile.open(tgz, "w:gz") as t:
    t.add(good, arcname="d")
  blob = open(tgz, "rb").read()
  open(tgz, "wb").write(blob[:len(blob) // 2])

  esvm_1d = ("import numpy as np; from jaxattr.attribute import esvm; "
             "s = np.asarray(esvm.esvm_scores(np.ones((2, 4), np.float32), np.arange(6, dtype="
             "np.float32))); print('GARBAGE' if np.ptp(s) == 0 else 'ok')")
  big_c = ("import numpy as np; from jaxattr import attribute; from jaxattr.attribute.options "
           "import SolverOptions; r = np.random.default_rng(0); x = r.normal(size=(60, 8))"
           ".astype(np.float32) * 1e3; y = np.arange(60) % 2; "
           "t = attribute.topk(x, y, x[:4], y[:4], k=5, options=SolverOptions(C=1e12)); "
           "print('GARBAGE' if not np.isfinite(t.scores).all() else 'ok')")
  return [
      ("seed change resumes the old MoCo run", "S", seed_resumes),
      ("base_lr change resumes the old MoCo run", "S", lr_resumes),
      ("two attribute runs into one workdir", "S", two_runs_one_workdir),
      ("support launcher's outputs taken as the pipeline's", "S", support_then_pipeline),
      ("changed images under the same folder path", "S", changed_images),
      ("NaN pixel in npz float images", "S", pipeline(f"--config.data.source=npz:{nan}",
                                                      right=False)),
      ("inf pixel in npz float images", "S", pipeline(f"--config.data.source=npz:{inf}",
                                                      right=False)),
      ("fractional npz labels", "S", pipeline(f"--config.data.source=npz:{frac}", right=False)),
      ("pretrain.epochs=-1", "S", pipeline("--config.pretrain.epochs=-1", right=False)),
      ("pretrain.batch_size=-8", "S", pipeline("--config.pretrain.batch_size=-8", right=False)),
      ("support.num_targets=-14", "S", pipeline("--config.support.num_targets=-14", right=False)),
      ("data.options.limit_per_class=-1", "S",
       pipeline("--config.data.options.limit_per_class=-1", right=False)),
      ("support.num_targets above the targets", "S",
       pipeline("--config.support.num_targets=50", right=False)),
      ("esvm_scores with 1-D candidates", "S", library(esvm_1d)),
      ("topk with C=1e12", "S", library(big_c)),
      ("attribution.num_targets=1000 (> test split)", "L",
       pipeline("--config.attribution.num_targets=1000")),
      ("support.num_tests=0", "L", pipeline("--config.support.num_tests=0")),
      ("support.search_budget=-1", "L", pipeline("--config.support.search_budget=-1")),
      ("support.metrics=bogus", "L", pipeline("--config.support.metrics=bogus")),
      ("features.batch_size=0", "L", pipeline("--config.features.batch_size=0")),
      ("ensemble.batch_size=2000 (> train)", "L", pipeline("--config.ensemble.batch_size=2000")),
      ("one-class dataset", "L", pipeline(f"--config.data.source=npz:{one_class}")),
      ("attribution.k=0", "L", pipeline("--config.attribution.k=0", "--config.support.k=0")),
      ("attribution.chunk_size=0", "L", pipeline("--config.attribution.chunk_size=0")),
      ("pretrain.memory_bank_size=0", "L", pipeline("--config.pretrain.memory_bank_size=0")),
      ("ensemble.epochs=0", "L", pipeline("--config.ensemble.epochs=0")),
      ("viz.top=-1", "S", pipeline("--config.viz.top=-1", right=False)),
      ("data.options.size=0", "L", pipeline("--config.data.options.size=0")),
      ("truncated .tar.gz", "L", pipeline(f"--config.data.source=folder:{tgz}")),
      ("npz label outside the classes", "L", pipeline(f"--config.data.source=npz:{bad_label}")),
      ("architecture change on resume", "L", architecture_change),
      # 2026-12-02 (the #19 and #18 surfaces):
      ("LDS score file of the wrong shape", "L", pipeline(f"--config.lds.methods=esvm,ext={scores}")
      ),
      ("LDS score file that is text", "L",
       pipeline(f"--config.lds.methods=esvm,ext={text_scores}")),
      ("support top-k file with fractional values", "S", support_file(fractional_topk)),
      ("support.targets .npy with fractional values", "S", support_file(fractional_targets)),
      ("misspelt config field", "L", pipeline("--config.pretrain.epoch=3")),
      ("trak.proj_dim above the training images", "L", pipeline("--config.trak.proj_dim=2000")),
      # 2026-12-03 (config files that fail to build):
      ("config file with a syntax error", "L", pipeline(config=broken_config)),
      ("unknown config variant", "L", pipeline(config="configs/digits.py:nosuch")),
  ]


# What a case's error must name to count as clear (else it is `off-target`: the run stopped on
# another problem first, so the case no longer probes its own check).
EXPECT = {
    "seed change resumes the old MoCo run": "seed",
    "base_lr change resumes the old MoCo run": "base_lr",
    "two attribute runs into one workdir": "in use",
    "changed images under the same folder path": "files changed",
    "NaN pixel in npz float images": "non-finite",
    "inf pixel in npz float images": "non-finite",
    "fractional npz labels": "fractional",
    "pretrain.epochs=-1": "pretrain.epochs",
    "pretrain.batch_size=-8": "pretrain.batch_size",
    "support.num_targets=-14": "support.num_targets",
    "data.options.limit_per_class=-1": "limit_per_class",
    "support.num_targets above the targets": "support.num_targets",
    "esvm_scores with 1-D candidates": "candidates",
    "topk with C=1e12": "non-finite",
    "attribution.num_targets=1000 (> test split)": "attribution.num_targets",
    "support.num_tests=0": "support.num_tests",
    "support.search_budget=-1": "support.search_budget",
    "support.metrics=bogus": "bogus",
    "features.batch_size=0": "features.batch_size",
    "ensemble.batch_size=2000 (> train)": "ensemble.batch_size",
    "one-class dataset": "training images",
    "attribution.k=0": "k=0",
    "attribution.chunk_size=0": "attribution.chunk_size",
    "pretrain.memory_bank_size=0": "pretrain.memory_bank_size",
    "ensemble.epochs=0": "ensemble.epochs",
    "viz.top=-1": "viz.top",
    "data.options.size=0": "data.options.size",
    "truncated .tar.gz": "truncated",
    "npz label outside the classes": "no training images",
    "architecture change on resume": "encoder.width",
    "LDS score file of the wrong shape": "shape",
    "LDS score file that is text": "not a numpy file",
    "support top-k file with fractional values": "whole-number",
    "support.targets .npy with fractional values": "whole-number",
    "misspelt config field": "pretrain.epoch",
    "trak.proj_dim above the training images": "trak.proj_dim",
    "config file with a syntax error": "SyntaxError",
    "unknown config variant": "nosuch",
}


def classify(p: Probe, out: subprocess.CompletedProcess, wd: str, right: bool) -> str:
  if out.returncode == 0:
    return "correct" if right else "silent"
  err = out.stderr.strip()
  last = err.splitlines()[-1] if err else ""
  if wd in p.library:  # a library call raises: clear when its exception is jaxattr's own
    return "clear" if "jaxattr." in last and "Error: " in last else "unclear"
  # A config error lists its problems on the lines after `error: invalid config (...)`.
  one = ("error:" in err or "FATAL Flags parsing error" in err) and "Traceback" not in err
  ckpt = os.path.join(wd, "pretrain", "checkpoints")
  worked = wd not in p.copies and os.path.isdir(ckpt) and os.listdir(ckpt)
  if not one or not last:
    return "unclear"
  return "late" if worked else "clear"


def main(argv):
  del argv
  checkout = os.path.abspath(_CHECKOUT.value or REPO)
  root = tempfile.mkdtemp(prefix="probe_")
  p = Probe(checkout, root)
  t0 = time.perf_counter()
  base = p.run("pipeline", p.base)
  if base.returncode:
    raise SystemExit(f"the quick pipeline failed in {checkout}:\n{base.stderr[-3000:]}")
  print(f"base workdir in {time.perf_counter() - t0:.0f} s ({checkout})", flush=True)
  rows = []
  cases = _cases(p)
  stale = set(EXPECT) - {name for name, _, _ in cases}
  if stale:  # a renamed case would otherwise lose its check silently
    raise SystemExit(f"EXPECT names cases that do not exist: {sorted(stale)}")
  for name, kind, fn in cases:
    if _ONLY.value and name not in _ONLY.value:
      continue
    t0 = time.perf_counter()
    out, wd, right = fn()
    seconds = time.perf_counter() - t0
    outcome = classify(p, out, wd, right)
    if outcome == "clear" and EXPECT.get(name, "") not in out.stderr:
      outcome = "off-target"
    err = out.stderr.strip().splitlines()
    line = next((x for x in reversed(err) if x.startswith(("error:", "  - ", "FATAL"))),
                err[-1] if err else "")
    rows.append({
        "case": name,
        "kind": kind,
        "rc": out.returncode,
        "seconds": round(seconds, 1),
        "outcome": outcome,
        "line": line[:300]
    })
    print(f"{outcome:8s} rc={out.returncode:<3d} {seconds:6.1f}s  {name}: {line[:150]}", flush=True)
  counts: dict[str, int] = {}
  for r in rows:
    counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
  print("\n| case | kind | outcome | rc | s |\n| --- | --- | --- | --- | --- |")
  for r in rows:
    print(f"| {r['case']} | {r['kind']} | {r['outcome']} | {r['rc']} | {r['seconds']} |")
  print(f"\noutcomes: {counts}; load average {os.getloadavg()}")
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump({"checkout": checkout, "rows": rows, "counts": counts}, f, indent=2)
  shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)

"""Kill -9 probe: the main job killed mid-pretraining and mid-support, then rerun, must end with
the same outputs as an uninterrupted run; rerun with another config it must start those stages
afresh (never mix two configs).

  python3 -m benchmarks.probe_kill_resume --out bench_results/probe_kill_resume.json

Runs `configs/digits.py:quick` with more pretraining steps and support rounds than the quick
variant (so that there is time to kill), in scratch workdirs:

  reference     uninterrupted;
  pretrain      SIGKILL after pretraining step 7 (checkpoints every 3 steps), rerun;
  support       SIGKILL after the first support round, rerun;
  changed       SIGKILL after the first support round, rerun with support.seed=1; compared with
                an uninterrupted support.seed=1 run.

Compares the encoder's variables, features, top-k and every support results.jsonl byte for byte
(wall times left out). Prints a table and writes JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

_OUT = flags.DEFINE_string("out", "bench_results/probe_kill_resume.json", "JSON output path.")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ("--config.pretrain.max_steps=12", "--config.pretrain.epochs=20",
        "--config.pretrain.checkpoint_every_steps=3", "--config.support.search_budget=3",
        "--config.support.num_tests=2")


def _cmd(workdir: str, *extra: str) -> list[str]:
  return [
      sys.executable, "launch/pipeline.py", "--config=configs/digits.py:quick",
      f"--workdir={workdir}", *ARGS, *extra
  ]


def _env(root: str) -> dict[str, str]:
  return dict(os.environ, PYTHONPATH=REPO, JAXATTR_COMPILATION_CACHE=os.path.join(root, "cache"))


def run(root: str, workdir: str, *extra: str) -> float:
  t0 = time.perf_counter()
  out = subprocess.run(_cmd(workdir, *extra), cwd=REPO, env=_env(root), capture_output=True,
                       text=True, check=False)
  if out.returncode:
    raise SystemExit(f"run into {workdir} failed:\n{out.stderr[-3000:]}")
  return time.perf_counter() - t0


def kill_at(root: str, workdir: str, marker: str, *extra: str) -> str:
  """Starts the job, SIGKILLs it when `marker` appears in its log; returns the log."""
  os.makedirs(workdir, exist_ok=True)
  log = os.path.join(workdir, "..", os.path.basename(workdir) + ".log")
  with open(log, "w") as f:
    proc = subprocess.Popen(_cmd(workdir, *extra), cwd=REPO, env=_env(root), stdout=f, stderr=f)
  deadline = time.monotonic() + 600
  while marker not in open(log).read():
    if proc.poll() is not None or time.monotonic() > deadline:
      proc.kill()
      raise SystemExit(f"no {marker!r} before the run ended:\n{open(log).read()[-3000:]}")
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  return open(log).read()


def outputs(workdir: str) -> dict[str, bytes]:
  """The results to compare: encoder variables, features, top-k, support rows."""
  import jax  # pylint: disable=g-import-not-at-top

  from jaxattr import checkpoint  # pylint: disable=g-import-not-at-top

  variables, _ = checkpoint.load_variables(os.path.join(workdir, "pretrain", "encoder"))
  leaves = jax.tree_util.tree_leaves(variables)
  out = {"encoder": b"".join(np.asarray(x).tobytes() for x in leaves)}
  for split in ("train", "test"):
    with np.load(os.path.join(workdir, "features", f"{split}.npz")) as z:
      out[f"features/{split}"] = z["features"].tobytes()
  for method in ("esvm", "l2"):
    out[f"topk/{method}"] = np.load(os.path.join(workdir, "attribution", method,
                                                 "topk.npy")).tobytes()
    for metric in ("removal", "mislabel"):
      path = os.path.join(workdir, "support", metric, method, "results.jsonl")
      rows = [json.loads(line) for line in open(path)]
      for r in rows:
        r.pop("seconds", None)
      out[f"support/{metric}/{method}"] = json.dumps(rows, sort_keys=True).encode()
  return out


def compare(a: dict[str, bytes], b: dict[str, bytes]) -> list[str]:
  return [k for k in a if a[k] != b.get(k)]


def main(argv):
  del argv
  root = tempfile.mkdtemp(prefix="kill_")
  rows = []
  ref = os.path.join(root, "reference")
  seconds = run(root, ref)
  reference = outputs(ref)
  print(f"reference: {seconds:.0f} s", flush=True)

  for name, marker, extra in (("pretrain", "pretrain: step 7/", ()), ("support", "support round 1/",
                                                                      ())):
    wd = os.path.join(root, name)
    log = kill_at(root, wd, marker, *extra)
    ckpts = sorted(os.listdir(os.path.join(wd, "pretrain", "checkpoints")))
    seconds = run(root, wd, *extra)
    resumed_log = open(os.path.join(wd, "error.log")).read() if os.path.exists(
        os.path.join(wd, "error.log")) else ""
    differ = compare(reference, outputs(wd))
    rows.append({
        "case": f"SIGKILL at '{marker}', rerun",
        "checkpoints_at_kill": ckpts,
        "rerun_seconds": round(seconds, 1),
        "differing_outputs": differ,
        "identical": not differ,
        "killed_log_tail": log.strip().splitlines()[-1][:200],
        "error_log": resumed_log[:200]
    })
    print(rows[-1], flush=True)

  # Across a config change: the killed support rounds of seed 0 are not reused for seed 1.
  ref1 = os.path.join(root, "reference_seed1")
  shutil.copytree(ref, ref1)
  run(root, ref1, "--config.support.seed=1")
  wd = os.path.join(root, "changed")
  kill_at(root, wd, "support round 1/")
  t0 = time.perf_counter()
  out = subprocess.run(_cmd(wd, "--config.support.seed=1"), cwd=REPO, env=_env(root),
                       capture_output=True, text=True, check=False)
  differ = compare(outputs(ref1), outputs(wd))
  rows.append({
      "case": "SIGKILL at 'support round 1/', rerun with support.seed=1",
      "rerun_seconds": round(time.perf_counter() - t0, 1),
      "started_over": "starting over" in out.stderr or "resuming at round" not in out.stderr,
      "differing_outputs_vs_uninterrupted_seed1": differ,
      "identical": not differ and out.returncode == 0,
  })
  print(rows[-1], flush=True)
  print("\n| case | identical to uninterrupted |\n| --- | --- |")
  for r in rows:
    print(f"| {r['case']} | {r['identical']} |")
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump({"rows": rows, "load_average": os.getloadavg()}, f, indent=2)
  shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)

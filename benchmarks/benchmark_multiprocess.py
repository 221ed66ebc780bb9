r"""The main job as several processes vs one process with the same devices, side by side.

Runs `launch/pipeline.py` on a config (default: the digits main job) in layouts of P processes x
D CPU devices each (default 2 x 1 against 1 x 2: the same 2 devices, once joined by
`jax.distributed` through localhost and gloo, once in one process), in alternating rounds, each
in a fresh workdir. The first round of each layout starts with an empty compilation cache
('cold': what a first run costs), later rounds reuse it ('warm': a rerun). Per run: wall time
(launch to the last process's exit), the stage times of WORKDIR/timings.json, and the time each
process spent in start-up, barriers, gathers and checkpoints (`jaxattr.distributed.overhead`,
from WORKDIR/summary.json); the table gives the ratio of each multi-process run to the one-process
run of the same round.

  python3 -m benchmarks.benchmark_multiprocess
  python3 -m benchmarks.benchmark_multiprocess --config=configs/digits.py:quick --repeats=1
  python3 -m benchmarks.benchmark_multiprocess --pin   # each process on its own core(s)
  python3 -m benchmarks.benchmark_multiprocess --cold --repeats=3   # 3 first runs

With --launcher=pretrain only the MoCo pretraining runs (`launch/pretrain.py`), and the table
gives images/s from WORKDIR/pretrain/summary.json. --independent then adds, for every
multi-process layout P x D, a control run "P x D independent": the same P processes started
together, each a one-process job of D devices on 1/P of the global batch (what each process of
the joint job computes), with no `jax.distributed` and so no collectives. The control splits the
multi-process overhead into what sharing the machine's cores costs (control vs the first
layout) and what the communication costs (joint vs control):

  python3 -m benchmarks.benchmark_multiprocess --launcher=pretrain --independent \
      --overrides=pretrain.max_steps=66,pretrain.knn_every_epochs=0 --repeats=3
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from absl import app, flags, logging

from benchmarks import bench

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CONFIG = flags.DEFINE_string("config", os.path.join(REPO, "configs", "digits.py"),
                              "Config of the main job (path[:variant]).")
_LAYOUTS = flags.DEFINE_list("layouts", ["1x2", "2x1"],
                             "PROCESSESxDEVICES layouts; the first is the baseline.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Alternating rounds (the first one cold).",
                                lower_bound=1)
_COLD = flags.DEFINE_bool(
    "cold", False, "Start every round with an empty compilation cache (the spread of what a "
    "first run costs), not only the first.")
_OVERRIDES = flags.DEFINE_list("overrides", [], "Extra --config.* flags for every run.")
_OUT = flags.DEFINE_string("out", "bench_results/multiprocess.json", "Result JSON.")
_KEEP = flags.DEFINE_string("keep", "", "Keep the workdirs under this directory (default: none).")
_LAUNCHER = flags.DEFINE_enum(
    "launcher", "pipeline", ["pipeline", "pretrain"],
    "What each run launches: the main job, or only its MoCo pretraining (images/s).")
_INDEPENDENT = flags.DEFINE_bool(
    "independent", False, "With --launcher=pretrain: add a control run per multi-process layout, "
    "its processes as independent one-process jobs on 1/P of the batch each (no collectives).")
_PIN = flags.DEFINE_bool(
    "pin", False, "Give each process of a multi-process layout its own share of the cores "
    "(taskset), as hosts own theirs; XLA:CPU sizes its thread pool by the cores a process may use.")

KINDS = ("start-up", "barriers", "gathers", "checkpoints")
STAGES = ("pretrain", "features", "attribution", "support", "lds")


def _layout(text: str) -> tuple[int, int]:
  try:
    p, d = (int(v) for v in text.lower().split("x"))
  except ValueError:
    p = d = 0
  if p < 1 or d < 1:
    raise app.UsageError(f"--layouts: {text!r} is not PROCESSESxDEVICES (e.g. 2x1)")
  return p, d


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _config_batch() -> int:
  """The global pretraining batch of --config with --overrides."""
  for o in _OVERRIDES.value:
    if o.startswith("pretrain.batch_size="):
      return int(o.split("=", 1)[1])
  path, _, variant = _CONFIG.value.partition(":")
  spec = importlib.util.spec_from_file_location("_benchmarked_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return int((module.get_config(variant) if variant else module.get_config()).pretrain.batch_size)


def _run(processes: int, devices: int, workdir: str, cache: str,
         independent_batch: int | None = None) -> dict:
  # independent_batch: the processes are separate one-process jobs (workdirs WORKDIR.i) on this
  # pretraining batch each (1/P of the job's), started together.
  independent = independent_batch is not None
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices),
             JAXATTR_COMPILATION_CACHE=cache)
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  cmd = [
      sys.executable,
      os.path.join(REPO, "launch", f"{_LAUNCHER.value}.py"), f"--config={_CONFIG.value}",
      *(f"--config.{o}" for o in _OVERRIDES.value)
  ]
  port = _free_port()
  logs = [workdir + f".{i}.log" for i in range(processes)]
  os.makedirs(os.path.dirname(workdir), exist_ok=True)
  t0 = time.perf_counter()
  procs = []
  cores = sorted(os.sched_getaffinity(0))
  for i in range(processes):
    if independent:
      extra = [f"--workdir={workdir}.{i}", f"--config.pretrain.batch_size={independent_batch}"]
    elif processes > 1:
      extra = [
          f"--workdir={workdir}", f"--coordinator_address=localhost:{port}",
          f"--num_processes={processes}", f"--process_id={i}"
      ]
    else:
      extra = [f"--workdir={workdir}"]
    pin = []
    if _PIN.value and processes > 1:
      share = cores[i * len(cores) // processes:(i + 1) * len(cores) // processes] or cores
      pin = ["taskset", "-c", ",".join(map(str, share))]
    with open(logs[i], "w") as log:
      procs.append(subprocess.Popen(pin + cmd + extra, env=env, cwd=REPO, stdout=log, stderr=log))
  codes = [p.wait() for p in procs]
  wall = time.perf_counter() - t0
  if any(codes):
    tails = []
    for path in logs:
      with open(path) as f:
        tails.append(f.read()[-2000:])
    raise RuntimeError(f"layout {processes}x{devices} failed ({codes}):\n" + "\n".join(tails))
  if _LAUNCHER.value == "pretrain":
    pretrain = []
    for w in ([f"{workdir}.{i}" for i in range(processes)] if independent else [workdir]):
      with open(os.path.join(w, "pretrain", "summary.json")) as f:
        pretrain.append(json.load(f))
    # Images of the whole batch per second: the independent processes' sum.
    return {
        "wall_s": wall,
        "images_per_s": sum(p["images_per_s"] for p in pretrain),
        "pretrain_s": max(p["seconds"] for p in pretrain),
        "final_loss": [p["final_loss"] for p in pretrain]
    }
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  return {"wall_s": wall, "summary": summary}


def main(argv):
  del argv
  layouts = [_layout(t) for t in _LAYOUTS.value]
  batch = None
  if _INDEPENDENT.value:
    if _LAUNCHER.value != "pretrain":
      raise app.UsageError("--independent needs --launcher=pretrain (the control splits the "
                           "pretraining batch; the other stages have no such split)")
    batch = _config_batch()
    for p, _ in layouts:
      if batch % p:
        raise app.UsageError(f"--independent: the pretraining batch {batch} does not divide "
                             f"over {p} processes (--layouts)")
  runs_of_round = [(p, d, False) for p, d in layouts]
  if _INDEPENDENT.value:
    runs_of_round += [(p, d, True) for p, d in layouts if p > 1]
  tmp = tempfile.mkdtemp(prefix="bench_multiprocess.")
  load_before = os.getloadavg()
  rows, runs = [], []

  def write(complete: bool) -> None:
    # After every run (complete=False until the last): a stopped benchmark keeps what it measured.
    bench.write_result(
        _OUT.value, "multiprocess", rows, {
            "config": _CONFIG.value,
            "layouts": _LAYOUTS.value,
            "overrides": _OVERRIDES.value,
            "repeats": _REPEATS.value,
            "cold": _COLD.value,
            "pin": _PIN.value,
            "launcher": _LAUNCHER.value,
            "independent": _INDEPENDENT.value,
            "load_before": load_before,
            "load_now": os.getloadavg(),
            "complete": complete,
            "runs": runs
        })

  try:
    for r in range(_REPEATS.value):
      base = None
      cold = r == 0 or _COLD.value
      # A fresh cache directory per layout, and per round with --cold.
      caches = {
          lay: os.path.join(tmp, f"cache-{lay[0]}x{lay[1]}" + (f"-{r}" if _COLD.value else ""))
          for lay in layouts
      }
      for p, d, independent in runs_of_round:
        name = f"{p}x{d}" + (" independent" if independent else "")
        workdir = os.path.join(_KEEP.value or tmp, f"run{r}-{p}x{d}" + ("i" if independent else ""))
        logging.info("round %d: %s -> %s", r, name, workdir)
        out = _run(p, d, workdir, caches[(p, d)], batch // p if independent else None)
        if _LAUNCHER.value == "pretrain":
          row = {
              "round": r,
              "cache": "cold" if cold else "warm",
              "layout": name,
              "wall_s": out["wall_s"],
              "pretrain_s": out["pretrain_s"],
              "images/s": out["images_per_s"],
          }
          if base is None:
            base = row["images/s"]
          row["vs first layout"] = base / row["images/s"]  # > 1: slower
          rows.append(row)
          runs.append({**row, "final_loss": out["final_loss"]})
          logging.info("%s", row)
          write(False)
          for path in [workdir] + [f"{workdir}.{i}" for i in range(p)]:
            if not _KEEP.value:
              shutil.rmtree(path, ignore_errors=True)
          continue
        s = out["summary"]
        job = s.get("job", {"seconds": {}})
        row = {
            "round": r,
            "cache": "cold" if cold else "warm",
            "layout": f"{p}x{d}",
            "wall_s": out["wall_s"],
            **{
                f"{k}_s": s["timings"].get(k, 0.0) for k in STAGES
            },
            **{
                f"{k}_s (max over processes)": max(job["seconds"].get(k, [0.0])) for k in KINDS
            },
        }
        if base is None:
          base = row["wall_s"]
        row["vs first layout"] = row["wall_s"] / base
        rows.append(row)
        runs.append({
            "layout": f"{p}x{d}",
            "round": r,
            "wall_s": out["wall_s"],
            "job": job,
            "timings": s["timings"],
            "support": s.get("support"),
            "pretrain": s.get("pretrain")
        })
        logging.info("%s", row)
        write(False)
        if not _KEEP.value:
          shutil.rmtree(workdir, ignore_errors=True)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  load_after = os.getloadavg()
  print(bench.format_table(rows))
  print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min)")
  write(True)
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)

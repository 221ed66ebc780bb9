"""Several processes as one job (`jaxattr.distributed`, issue #17): 2 processes x 2 CPU devices on
localhost (JAX's CPU collectives through gloo), started by the tests as subprocesses."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxattr import distributed
from tests.conftest import REPO, repo_env, save_tiny_encoder

_CONFIG = os.path.join(REPO, "configs", "digits.py") + ":quick"
# More targets than :quick's 3, in chunks of 4: 12 chunks for the processes to share.
_ATTRIBUTION = ["--config.attribution.num_targets=40", "--config.attribution.chunk_size=4"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  return dict(repo_env(), JAX_NUM_CPU_DEVICES=str(devices), JAX_PLATFORMS="cpu")


def _run(script, workdir, *extra, devices=4, config=_CONFIG):
  return subprocess.run([
      sys.executable,
      os.path.join(REPO, "launch", script), "--config", config, "--workdir",
      str(workdir), *extra
  ], env=_env(devices), cwd=REPO, capture_output=True, text=True, timeout=600)


def _start_job(script, workdirs, extras, devices=2, timeout_s=120, config=_CONFIG, output=True,
               ids=None, num_processes=None):
  # One process per (workdir, extra args), joined through a localhost coordinator; by default
  # processes 0.. of a job of len(workdirs), else the given ids of a job of num_processes.
  port = _free_port()
  pipe = subprocess.PIPE if output else subprocess.DEVNULL
  ids = range(len(workdirs)) if ids is None else ids
  num_processes = len(workdirs) if num_processes is None else num_processes
  procs = []
  for i, workdir, extra in zip(ids, workdirs, extras):
    cmd = [
        sys.executable,
        os.path.join(REPO, "launch", script), "--config", config, "--workdir",
        str(workdir), f"--coordinator_address=localhost:{port}", f"--num_processes={num_processes}",
        f"--process_id={i}", f"--distributed_timeout={timeout_s}", *extra
    ]
    procs.append(
        subprocess.Popen(cmd, env=_env(devices), cwd=REPO, stdout=pipe, stderr=pipe, text=True))
  return procs


def _assert_ok(job):
  for code, _, stderr in job:
    assert code == 0, stderr[-3000:]


def _run_job(script, workdirs, extras, devices=2, timeout_s=120, config=_CONFIG):
  out = []
  for p in _start_job(script, workdirs, extras, devices, timeout_s, config):
    stdout, stderr = p.communicate(timeout=600)
    out.append((p.returncode, stdout, stderr))
  return out


@pytest.fixture(scope="module")
def pretrained_workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("dist") / "pretrained"
  res = _run("pretrain.py", workdir)
  assert res.returncode == 0, res.stderr[-3000:]
  return workdir


@pytest.fixture(scope="module")
def features_workdir(pretrained_workdir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("dist") / "one"
  shutil.copytree(pretrained_workdir, workdir)
  res = _run("features.py", workdir)
  assert res.returncode == 0, res.stderr[-3000:]
  return workdir


def _same_features(a, b, names=("train.npz", "test.npz")):
  for name in names:
    with np.load(a / "features" / name) as x, np.load(b / "features" / name) as y:
      assert sorted(x.files) == sorted(y.files)
      for key in x.files:
        if key == "features":  # rows on other devices, batched differently: rounding
          np.testing.assert_allclose(x[key], y[key], rtol=1e-5, atol=1e-5)
        else:
          np.testing.assert_array_equal(x[key], y[key])


def test_features_on_two_processes_equal_one(features_workdir, pretrained_workdir, tmp_path):
  two = tmp_path / "two"
  shutil.copytree(pretrained_workdir, two)
  job = _run_job("features.py", [two, two], [[], []])
  _assert_ok(job)
  _same_features(features_workdir, two)
  assert not list((two / "features").glob("*.part*"))


def test_streamed_features_and_imagenet_support_on_two_processes_equal_one(tmp_path):
  """configs/imagenet.py:tiny: streamed features, then the rest of the main job (top-k, the
  resident copy written by process 0, ResNet-18 support), as 2 processes and as 1."""

  from benchmarks import imagenet_tree  # pylint: disable=g-import-not-at-top

  root = tmp_path / "tree"
  imagenet_tree.make_tree(str(root))
  ckpt = str(tmp_path / "encoder")
  save_tiny_encoder(ckpt)
  config = os.path.join(REPO, "configs", "imagenet.py") + ":tiny"
  extra = [
      f"--config.data.source=folder:{root}", f"--config.encoder.checkpoint={ckpt}",
      "--config.features.chunk_rows=2", "--config.features.batch_size=4"
  ]
  res = _run("features.py", tmp_path / "one", *extra, config=config)
  assert res.returncode == 0, res.stderr[-3000:]
  job = _run_job("features.py", [tmp_path / "two"] * 2, [extra, extra], config=config)
  _assert_ok(job)
  _same_features(tmp_path / "one", tmp_path / "two")
  for split in ("train", "test"):
    np.testing.assert_allclose(np.load(tmp_path / "two" / "features" / f"{split}.features.npy"),
                               np.load(tmp_path / "one" / "features" / f"{split}.features.npy"),
                               rtol=1e-5, atol=1e-5)
  # The rest of the main job on the same workdirs (the two feature sets agree; each job goes on
  # from its own).
  res = _run("pipeline.py", tmp_path / "one", *extra, config=config)
  assert res.returncode == 0, res.stderr[-3000:]
  _assert_ok(_run_job("pipeline.py", [tmp_path / "two"] * 2, [extra, extra], config=config))
  for split in ("train", "test"):
    np.testing.assert_array_equal(np.load(tmp_path / "two" / "resident" / f"{split}_32.npy"),
                                  np.load(tmp_path / "one" / "resident" / f"{split}_32.npy"))
  one, two = (json.load(open(tmp_path / w / "summary.json")) for w in ("one", "two"))
  for metric in ("removal", "mislabel"):
    for method in ("esvm", "l2"):
      assert two["support"][metric][method]["trainings"] >= 2
      assert two["support"][metric][method]["median_support"] == one["support"][metric][method][
          "median_support"], (metric, method)


def test_attribution_on_two_processes_equals_one(features_workdir, tmp_path):
  one = tmp_path / "one"
  two = tmp_path / "two"
  shutil.copytree(features_workdir, one)
  shutil.copytree(features_workdir, two)
  res = _run("attribute.py", one, *_ATTRIBUTION)
  assert res.returncode == 0, res.stderr[-3000:]
  job = _run_job("attribute.py", [two, two], [_ATTRIBUTION, _ATTRIBUTION])
  for i, (code, _, stderr) in enumerate(job):
    assert code == 0, stderr[-3000:]
    assert f"process {i} of 2 (coordinator localhost:" in stderr
    assert "2 local devices (cpu), 4 global devices" in stderr
  for method in ("esvm", "l2"):
    for name in ("topk.npy", "targets.npy", "topk_reference.npy"):
      np.testing.assert_array_equal(np.load(two / "attribution" / method / name),
                                    np.load(one / "attribution" / method / name))
    # A chunk's targets split over 2 devices instead of 4: other product shapes, other rounding;
    # ESVM scores are converged to attribution.tol = 1e-5 (decision-value units) either way.
    np.testing.assert_allclose(np.load(two / "attribution" / method / "scores.npy"),
                               np.load(one / "attribution" / method / "scores.npy"), rtol=0,
                               atol=5e-5)
    assert not (two / "attribution" / method / "chunks").exists()
  # A rerun of the same job finds the results current.
  job = _run_job("attribute.py", [two, two], [_ATTRIBUTION, _ATTRIBUTION])
  assert all(code == 0 for code, _, _ in job)
  assert "up to date" in job[0][2]


def test_mismatched_configs_and_unshared_workdirs_are_refused(features_workdir, tmp_path):
  work = tmp_path / "w"
  shutil.copytree(features_workdir, work)
  job = _run_job("attribute.py", [work, work],
                 [_ATTRIBUTION, _ATTRIBUTION + ["--config.attribution.k=16"]])
  for code, _, stderr in job:
    assert code == 1
    assert "the processes run different configs" in stderr and "[0]" in stderr and "[1]" in stderr
  other = tmp_path / "elsewhere"
  job = _run_job("attribute.py", [work, other], [_ATTRIBUTION, _ATTRIBUTION])
  for code, _, stderr in job:
    assert code == 1
    assert "is not one directory that all processes see: processes [1]" in stderr
  assert not os.path.exists(other / "attribution")


def test_stages_not_yet_multi_process_refuse_and_bad_flags_are_named(tmp_path):
  job = _run_job("merge.py", [tmp_path, tmp_path], [[], []])
  for code, _, stderr in job:
    assert code == 1 and "merge.py runs as one process" in stderr
  res = _run("attribute.py", tmp_path, "--num_processes=2", devices=1)
  assert res.returncode == 1
  assert "--coordinator_address, --process_id not given" in res.stderr
  res = _run("attribute.py", tmp_path, "--coordinator_address=localhost:1", "--num_processes=2",
             "--process_id=2", devices=1)
  assert res.returncode == 1 and "--process_id=2 must lie in [0, --num_processes=2)" in res.stderr


def test_a_process_that_never_joins_times_out_naming_the_coordinator(tmp_path):
  # Process 0 whose partner never starts, and process 1 whose coordinator never starts: each
  # ends (JAX aborts it) after --distributed_timeout, the line naming the coordinator logged first.
  procs = [
      _start_job("attribute.py", [tmp_path / f"w{pid}"], [[]], devices=1, timeout_s=3, ids=[pid],
                 num_processes=2)[0] for pid in (0, 1)
  ]
  for pid, p in enumerate(procs):
    _, stderr = p.communicate(timeout=300)
    assert p.returncode != 0
    assert ("joining the job (coordinator localhost:" in stderr and
            f"as process {pid} of 2; waiting up to 3 s" in stderr and
            "--coordinator_address and --num_processes" in stderr), stderr[-3000:]
    assert not os.path.exists(tmp_path / f"w{pid}" / "attribution")


def test_cluster_environment_detection():
  assert distributed.cluster_environment({}) is None
  assert distributed.cluster_environment({"SLURM_STEP_ID": "0", "SLURM_NTASKS": "4"}) == "SLURM"
  assert distributed.cluster_environment({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) is None
  assert distributed.cluster_environment({"OMPI_COMM_WORLD_SIZE": "2"}) == "Open MPI"
  assert distributed.cluster_environment({"OMPI_COMM_WORLD_SIZE": "1"}) is None
  assert distributed.cluster_environment({"TPU_WORKER_HOSTNAMES": "a,b"}) == "TPU VM slice"
  assert distributed.cluster_environment({"TPU_WORKER_HOSTNAMES": "localhost"}) is None


def test_job_array_shards_and_merge_equal_one_run(features_workdir, tmp_path):
  one = tmp_path / "one"
  arr = tmp_path / "array"
  shutil.copytree(features_workdir, one)
  shutil.copytree(features_workdir, arr)
  res = _run("attribute.py", one, *_ATTRIBUTION, devices=1)
  assert res.returncode == 0, res.stderr[-3000:]

  def shard(i):
    return [f"--config.shard.index={i}", "--config.shard.count=3"]

  # Shards 0 and 2 run side by side (each under its own lock); 1 has not run yet.
  procs = [
      subprocess.Popen([
          sys.executable,
          os.path.join(REPO, "launch", "attribute.py"), "--config", _CONFIG, "--workdir",
          str(arr), *_ATTRIBUTION, *shard(i)
      ], env=_env(1), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in (0, 2)
  ]
  for p in procs:
    _, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr[-3000:]
  res = _run("merge.py", arr, *_ATTRIBUTION, "--config.shard.count=3", devices=1)
  assert res.returncode == 1 and "shards [1] of 3 have not run" in res.stderr
  # Shard 1 run with another k: a mismatch, named.
  res = _run("attribute.py", arr, *_ATTRIBUTION, *shard(1), "--config.attribution.k=16", devices=1)
  assert res.returncode == 0, res.stderr[-3000:]
  res = _run("merge.py", arr, *_ATTRIBUTION, "--config.shard.count=3", devices=1)
  assert res.returncode == 1 and "computed with different settings or data" in res.stderr
  shutil.rmtree(arr / "attribution" / "esvm" / "shard-1-of-3")
  shutil.rmtree(arr / "attribution" / "l2" / "shard-1-of-3")
  res = _run("attribute.py", arr, *_ATTRIBUTION, *shard(1), devices=1)
  assert res.returncode == 0, res.stderr[-3000:]
  res = _run("merge.py", arr, *_ATTRIBUTION, "--config.shard.count=3", devices=1)
  assert res.returncode == 0, res.stderr[-3000:]
  # TRAK is computed whole by shard 0: the same top-k as the single run's.
  assert not (arr / "attribution" / "trak" / "shard-1-of-3").exists()
  np.testing.assert_array_equal(np.load(arr / "attribution" / "trak" / "topk.npy"),
                                np.load(one / "attribution" / "trak" / "topk.npy"))
  for method in ("esvm", "l2"):
    for name in ("topk.npy", "scores.npy", "targets.npy", "topk_reference.npy"):
      np.testing.assert_array_equal(np.load(arr / "attribution" / method / name),
                                    np.load(one / "attribution" / method / name))
    assert not list((arr / "attribution" / method).glob("shard-*"))
  # The merged result is the current result of this config: a plain rerun skips.
  res = _run("attribute.py", arr, *_ATTRIBUTION, devices=1)
  assert res.returncode == 0 and "up to date" in res.stderr


def test_shard_fields_are_checked():
  from jaxattr import validate  # pylint: disable=g-import-not-at-top
  from tests.conftest import load_config  # pylint: disable=g-import-not-at-top

  c = load_config("digits", "quick")
  c.shard.index, c.shard.count = 3, 3
  assert any("shard.index=3 must lie in [0, shard.count=3)" in p
             for p in validate.problems(c, stages=("attribution",)))
  c.shard.index, c.shard.count = 0, 0
  assert any(p.startswith("shard.count") for p in validate.problems(c, stages=("attribution",)))


def test_support_on_two_processes_equals_one(features_workdir, tmp_path):
  # The ensemble's models of each round spread over the 4 devices of both processes (one global
  # mesh). The models are not bit-identical to one process with 4 devices (XLA:CPU splits a
  # convolution over a process's threads differently: ~1e-9 after two steps, which training then
  # amplifies), but the support searches' outcomes are the same.
  base = tmp_path / "base"
  shutil.copytree(features_workdir, base)
  res = _run("attribute.py", base)
  assert res.returncode == 0, res.stderr[-3000:]
  one, two, three = tmp_path / "one", tmp_path / "two", tmp_path / "three"
  shutil.copytree(base, one)
  res = _run("support.py", one)
  assert res.returncode == 0, res.stderr[-3000:]
  # The flip classes come from one process's run for all: the flip ensemble's models differ in
  # the last bits too, so a target whose two runner-up classes nearly tie in their mean softmax
  # can take either (target 228 took class 4 in one process and 1 in two, on an Intel Xeon with
  # jax 0.10.2), and its mislabel search then relabels to another class. The two-process
  # ensemble itself is compared below through the searches' models.
  flips = one / "support" / "flip_classes.npz"
  for w in (two, three):
    shutil.copytree(base, w)
    (w / "support").mkdir()
    shutil.copy(flips, w / "support" / flips.name)
  job = _run_job("support.py", [two, two], [[], []])
  for code, _, stderr in job:
    assert code == 0, stderr[-3000:]
    assert "on 4 device(s)" in stderr  # one mesh over both processes' devices
  assert (two / "support" / flips.name).read_bytes() == flips.read_bytes()  # used, not redone
  results = sorted(p.relative_to(one) for p in (one / "support").rglob("results.jsonl"))
  assert results
  for rel in results:
    assert (two / rel).read_text() == (one / rel).read_text(), rel
  # The searches' logs: every decision (each evaluation's k, seeds and flipped verdict, the
  # bracket, the best budget) is the same. Single predictions may not be: a model whose logits sit
  # at a tie can answer the other class (one of them did on jax 0.12.0.1 on an AMD EPYC).
  preds = differ = 0
  for rel in sorted(p.relative_to(one) for p in (one / "support").rglob("state.json")):
    a, b = json.loads((one / rel).read_text()), json.loads((two / rel).read_text())
    for st in (a, b):
      for r in st.get("rounds", []):
        r.pop("seconds", None)
    pa, pb = (np.array([e.pop("preds") for ev in st["evals"] for e in ev]) for st in (a, b))
    for st in (a, b):
      for ev in st["evals"]:
        for e in ev:
          e.pop("correct")
    assert a == b, rel
    preds, differ = preds + pa.size, differ + int((pa != pb).sum())
  assert preds and differ <= max(1, preds // 100), (differ, preds)

  # Process 1 killed after the first round (then the rest of the job, as a cluster manager
  # would), the same job started again: it resumes at the next round, with the same result.
  procs = _start_job("support.py", [three, three], [[], []], output=False)
  deadline = time.time() + 300
  while time.time() < deadline:
    states = list((three / "support").rglob("state.json"))
    if any(json.loads(p.read_text()).get("next_round", 0) >= 1 for p in states if p.stat().st_size):
      break
    time.sleep(0.2)
  else:
    raise AssertionError("no round finished in 300 s")
  for p in (procs[1], procs[0]):
    p.send_signal(signal.SIGKILL)
    p.wait()
  assert not list((three / "support").rglob("results.jsonl"))  # stopped mid-search
  job = _run_job("support.py", [three, three], [[], []])
  _assert_ok(job)
  assert "resum" in job[0][2].lower()
  for rel in results:
    assert (three / rel).read_text() == (one / rel).read_text(), rel


def _encoder(workdir):
  from jaxattr import checkpoint  # pylint: disable=g-import-not-at-top
  return checkpoint.load_variables(str(workdir / "pretrain" / "encoder"))


def _relative_distance(a, b) -> float:
  """||a - b|| / ||a|| over all leaves of two pytrees of arrays."""
  import jax  # pylint: disable=g-import-not-at-top
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  num = sum(float(((x - y)**2).sum()) for x, y in zip(la, lb))
  return (num / sum(float((x**2).sum()) for x in la))**0.5


def test_pretrain_on_two_processes_matches_one(pretrained_workdir, tmp_path):
  # MoCo data parallel over the 4 devices of both processes: the same batches, keys, views and
  # step-1 loss as 1 process x 4 devices and 1 x 1; the sums of gradients and BatchNorm
  # statistics run in another order, so a ReLU whose input lies within rounding of 0 can turn the
  # other way and the runs are not bit-identical (measured: a ReLU replaced by a smooth function
  # brings 2 x 2 and 1 x 1 gradients within 1e-5). Stated tolerance after the 2 steps of :quick:
  # parameters within 2% (relative L2), final loss within 1%.
  two, single = tmp_path / "two", tmp_path / "single"
  job = _run_job("pretrain.py", [two, two], [[], []])
  for i, (code, _, stderr) in enumerate(job):
    assert code == 0, stderr[-3000:]
    assert "data parallel over 4 device(s) of 2 process(es), 16 images per device" in stderr
  res = _run("pretrain.py", single, devices=1)
  assert res.returncode == 0, res.stderr[-3000:]
  four, meta4 = _encoder(pretrained_workdir)
  for other in (two, single):
    variables, meta = _encoder(other)
    assert meta["step"] == meta4["step"] == 2 and meta["fingerprint"] == meta4["fingerprint"]
    assert _relative_distance(four["params"], variables["params"]) < 0.02
    s4, s = (json.loads((w / "pretrain" / "summary.json").read_text())
             for w in (pretrained_workdir, other))
    assert abs(s["final_loss"] - s4["final_loss"]) < 0.01 * abs(s4["final_loss"])
  # Process 0 alone wrote the encoder and the summary; no temporary directories are left.
  assert not [p for p in (two / "pretrain").iterdir() if p.name.startswith(".")]


# One process of a 2-process job: a program over the devices of both processes and one on this
# process's own device, with the persistent cache in argv[3]; prints how many compilation
# requests the cache answered, of how many.
_CACHE_JOB = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxattr import distributed, xla_flags
distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
xla_flags.use_compilation_cache(sys.argv[3])
counts = {"requests": 0, "hits": 0}
def listen(event, **kwargs):
  if event.endswith("/compile_requests_use_cache"):
    counts["requests"] += 1
  if event.endswith("/cache_hits"):
    counts["hits"] += 1
jax.monitoring.register_event_listener(listen)
mesh = Mesh(np.asarray(jax.devices()), ("d",))
x = jax.make_array_from_callback((8,), NamedSharding(mesh, P("d")), lambda i: np.arange(8.0)[i])
total = jax.jit(lambda v: jnp.sum(jnp.sin(v) ** 2), out_shardings=NamedSharding(mesh, P()))(x)
local = jax.jit(lambda v: jnp.cos(v) * 3)(jnp.arange(4.0))
print(json.dumps(dict(counts, total=float(total.addressable_data(0)), local=float(local.sum()))))
"""


def test_every_process_loads_what_process_0_compiled(tmp_path):
  # JAX writes the persistent compilation cache from process 0 only; on the CPU backend its keys
  # differed between processes, so process 1 compiled every program of every run again
  # (`distributed.share_cpu_compilation_cache`). The second run of the same job must find every
  # program in the cache on both processes, and compute the same numbers.
  cache = tmp_path / "cache"
  runs = []
  for _ in range(2):
    port = _free_port()
    procs = [
        subprocess.Popen([
            sys.executable, "-c", _CACHE_JOB, f"localhost:{port}",
            str(i), str(cache)
        ], env=_env(1), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    out = []
    for p in procs:
      stdout, stderr = p.communicate(timeout=300)
      assert p.returncode == 0, stderr[-3000:]
      out.append(json.loads(stdout.strip().splitlines()[-1]))
    runs.append(out)
  first, second = runs
  # A fresh cache: process 0 finds nothing (process 1 may already find what process 0 wrote).
  assert first[0]["requests"] >= 2 and first[0]["hits"] == 0
  for process in (0, 1):
    assert second[process]["requests"] == first[process]["requests"]
    assert second[process]["hits"] == second[process]["requests"], (process, second)
    assert second[process]["total"] == first[0]["total"]
    assert second[process]["local"] == first[0]["local"]


def test_pretrain_on_two_processes_resumes_after_a_kill(tmp_path):
  longer = ["--config.pretrain.max_steps=6", "--config.pretrain.checkpoint_every_steps=1"]
  full, killed = tmp_path / "full", tmp_path / "killed"
  job = _run_job("pretrain.py", [full, full], [longer, longer])
  _assert_ok(job)
  # Process 1 killed once the step-2 checkpoint is complete, then process 0 (which would wait
  # for it), as a cluster manager would; the same job started again resumes from a checkpoint.
  procs = _start_job("pretrain.py", [killed, killed], [longer, longer], output=False)
  ckpt = killed / "pretrain" / "checkpoints" / "2"
  deadline = time.time() + 300
  while time.time() < deadline and not ckpt.is_dir():
    time.sleep(0.05)
  assert ckpt.is_dir(), "no step-2 checkpoint in 300 s"
  for p in (procs[1], procs[0]):
    p.send_signal(signal.SIGKILL)
    p.wait()
  assert not (killed / "pretrain" / "encoder").exists()  # stopped before the end
  job = _run_job("pretrain.py", [killed, killed], [longer, longer])
  _assert_ok(job)
  summary = json.loads((killed / "pretrain" / "summary.json").read_text())
  assert 2 <= summary["resumed_from"] < 6 and summary["steps"] == 6
  a, _ = _encoder(full)
  b, _ = _encoder(killed)
  import jax  # pylint: disable=g-import-not-at-top
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
  assert summary["final_loss"] == json.loads(
      (full / "pretrain" / "summary.json").read_text())["final_loss"]


def test_support_job_array_shards_and_merge_equal_one_run(features_workdir, tmp_path):
  base = tmp_path / "base"
  shutil.copytree(features_workdir, base)
  res = _run("attribute.py", base, devices=1)
  assert res.returncode == 0, res.stderr[-3000:]
  one, arr = tmp_path / "one", tmp_path / "array"
  shutil.copytree(base, one)
  shutil.copytree(base, arr)
  res = _run("support.py", one, devices=1)
  assert res.returncode == 0, res.stderr[-3000:]

  def shard(i):
    return [f"--config.shard.index={i}", "--config.shard.count=2"]

  res = _run("support.py", arr, *shard(1), devices=1)
  assert res.returncode == 0, res.stderr[-3000:]
  res = _run("merge.py", arr, "--config.shard.count=2", devices=1)
  assert res.returncode == 1 and "shard 0 of 2 has not run" in res.stderr
  res = _run("support.py", arr, *shard(0), "--config.support.num_tests=3", devices=1)
  assert res.returncode == 0, res.stderr[-3000:]
  res = _run("merge.py", arr, "--config.shard.count=2", devices=1)
  assert res.returncode == 1 and "was computed with another config" in res.stderr
  assert not (arr / "support" / "removal" / "esvm" / "results.jsonl").exists()
  res = _run("support.py", arr, *shard(0), devices=1)
  assert res.returncode == 0, res.stderr[-3000:]
  res = _run("merge.py", arr, "--config.shard.count=2", devices=1)
  assert res.returncode == 0, res.stderr[-3000:]
  results = sorted(p.relative_to(one) for p in (one / "support").rglob("results.jsonl"))
  assert len(results) == 6  # 2 metrics x (esvm, l2, trak)
  for rel in results:
    assert (arr / rel).read_text() == (one / rel).read_text(), rel
    assert not list((arr / rel.parent).glob("shard-*"))
  for rel in sorted(p.relative_to(one) for p in (one / "support").rglob("summary.json")):
    a, b = json.loads((one / rel).read_text()), json.loads((arr / rel).read_text())
    for key in ("median_support", "trainings", "fingerprint", "not_flipped"):
      assert a[key] == b[key], (rel, key)
  # The merged results are this config's: a plain run finds them up to date.
  res = _run("support.py", arr, devices=1)
  assert res.returncode == 0 and "done already" in res.stderr


def test_flip_ensemble_on_two_processes_matches_one(tmp_path):
  # The ensemble's models spread over the 4 devices of both processes; process 0 writes. The
  # models are not bit-identical to 1 process x 4 devices (see the support test), so the stated
  # tolerance: mean softmax within 0.02, flip classes equal on at least 95% of the images.
  config = os.path.join(REPO, "configs", "flip.py") + ":digits"
  extra = [
      "--config.data.options.limit_per_class=13", "--config.num_models=4",
      "--config.ensemble.width=0.0625", "--config.ensemble.epochs=1",
      "--config.ensemble.batch_size=32", "--config.ensemble.eval_batch_size=130"
  ]
  res = _run("flip.py", tmp_path / "one", *extra, config=config)
  assert res.returncode == 0, res.stderr[-3000:]
  job = _run_job("flip.py", [tmp_path / "two"] * 2, [extra, extra], config=config)
  _assert_ok(job)
  with np.load(tmp_path / "one" / "flip_classes.npz") as a, \
      np.load(tmp_path / "two" / "flip_classes.npz") as b:
    np.testing.assert_array_equal(a["labels"], b["labels"])
    np.testing.assert_array_equal(a["index"], b["index"])
    np.testing.assert_allclose(a["mean_softmax"], b["mean_softmax"], atol=0.02)
    assert (a["flip_class"] == b["flip_class"]).mean() >= 0.95

"""launch/gpu_check.sh, statically: it parses as bash, and every flag that a step passes, at
GPU size or at the rehearsal's toy size (GPU_CHECK_SMOKE=1), is one that the step's program
defines. The script only runs where an accelerator is lent; a renamed flag would otherwise be
found there, at the price of that machine's minutes."""

import importlib.util
import os
import re
import subprocess
import tarfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "launch", "gpu_check.sh")


def _steps() -> list[str]:
  """The script's `step` commands, each on one logical line."""
  with open(SCRIPT) as f:
    text = f.read().replace("\\\n", " ")
  return [line.strip() for line in text.splitlines() if line.strip().startswith("step ")]


def test_gpu_check_parses_as_bash():
  res = subprocess.run(["bash", "-n", SCRIPT], capture_output=True, text=True)
  assert res.returncode == 0, res.stderr


def test_gpu_check_runs_every_benchmark_with_a_step():
  programs = " ".join(_steps())
  for name in ("benchmark_features", "benchmark_esvm", "esvm_imagenet_sweep", "benchmark_loader",
               "benchmark_train", "benchmark_imagenet_train", "benchmark_trak"):
    assert f"-m benchmarks.{name} " in programs, name
  assert "launch/lds.py" in programs


@pytest.mark.parametrize("line", _steps(), ids=lambda line: line.split()[1])
def test_gpu_check_step_flags_exist(line):
  module = re.search(r"-m benchmarks\.(\w+)", line)
  if module:
    with open(os.path.join(REPO, "benchmarks", module.group(1) + ".py")) as f:
      source = f.read()
    defined = set(re.findall(r"DEFINE_\w+\(\s*\"(\w+)\"", source))
    passed = set(re.findall(r"(?<![\w-])--(\w+)", line))
    assert passed and passed <= defined, f"undefined: {sorted(passed - defined)}"
    return
  # launch/lds.py: each --config (file:variants) loads, and every override names a field of it.
  assert "launch/lds.py" in line
  overrides = re.findall(r"--config\.([\w.]+)=", line)
  files = re.findall(r"--config (configs/\w+\.py):?([\w,]*)", line)
  assert len(files) == 2, line  # the GPU size's and the rehearsal's
  for path, variant in files:
    spec = importlib.util.spec_from_file_location("cfg", os.path.join(REPO, path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config(variant or None)
    for key in overrides:
      node = cfg
      for part in key.split("."):
        assert part in node, f"{path}:{variant} has no field {key}"
        node = node[part]


def test_gpu_check_lists_its_steps():
  # STEPS (what GPU_CHECK_ONLY is checked against) names every step the script runs.
  with open(SCRIPT) as f:
    text = f.read()
  listed = re.search(r'STEPS="([^"]*)"', text).group(1).split()
  assert len(listed) == len(set(listed)) == 13
  names = [line.split()[1] for line in _steps()]
  assert {n for n in names if "$" not in n} <= set(listed)
  assert {n for n in listed if n.startswith("esvm_") and n != "esvm_imagenet_sweep"} == {
      "esvm_hard_synthetic", "esvm_imagenet_shaped_family_norm_3",
      "esvm_imagenet_shaped_family_norm_30", "esvm_imagenet_shaped_family_norm_1000"
  }


def _run_with_fake_python(tmp_path, expect_rc=0, **env):
  """The script in a copy of the checkout's layout, with a `python3` that only logs its
  arguments (and sleeps FAKE_SLEEP seconds in a step): its budget, step selection and packing
  alone."""
  root = tmp_path / "checkout"
  (root / "launch").mkdir(parents=True)
  (root / "jaxattr").mkdir()
  (root / "launch" / "gpu_check.sh").write_text(open(SCRIPT).read())
  (root / "jaxattr" / "config.py").write_text('CIFAR10_JPEG = "folder:missing.tar.gz"\n')
  fake = tmp_path / "bin"
  fake.mkdir()
  (fake / "python3").write_text('#!/usr/bin/env bash\necho "fake python3 $*"\n'
                                '[ "$1" = -c ] || sleep "${FAKE_SLEEP:-0}"\n')
  (fake / "python3").chmod(0o755)
  out = tmp_path / "out"
  full_env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", OUT=str(out), **env)
  res = subprocess.run(["bash", str(root / "launch" / "gpu_check.sh")], env=full_env,
                       capture_output=True, text=True, timeout=120)
  assert res.returncode == expect_rc, res.stderr
  if expect_rc:
    return res.stderr
  with tarfile.open(out / "gpu_check.tar.gz") as tar:
    names = {os.path.basename(n) for n in tar.getnames()}
    summary = tar.extractfile("gpu_check/steps.txt").read().decode()
  return res.stdout, names, summary, sorted(os.listdir(out))


def test_gpu_check_runs_the_named_steps_and_packs_them(tmp_path):
  stdout, names, summary, files = _run_with_fake_python(tmp_path, GPU_CHECK_ONLY="trak loader")
  assert files == ["gpu_check.tar.gz"]  # one file comes back from a lent machine
  assert [line.split()[0] for line in summary.splitlines()] == ["trak", "loader"]
  assert all(" rc 0 " in line for line in summary.splitlines())
  assert {"trak.log", "loader.log", "env.log", "steps.txt"} <= names
  assert "-m benchmarks.benchmark_trak --width=1 --examples=4096" in stdout  # GPU sizes
  assert "data/cifar10-jpeg.tar.gz" not in stdout  # neither step reads CIFAR-10


def test_gpu_check_keeps_to_its_budget(tmp_path):
  # 35 s: the first step's limit is cut to what is left; it is stopped (rc 124), and every
  # later step is skipped, yet the results are packed and the summary printed.
  _, names, summary, _ = _run_with_fake_python(tmp_path, GPU_CHECK_BUDGET="35", FAKE_SLEEP="60",
                                               GPU_CHECK_SMOKE="1")
  lines = summary.splitlines()
  assert lines[0].startswith("imagenet_train") and " rc 124 " in lines[0]
  assert len(lines) == 13 and all("skipped (budget of 35 s spent)" in line for line in lines[1:])
  assert "imagenet_train.log" in names


def test_gpu_check_refuses_bad_settings_before_any_step(tmp_path):
  err = _run_with_fake_python(tmp_path / "a", expect_rc=2, GPU_CHECK_ONLY="trak lds")
  assert "unknown step 'lds'" in err and "lds_slice" in err
  err = _run_with_fake_python(tmp_path / "b", expect_rc=2, GPU_CHECK_BUDGET="9m")
  assert "GPU_CHECK_BUDGET=9m: expected whole seconds" in err
  assert not (tmp_path / "a" / "out").exists() and not (tmp_path / "b" / "out").exists()

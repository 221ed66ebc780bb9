"""`benchmarks/benchmark_multiprocess.py`: its control-run flags refuse what they cannot measure,
before any job starts."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench(*args):
  return subprocess.run([sys.executable, "-m", "benchmarks.benchmark_multiprocess", *args],
                        cwd=REPO, capture_output=True, text=True, timeout=120)


def test_independent_control_needs_the_pretrain_launcher():
  res = _bench("--independent")
  assert res.returncode != 0
  assert "--independent needs --launcher=pretrain" in res.stdout + res.stderr


def test_independent_control_refuses_a_batch_that_does_not_divide():
  # digits pretrains on batches of 128, which 3 processes cannot share equally.
  res = _bench("--launcher=pretrain", "--independent", "--layouts=1x3,3x1")
  assert res.returncode != 0
  out = res.stdout + res.stderr
  assert "pretraining batch 128 does not divide over 3 processes" in out, out[-2000:]
  assert "round 0" not in out  # nothing ran


def test_independent_batch_override_is_read():
  res = _bench("--launcher=pretrain", "--independent", "--layouts=1x2,2x1",
               "--overrides=pretrain.batch_size=63")
  assert res.returncode != 0
  assert "pretraining batch 63 does not divide over 2 processes" in res.stdout + res.stderr

"""The launchers' workdir lock and clean failures: one `error:` line, Ctrl-C, a full disk."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from jaxattr import cli, utils
from tests.conftest import REPO, repo_env


def _write_lock(workdir, pid, host=None):
  holder = {
      "pid": pid,
      "host": host or socket.gethostname(),
      "started": "2024-05-01T12:00:00Z",
      "argv": ["launch/pipeline.py", "--workdir", str(workdir)]
  }
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, ".lock"), "w") as f:
    json.dump(holder, f)
  return holder


def _dead_pid():
  proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  return int(proc.stdout)  # Exited and reaped by run(): no process has this pid now.


def _launch(script, workdir, *extra, config="digits.py"):
  cmd = [
      sys.executable,
      os.path.join(REPO, "launch", script), "--config",
      os.path.join(REPO, "configs", config), "--workdir",
      str(workdir), *extra
  ]
  return subprocess.run(cmd, env=repo_env(), cwd=REPO, capture_output=True, text=True, timeout=120)


# The lock in-process.


def test_lock_records_holder_and_is_released(tmp_path):
  workdir = tmp_path / "new" / "w"  # Created by the lock.
  with utils.workdir_lock(str(workdir), ["a", "b"]) as path:
    with open(path) as f:
      holder = json.load(f)
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    assert holder["argv"] == ["a", "b"] and holder["started"].endswith("Z")
  assert not os.path.exists(path)


@pytest.mark.parametrize("exc", [ValueError, KeyboardInterrupt])
def test_lock_released_on_exception(tmp_path, exc):
  with pytest.raises(exc):
    with utils.workdir_lock(str(tmp_path)):
      raise exc()
  assert not os.path.exists(tmp_path / ".lock")


def test_live_lock_refused_naming_holder(tmp_path):
  holder = _write_lock(tmp_path, os.getpid())
  with pytest.raises(utils.WorkdirLocked) as e:
    with utils.workdir_lock(str(tmp_path)):
      pytest.fail("entered a locked workdir")
  msg = str(e.value)
  for text in (f"pid {os.getpid()}", socket.gethostname(), "2024-05-01T12:00:00Z",
               "launch/pipeline.py", "another --workdir", str(tmp_path / ".lock")):
    assert text in msg, (text, msg)
  with open(tmp_path / ".lock") as f:
    assert json.load(f) == holder  # The holder's lock is untouched.


def test_stale_lock_taken_over_with_warning(tmp_path, monkeypatch):
  warnings = []
  monkeypatch.setattr(utils.logging, "warning", lambda fmt, *a: warnings.append(fmt % a))
  pid = _dead_pid()
  _write_lock(tmp_path, pid)
  with utils.workdir_lock(str(tmp_path)) as path:
    with open(path) as f:
      assert json.load(f)["pid"] == os.getpid()
  assert not os.path.exists(path)
  assert len(warnings) == 1 and "stale" in warnings[0] and f"pid {pid}" in warnings[0]
  assert not [p for p in os.listdir(tmp_path) if "stale" in p]


def test_lock_of_another_host_refused(tmp_path):
  _write_lock(tmp_path, _dead_pid(), host="some-other-host")
  with pytest.raises(utils.WorkdirLocked, match="another host.*some-other-host.*delete"):
    with utils.workdir_lock(str(tmp_path)):
      pytest.fail("entered a workdir locked from another host")
  assert os.path.exists(tmp_path / ".lock")


def test_lock_of_someone_else_not_removed_on_exit(tmp_path):
  with utils.workdir_lock(str(tmp_path)):
    # Someone deleted our lock and another run took the workdir: its lock must stay.
    os.remove(tmp_path / ".lock")
    other = _write_lock(tmp_path, os.getpid() + 1)
  with open(tmp_path / ".lock") as f:
    assert json.load(f) == other


# cli.guarded in-process: the cases a launcher cannot cheaply be made to hit.


def test_disk_full_reported_naming_path(tmp_path, capsys):

  def run(config, workdir):
    try:
      raise OSError(errno.ENOSPC, "No space left on device", "/data/ckpt/step_7")
    except OSError as e:
      raise RuntimeError("save failed") from e  # As libraries re-raise it.

  with pytest.raises(SystemExit) as e:
    cli.guarded(run, None, str(tmp_path))
  assert e.value.code == 1
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: disk full") and "/data/ckpt/step_7" in err, err
  assert "same command" in err and len(err.splitlines()) == 1
  assert not os.path.exists(tmp_path / ".lock")


def test_interrupt_in_process_exits_130(tmp_path, capsys):

  def run(config, workdir):
    raise KeyboardInterrupt

  with pytest.raises(SystemExit) as e:
    cli.guarded(run, None, str(tmp_path))
  assert e.value.code == 130
  assert "same command" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / ".lock")


def test_interrupt_hides_background_thread_failures(tmp_path, capsys):
  """A Ctrl-C while a background thread writes (orbax's asynchronous save): one line, no thread
  traceback."""
  started = threading.Event()

  def writer():
    started.set()
    time.sleep(0.2)
    raise RuntimeError("cannot schedule new futures after interpreter shutdown")

  thread = threading.Thread(target=writer)
  hook = threading.excepthook

  def run(config, workdir):
    thread.start()
    started.wait()
    raise KeyboardInterrupt

  try:
    with pytest.raises(SystemExit) as e:
      cli.guarded(run, None, str(tmp_path))
    thread.join()
  finally:
    threading.excepthook = hook
  assert e.value.code == 130
  err = capsys.readouterr().err
  assert "Traceback" not in err and err.count("interrupted") == 1, err


def test_interrupt_swallowed_by_a_callback_still_stops_the_run(tmp_path, capsys):
  """Python drops a KeyboardInterrupt raised where it cannot propagate (a __del__, JAX's GC
  callbacks); the run must still stop with 130 instead of carrying on."""

  class Finalizer:

    def __del__(self):
      raise KeyboardInterrupt

  def run(config, workdir):
    Finalizer()  # dropped at once: its KeyboardInterrupt is unraisable
    for _ in range(100):
      time.sleep(0.01)
    raise AssertionError("the interrupt was lost")

  # A launcher has Python's SIGINT handler; an earlier test in this worker may have left another
  # one (with SIG_IGN, interrupt_main does nothing: the full suite failed here twice).
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    with pytest.raises(SystemExit) as e:
      cli.guarded(run, None, str(tmp_path))
  finally:
    signal.signal(signal.SIGINT, previous)
  assert e.value.code == 130
  assert "same command" in capsys.readouterr().err


# Real launchers.


def test_launcher_failure_is_one_error_line(tmp_path):
  start = time.monotonic()
  res = _launch("attribute.py", tmp_path)
  assert res.returncode == 1, res.stderr[-3000:]
  assert "Traceback" not in res.stderr, res.stderr[-3000:]
  last = res.stderr.strip().splitlines()[-1]
  assert last.startswith("error: feature file not found: ") and "train.npz" in last, last
  assert str(tmp_path / "error.log") in last
  assert "Traceback" in (tmp_path / "error.log").read_text()
  assert not os.path.exists(tmp_path / ".lock")
  assert time.monotonic() - start < 30


def test_misspelt_config_field_is_one_usage_line(tmp_path):
  workdir = tmp_path / "w"
  res = _launch("pipeline.py", workdir, "--config.pretrain.epoch=3", config="digits.py:quick")
  assert res.returncode == 1, res.stderr[-3000:]
  assert "Traceback" not in res.stderr, res.stderr[-3000:]
  lines = res.stderr.strip().splitlines()
  assert lines[-2] == ("FATAL Flags parsing error: flag --config.pretrain.epoch=3: the config has "
                       "no field 'pretrain.epoch' (did you mean 'epochs' instead of 'epoch'?); "
                       "see the config file for its fields"), lines[-2:]
  res = _launch("lds.py", workdir, "--config.nosection.x=1")
  assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
  assert "flag --config.nosection.x=1: the config has no field 'nosection.x';" in res.stderr
  assert not workdir.exists()  # refused before the workdir is made


def test_bad_config_file_or_workdir_is_one_error_line(tmp_path):
  (tmp_path / "file").write_text("not a directory")
  cases = [
      (("--config", "configs/none.py", "--workdir", str(tmp_path / "w")),
       "error: --config configs/none.py: no such file; pass a Python config file, e.g. "
       "configs/digits.py[:variant]"),
      (("--config", "configs/digits.py:quick", "--workdir", str(tmp_path / "file")),
       f"error: --workdir {tmp_path / 'file'} is a file, not a directory: pass a directory (it "
       "is created when missing)"),
  ]
  for args, line in cases:
    res = subprocess.run([sys.executable,
                          os.path.join(REPO, "launch", "pipeline.py"), *args], env=repo_env(),
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert res.stderr.strip().splitlines()[-1] == line, res.stderr[-1000:]
  assert sorted(os.listdir(tmp_path)) == ["file"]  # nothing created


def test_config_file_that_fails_to_build_is_one_usage_line(tmp_path):
  # A config file with a syntax error, one that raises (ValueError through ml_collections' flag
  # error, KeyError and ZeroDivisionError directly), an unknown variant, and one without
  # get_config(): each one usage line naming the flag, the error and its line in the file.
  files = {
      "syntax.py": "def get_config(:\n  pass\n",
      "zero.py": "def get_config():\n  return 1 / 0\n",
      "key.py": "def get_config():\n  return {}['lr']\n",
      "value.py": "def get_config():\n\n  raise ValueError('no such dataset')\n",
      "nothing.py": "X = 1\n",
  }
  for name, text in files.items():
    (tmp_path / name).write_text(text)
  path = str(tmp_path)
  cases = [
      ("syntax.py", "the config file raised SyntaxError: invalid syntax (syntax.py, line 1)"),
      ("zero.py",
       f"the config file raised ZeroDivisionError: division by zero (at {path}/zero.py:2)"),
      ("key.py", f"the config file raised KeyError: 'lr' (at {path}/key.py:2)"),
      ("value.py", f"the config file raised ValueError: no such dataset (at {path}/value.py:3)"),
      ("nothing.py", "the config file defines no get_config() returning the config"),
  ]
  workdir = tmp_path / "w"
  for name, text in cases:
    res = _launch("pipeline.py", workdir, config=f"{path}/{name}")
    assert res.returncode == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert res.stderr.strip().splitlines()[-2] == (
        f"FATAL Flags parsing error: flag --config={path}/{name}: {text}"), res.stderr[-1000:]
  res = _launch("support.py", workdir, config="digits.py:nosuch")
  with open(os.path.join(REPO, "configs", "digits.py")) as f:
    line = next(i for i, text in enumerate(f, 1) if "unknown variant" in text)
  assert res.stderr.strip().splitlines()[-2] == (
      f"FATAL Flags parsing error: flag --config={REPO}/configs/digits.py:nosuch: the config file "
      "raised ValueError: unknown variant 'nosuch' of configs/digits.py (known: quick) "
      f"(at {REPO}/configs/digits.py:{line})"), res.stderr[-1000:]
  assert not workdir.exists()


def test_launcher_refuses_locked_workdir_at_once(tmp_path):
  holder = _write_lock(tmp_path, os.getpid())  # This test process: alive.
  res = _launch("pipeline.py", tmp_path, config="digits.py:quick")
  assert res.returncode == 1, res.stderr[-3000:]
  assert "Traceback" not in res.stderr
  last = res.stderr.strip().splitlines()[-1]
  assert last.startswith("error: workdir ") and f"pid {os.getpid()}" in last, last
  assert "2024-05-01T12:00:00Z" in last and "launch/pipeline.py" in last
  # Nothing written: no stage output, no error.log, the holder's lock as it was.
  assert sorted(os.listdir(tmp_path)) == [".lock"]
  with open(tmp_path / ".lock") as f:
    assert json.load(f) == holder


def test_ctrl_c_says_resume_and_releases_lock(tmp_path):
  # The quick variant's tiny encoder starts training in seconds; it would train for minutes.
  # No checkpoint falls in the test's window: a Ctrl-C during one of orbax's background saves
  # still prints that thread's traceback (issue #14, open).
  cmd = [
      sys.executable,
      os.path.join(REPO, "launch", "pipeline.py"), "--config",
      os.path.join(REPO, "configs", "digits.py") + ":quick", "--workdir",
      str(tmp_path), "--config.pretrain.max_steps=100000", "--config.pretrain.epochs=1000",
      "--config.pretrain.checkpoint_every_steps=100000"
  ]
  log = tmp_path / "stderr.txt"
  with open(log, "w") as err_file:
    # SIGINT must reach Python's handler even if this test runs with it ignored (`cmd &` in sh).
    proc = subprocess.Popen(cmd, env=repo_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=err_file,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  try:
    # Wait for training steps: a SIGINT during start-up can land in one of JAX's GC callbacks,
    # where Python prints and drops the KeyboardInterrupt. The deadline only guards against a
    # hang: start-up (imports, data, compiling the step) took over 60 s on a 2-core VM that ran
    # another job beside the suite's two workers.
    deadline = time.monotonic() + 300
    while "pretrain: step" not in log.read_text():
      assert proc.poll() is None, log.read_text()[-3000:]
      assert time.monotonic() < deadline, "pretraining did not start in 300 s"
      time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  err = log.read_text()
  assert proc.returncode == 130, err[-3000:]
  assert "Traceback" not in err, err[-3000:]
  assert err.count("interrupted") == 1 and "same command" in err, err[-3000:]
  assert not os.path.exists(tmp_path / ".lock")
